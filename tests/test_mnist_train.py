"""LeNet/MLP shapes, the optimizer's closed form, a short real training run, checkpoint resume."""

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldjax.data.mnist import load_default, load_mnist
from ldjax.mnist.models import LeNet, apply_fn, init_params, make_model, param_count
from ldjax.mnist.train import (
    TrainConfig,
    epoch_order,
    evaluate,
    initial_params,
    make_optimizer,
    steps_per_epoch,
    train,
)

N_TRAIN = 256
# PyTorch-default init starts on a plateau near log(10): a large lr leaves it within 8 steps
# (observed: loss 2.29 -> 1.84, accuracy 0.10 -> 0.41).
CFG = TrainConfig(n_train=N_TRAIN, epochs=2, lr=1.0)


def _shapes(model):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]


def test_lenet_parameter_count_is_papers():
    p = _shapes(make_model("lenet"))
    # conv1 5*5*1*6+6, conv2 5*5*6*16+16, fc 400*60+60, 60*42+42, 42*10+10
    assert (5 * 5 * 1 * 6 + 6, 5 * 5 * 6 * 16 + 16, 400 * 60 + 60, 60 * 42 + 42, 42 * 10 + 10) == (
        156,
        2416,
        24060,
        2562,
        430,
    )
    assert param_count(p) == 156 + 2416 + 24060 + 2562 + 430 == 29624
    assert p["fc1"]["kernel"].shape == (400, 60)  # 16 * 5 * 5 after two pools
    assert p["conv1"]["kernel"].shape == (5, 5, 1, 6)
    mlp = _shapes(make_model("mlp"))
    assert param_count(mlp) == (784 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    with pytest.raises(ValueError, match="model must be one of"):
        make_model("resnet")


def test_torch_default_init():
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer, as PyTorch's Conv2d/Linear defaults."""
    p = init_params(make_model("lenet"), jax.random.PRNGKey(1))
    for layer, fan_in in (("conv1", 25), ("conv2", 150), ("fc1", 400), ("fc2", 60), ("fc3", 42)):
        for name in ("kernel", "bias"):
            a = np.asarray(p[layer][name])
            assert a.dtype == np.float32 and np.abs(a).max() <= 1 / math.sqrt(fan_in)
    w = np.asarray(p["fc1"]["kernel"])  # 24,000 draws: std of U(-b, b) is b/sqrt(3)
    assert w.std() == pytest.approx(1 / math.sqrt(400) / math.sqrt(3), rel=0.02)
    assert abs(w.mean()) < 0.01 / math.sqrt(400)
    assert 0.0 < np.abs(np.asarray(p["fc1"]["bias"])).min()  # biases are not zero
    q = init_params(make_model("lenet"), jax.random.PRNGKey(1))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q))
    )
    # flax scheme on a tiny MLP: zero biases
    tiny = make_model("mlp", hidden=(3,))
    pf = init_params(tiny, jax.random.PRNGKey(0), (2, 2, 1), scheme="flax")
    assert pf["fc1"]["kernel"].shape == (4, 3) and not np.asarray(pf["fc2"]["bias"]).any()
    with pytest.raises(ValueError, match="scheme"):
        init_params(tiny, jax.random.PRNGKey(0), (2, 2, 1), scheme="he")


def test_apply_fn_shapes():
    model = LeNet()
    params = init_params(model, jax.random.split(jax.random.PRNGKey(0))[0])
    f = jax.jit(apply_fn(model))
    x = jnp.asarray(np.random.default_rng(0).random((3, 28, 28, 1), np.float32))
    z = f(params, x)
    assert z.shape == (3, 10)
    np.testing.assert_allclose(f(params, x[1]), z[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        apply_fn(model)(params, x[..., 0][0])


def test_optimizer_is_torch_sgd_with_cosine():
    """Two steps against the closed form: g' = g + wd*theta, m = mu*m + g',
    theta -= lr*(1+cos(pi t/T))/2 * m."""
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.9, weight_decay=0.01)
    T = 4
    tx = make_optimizer(cfg, steps_per_epoch=T)
    theta = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
    grads = [
        {"w": jnp.array([0.3, 0.1]), "b": jnp.array([-1.0])},
        {"w": jnp.array([-0.2, 0.4]), "b": jnp.array([2.0])},
    ]
    state = tx.init(theta)
    update = jax.jit(tx.update)  # one compile instead of many eager ops
    ref = {k: np.asarray(v, np.float64) for k, v in theta.items()}
    mom = {k: np.zeros_like(v) for k, v in ref.items()}
    for t, g in enumerate(grads):
        upd, state = update(g, state, theta)
        theta = jax.tree_util.tree_map(lambda a, b: a + b, theta, upd)
        eta = 0.1 * (1 + math.cos(math.pi * t / T)) / 2
        for k in ref:
            mom[k] = 0.9 * mom[k] + np.asarray(g[k]) + 0.01 * ref[k]
            ref[k] = ref[k] - eta * mom[k]
    for k in ref:
        np.testing.assert_allclose(np.asarray(theta[k]), ref[k], rtol=1e-6)
    d = TrainConfig()
    assert (
        d.model,
        d.n_train,
        d.batch_size,
        d.epochs,
        d.lr,
        d.momentum,
        d.weight_decay,
        d.schedule,
        d.seed,
    ) == ("lenet", 2000, 64, 100, 1e-3, 0.9, 5e-4, "cosine", 0)
    assert steps_per_epoch(d, 2000) == 32  # last batch of 16 kept


@pytest.fixture(scope="module")
def data():
    root = os.environ.get("LDJAX_DATA")
    if root and (Path(root) / "mnist").is_dir():
        return load_mnist(Path(root) / "mnist", "train")
    return load_default("train")  # 800 real digits; enough for N_TRAIN


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    x, y = data
    ckpt = tmp_path_factory.mktemp("full")
    steps = []

    def on_step(step, before, bx, by, after):
        steps.append((step, before, np.asarray(by), after, bx.shape))

    params, hist = train(CFG, x, y, ckpt_dir=ckpt, on_step=on_step, progress=False)
    return params, hist, steps, ckpt


def test_short_training_lowers_loss(data, full_run):
    x, y = data
    params, hist, _, _ = full_run
    loss0, acc0 = evaluate(initial_params(CFG), "lenet", x[:N_TRAIN], y[:N_TRAIN])
    loss1, acc1 = evaluate(params, "lenet", x[:N_TRAIN], y[:N_TRAIN])
    assert abs(loss0 - math.log(10)) < 0.15  # near-uniform predictions at init
    assert loss1 < loss0 - 0.2
    assert acc1 > acc0 + 0.15
    assert hist["epoch"] == [1, 2] and hist["loss"][1] < hist["loss"][0]
    assert len(hist["step_loss"]) == 2 * (N_TRAIN // 64)
    assert hist["lr"][-1] == pytest.approx(1.0 * (1 + math.cos(math.pi * 7 / 8)) / 2, rel=1e-5)


def test_on_step_hook_and_shuffling(data, full_run):
    _, y = data
    _, _, steps, _ = full_run
    spe = N_TRAIN // 64
    assert [s[0] for s in steps] == list(range(2 * spe))
    assert all(s[4] == (64, 28, 28, 1) for s in steps)
    for a, b in zip(steps, steps[1:]):  # params_after of step k is params_before of step k+1
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: u is v, a[3], b[1]))
    data_key = jax.random.split(jax.random.PRNGKey(CFG.seed))[1]
    for e in range(2):
        order = epoch_order(data_key, e, N_TRAIN)
        assert sorted(order.tolist()) == list(range(N_TRAIN))  # each row once per epoch
        seen = np.concatenate([s[2] for s in steps[e * spe : (e + 1) * spe]])
        np.testing.assert_array_equal(seen, y[:N_TRAIN][order])
    assert not np.array_equal(epoch_order(data_key, 0, N_TRAIN), epoch_order(data_key, 1, N_TRAIN))


def test_resume_is_bit_identical(data, full_run, tmp_path):
    x, y = data
    params_full, hist_full, _, ckpt_full = full_run
    assert sorted(p.name for p in ckpt_full.iterdir() if p.name.isdigit()) == ["1", "2"]

    class Crash(Exception):
        pass

    def crash(epoch, params):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        train(CFG, x, y, ckpt_dir=tmp_path, on_epoch=crash, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["1"]

    seen = []
    params, hist = train(
        CFG,
        x,
        y,
        ckpt_dir=tmp_path,
        resume=True,
        progress=False,
        on_epoch=lambda e, p: seen.append(e),
    )
    assert seen == [2]
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hist == hist_full

    with pytest.raises(ValueError, match="resume=True"):
        train(CFG, x, y, ckpt_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config.*'lr'"):
        train(
            TrainConfig(n_train=N_TRAIN, epochs=2, lr=0.5),
            x,
            y,
            ckpt_dir=tmp_path,
            resume=True,
            progress=False,
        )
    # resuming a finished run trains nothing and returns the final state
    params2, hist2 = train(CFG, x, y, ckpt_dir=ckpt_full, resume=True, progress=False)
    assert hist2 == hist_full
    np.testing.assert_array_equal(
        np.asarray(params2["fc3"]["kernel"]), np.asarray(params_full["fc3"]["kernel"])
    )


def test_bad_inputs(data):
    x, y = data
    with pytest.raises(ValueError, match="n_train=100000"):
        train(TrainConfig(n_train=100000), x, y, progress=False)
    with pytest.raises(ValueError, match="labels must lie"):
        train(CFG, x, y + 10, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
