"""The dense layers found in a jaxpr (ldjax/_src/dense_factors.py) and influence's
method="factored": which leaves are factored and which are rest, the tapped re-evaluation's factors
against jax.grad, and factored influence equal to "gram" and to a per-u ldjax.decompose (float64
to 1e-10, float32 to 1e-5) on the zoo MLP, LeNet (conv kernels rest) and the small transformer
(S > 1 positions, the DPO y⁺/y⁻ terms), a penzai GPT-NeoX (plain and scanned), and on 8 host
devices equal to one."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import precision, rel, small_model

import ldjax
from ldjax import losses
from ldjax._src import dense_factors
from ldjax._src import influence as influence_module

JOB = Path(__file__).with_name("influence_job.py")


def _paths(layers):
    return sorted(lay.path for lay in layers)


def test_mlp_kernels_are_factored_and_biases_are_rest():
    f, p, x_o, _ = small_model("mlp", "float32")
    layers = dense_factors.dense_layers(f, p, x_o[:1])
    assert _paths(layers) == [f"['dense_{k}']['kernel']" for k in range(3)]
    assert [(lay.positions, lay.d_in, lay.d_out) for lay in layers] == [
        (1, 12, 16),
        (1, 16, 16),
        (1, 16, 5),
    ]
    factored, rest = dense_factors.split_leaves(f, p, [x_o[:1]])
    paths = [jax.tree_util.keystr(q) for q, _ in jax.tree_util.tree_leaves_with_path(p)]
    assert [paths[k] for k in rest] == [f"['dense_{k}']['bias']" for k in range(3)]
    assert sorted(factored + rest) == list(range(len(paths)))


def test_shared_transposed_scanned_and_conv_weights_are_rest():
    def f(p, x):
        h = jnp.tanh(x @ p["tied"]) @ p["tied"]  # the same weight twice
        h = h @ p["t"].T  # transposed before the product: not a bare operand
        h = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["in_scan"]), None), h, None, length=2)[0]
        h = jax.jit(lambda a, w: a @ w)(h, p["via_jit"])  # followed into the jit
        h = jax.checkpoint(lambda a, w: jnp.tanh(a @ w))(h, p["remat"])  # and into checkpoint
        heads = jnp.tanh(jnp.einsum("ni,ihd->nhd", h, p["qkv"]))  # a 3-D weight, one dim contracted
        h = h + jnp.einsum("nhd,hdo->no", heads, p["out3"])  # two dims contracted
        return jnp.einsum("oi,ni->no", p["lhs"], h) + p["b"]  # the weight as the lhs

    p = {k: jnp.ones((3, 3)) for k in ("tied", "t", "in_scan", "via_jit", "remat", "lhs")}
    p["b"] = jnp.ones((3,))
    p["qkv"], p["out3"] = jnp.ones((3, 2, 4)), jnp.ones((2, 4, 3))
    layers = dense_factors.dense_layers(f, p, jnp.ones((1, 3)))
    assert _paths(layers) == ["['lhs']", "['out3']", "['qkv']", "['remat']", "['via_jit']"]
    by_path = {lay.path: lay for lay in layers}
    assert (by_path["['out3']"].d_in, by_path["['out3']"].d_out) == (8, 3)
    assert (by_path["['qkv']"].d_in, by_path["['qkv']"].d_out) == (3, 8)
    # the tapped re-evaluation through those calls gives the plain output and the factors
    q = {k: jnp.asarray(np.random.default_rng(3).normal(size=v.shape)) for k, v in p.items()}
    x = jnp.asarray([[0.3, -0.2, 0.5]])
    leaves = tuple(lay.leaf for lay in layers)
    taps = dense_factors.zero_taps(f, q, x, leaves)

    @jax.jit  # one program: the tapped output, its factors, and the plain gradient
    def both(taps):
        tapped = lambda t: dense_factors.apply_tapped(f, q, x, t, leaves)  # noqa: E731
        deltas = jax.grad(lambda t: jnp.sum(tapped(t)[0] ** 2))(taps)
        g = jax.grad(lambda w: jnp.sum(f(w, x) ** 2))(q)
        return tapped(taps) + (f(q, x), deltas, g)

    out, acts, plain, deltas, g = both(taps)
    assert rel(out, plain) < 1e-6
    for lay, a, d in zip(layers, acts, deltas):
        want = g[lay.path[2:-2]]
        assert rel(dense_factors.weight_grad(lay, a, d), want) < 1e-5
    # the zoo transformer: its 7 kernels at T = 7 positions; embeddings, LayerNorms, biases rest
    tf, tp, tx, _ = small_model("transformer", "float32")
    t_layers = dense_factors.dense_layers(tf, tp, tx[:1])
    assert len(t_layers) == 7 and {lay.positions for lay in t_layers} == {7}
    assert all(lay.path.endswith("['kernel']") for lay in t_layers)
    # LeNet: both conv kernels are rest, the three dense kernels factored
    lf, lp, lx, _ = small_model("lenet", "float32")
    assert _paths(dense_factors.dense_layers(lf, lp, lx[:1])) == [
        f"['dense_{k}']['kernel']" for k in range(3)
    ]


@pytest.mark.slow  # 3.5–5.5 s on 2 shared cores: the transformer's programs compile slowly
def test_tapped_factors_give_the_weight_gradients():
    with precision("float64"):
        f, p, _, x_u = small_model("transformer", "float64")
        x = x_u[:1]
        leaves, _ = dense_factors.split_leaves(f, p, [x])
        assert len(leaves) == 7  # q, k, v, out, fc_1, fc_2, unembed; embeddings and LN are rest
        layers = {lay.leaf: lay for lay in dense_factors.dense_layers(f, p, x)}
        assert {layers[k].positions for k in leaves} == {7}  # T positions per example
        taps = dense_factors.zero_taps(f, p, x, leaves)

        def loss(z):
            return jnp.sum(jnp.sin(z) * jnp.arange(z.size).reshape(z.shape))

        @jax.jit  # one program: the tapped output, its factors, and the plain gradient
        def both(taps):
            tapped = lambda t: dense_factors.apply_tapped(f, p, x, t, leaves)  # noqa: E731
            out, acts = tapped(taps)
            deltas = jax.grad(lambda t: loss(tapped(t)[0]))(taps)
            return out, f(p, x), acts, deltas, jax.grad(lambda q: loss(f(q, x)))(p)

        out, plain, acts, deltas, g = both(taps)
        assert rel(out, plain) < 1e-15
        g = jax.tree_util.tree_leaves(g)
        for k, a, d in zip(leaves, acts, deltas):
            assert a.shape == (7, layers[k].d_in) and d.shape == (7, layers[k].d_out)
            assert rel(a.T @ d, g[k]) < 1e-12


def test_tapped_factors_of_a_weight_on_the_lhs_at_four_positions():
    def loss(z):
        return jnp.sum(jnp.sin(z) * jnp.arange(z.size).reshape(z.shape))

    with precision("float64"):
        # the weight as a dot_general's lhs: g = (aᵀ δ)ᵀ
        fl = lambda q, x: jnp.einsum("oi,nti->nto", q["w"], x)  # noqa: E731
        q = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))}
        xl = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 3)))
        (lay,) = dense_factors.dense_layers(fl, q, xl)
        t0 = dense_factors.zero_taps(fl, q, xl, (0,))
        (d,) = jax.grad(lambda t: loss(dense_factors.apply_tapped(fl, q, xl, t, (0,))[0]))(t0)
        (a,) = dense_factors.apply_tapped(fl, q, xl, t0, (0,))[1]
        gw = jax.grad(lambda w: loss(fl(w, xl)))(q)["w"]
        assert (lay.positions, lay.d_in, lay.d_out) == (4, 3, 5)
        assert rel(a.T @ d, gw.T) < 1e-12
        assert rel(dense_factors.weight_grad(lay, a, d), gw) < 1e-12


def _per_u(f, p, x_o, x_u, kw_u, eta):
    return [
        np.asarray(
            ldjax.decompose(
                f,
                p,
                x_o,
                x_u[u : u + 1],
                losses.sft,
                eta=eta,
                loss_kwargs={k: v[u : u + 1] for k, v in kw_u.items()},
            ).delta_logp_linear
        )
        for u in range(len(x_u))
    ]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_factored_equals_gram_and_decompose_on_the_mlp(dtype):
    tol = 1e-10 if dtype == "float64" else 1e-5
    with precision(dtype):
        f, p, x_o, x_u = small_model("mlp", dtype)
        x_u = jnp.concatenate([x_u, 0.5 * x_u[::-1] + 0.1])
        y_u, y_o = jnp.array([0, 3, 4, 1]), jnp.array([2, 2, 0])
        kw = dict(eta=0.01, loss_kwargs=dict(targets=y_u), targets_o=y_o, chunk_size=3)
        fac = ldjax.influence(f, p, x_u, x_o, losses.sft, method="factored", **kw)
        assert fac.method == "factored" and fac.delta.shape == (4, 3, 5)
        per_u = np.stack(_per_u(f, p, x_o, x_u, dict(targets=y_u), 0.01))
        for u in range(4):
            assert rel(fac.delta[u], per_u[u]) < tol
        if dtype == "float64":  # the kept-rows algorithm gives the same numbers
            gram = ldjax.influence(f, p, x_u, x_o, losses.sft, method="gram", **kw)
            assert rel(fac.delta, gram.delta) < tol
        else:  # the TracIn matrix: only each probe's own class
            tgt = ldjax.influence(
                f, p, x_u, x_o, losses.sft, method="factored", target_only=True, **kw
            )
            picked = -per_u[:, np.arange(3), np.asarray(y_o)]
            assert tgt.delta.shape == (4, 3) and rel(tgt.delta_loss_o, picked) < tol


@pytest.mark.slow  # ~10 s on 2 cores: LeNet's per-example programs compile slowly
def test_factored_on_lenet_conv_rest_dense_factored():
    with precision("float64"):
        f, p, x_o, x_u = small_model("lenet", "float64")
        y_u, y_o = jnp.array([0, 3]), jnp.array([2, 7])
        kw = dict(eta=0.01, loss_kwargs=dict(targets=y_u), targets_o=y_o)
        fac = ldjax.influence(f, p, x_u, x_o, losses.sft, method="factored", **kw)
        gram = ldjax.influence(f, p, x_u, x_o, losses.sft, method="gram", **kw)
        assert rel(fac.delta, gram.delta) < 1e-10
        for u, d in enumerate(_per_u(f, p, x_o, x_u, dict(targets=y_u), 0.01)):
            assert rel(fac.delta[u], d) < 1e-10


def test_auto_picks_factored_by_cost_and_bad_arguments_are_named():
    f, p, x_o, x_u = small_model("mlp", "float32")
    kw = dict(loss_kwargs=dict(targets=jnp.array([1, 2])), targets_o=jnp.array([0, 1, 2]))
    costs = influence_module.method_costs(f, p, x_o, n_u=2, n_o=3, readouts=1)
    # per pair: 2·P_rest·R + Σ_k 2·(d_in + R·d_out) + 2R, P_rest = the 37 biases
    pair = 2 * 37 + 2 * ((12 + 16) + (16 + 16) + (16 + 5)) + 3 * 2
    assert costs["factored"] - 3 * costs["forward"] * 3 == pytest.approx(pair * 2 * 3)
    assert costs["factored"] < costs["gram"]
    inf = ldjax.influence(f, p, x_u, x_o, losses.sft, eta=0.1, target_only=True, **kw)
    assert inf.method == "factored"
    # a budget the probes' factors do not fit: not factored
    small = ldjax.influence(
        f, p, x_u, x_o, losses.sft, eta=0.1, target_only=True, memory_budget=64, **kw
    )
    assert small.method == "jvp"
    # kernel norms need the full rows: gram
    full = ldjax.influence(f, p, x_u, x_o, losses.sft, eta=0.1, kernel_norms=True, **kw)
    assert full.method == "gram"
    import optax

    with pytest.raises(ValueError, match="optimizer"):
        ldjax.influence(
            f, p, x_u, x_o, losses.sft, optimizer=optax.sgd(0.1), method="factored", **kw
        )
    with pytest.raises(ValueError, match="kernel_norms"):
        ldjax.influence(
            f, p, x_u, x_o, losses.sft, eta=0.1, method="factored", kernel_norms=True, **kw
        )


def _job(args):
    r = subprocess.run(
        [sys.executable, str(JOB)] + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.slow  # four subprocess jobs
def test_factored_on_eight_host_devices_equals_one_device_and_gram(tmp_path):
    for model in ("mlp", "lenet"):
        base = ["--model", model, "--n-u", 16]
        _job([tmp_path / f"{model}_gram", "--npz", tmp_path / f"{model}_gram.npz"] + base)
        out = _job(
            [tmp_path / f"{model}_8", "--npz", tmp_path / f"{model}_8.npz", "--method", "factored"]
            + ["--devices", 8, "--o-devices", 2]
            + base
        )
        assert "{'u': 4, 'o': 2}" in out
        gram, eight = (np.load(tmp_path / f"{model}_{k}.npz") for k in ("gram", "8"))
        for k in ("delta", "delta_loss_o"):
            assert rel(eight[k], gram[k]) < 1e-5
    _job([tmp_path / "mlp_1", "--npz", tmp_path / "mlp_1.npz", "--method", "factored"])
    _job(
        [tmp_path / "mlp_8b", "--npz", tmp_path / "mlp_8b.npz", "--method", "factored"]
        + ["--devices", 8]
    )
    one, eight = (np.load(tmp_path / f"mlp_{k}.npz") for k in ("1", "8b"))
    assert rel(eight["delta"], one["delta"]) < 1e-6


@pytest.mark.slow  # ~60 s: penzai models compile slowly on 2 cores
def test_factored_on_a_penzai_gpt_neox_plain_and_scanned():
    """Nothing in the discovery knows the model: a penzai GPT-NeoX (named-axis einsums, 3-D
    attention weights) gets its attention (q, k, v, output: 3-D, one or two dims contracted), MLP
    and head weights factored (6 per block and the head), the rest (norms, embeddings; everything
    inside the scanned LayerStack) contracted as gram."""
    pytest.importorskip("penzai")
    import ldjax.llm as llm

    rng = np.random.default_rng(0)
    xo, xp, xn = (jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32) for _ in range(3))
    m = jnp.zeros((2, 5), bool).at[:, 1:4].set(True)
    yo, mo = jnp.roll(xo, -1, 1), jnp.ones((2, 5), bool).at[:, -1].set(False)
    with precision("float64"):
        for stack, n_factored in ((False, 13), (True, 1)):
            cfg = llm.gpt_neox_config(
                "tiny", vocab_size=11, dtype=jnp.float64, use_layer_stack=stack
            )
            f, p = llm.from_penzai(llm.build_gpt_neox(cfg, seed=0), dtype=jnp.float64)
            layers = dense_factors.dense_layers(f, p, xo[:1])
            assert len(layers) == n_factored and "lm_head" in layers[-1].path
            kw = dict(
                targets_pos=jnp.roll(xp, -1, 1),
                targets_neg=jnp.roll(xn, -1, 1),
                mask_pos=m,
                mask_neg=m,
                ref_logp_pos=jnp.asarray([0.1, -0.3]),
                ref_logp_neg=jnp.asarray([-0.2, 0.4]),
                beta=0.5,
            )
            got = {
                method: ldjax.influence(
                    f,
                    p,
                    (xp, xn),
                    xo,
                    losses.dpo,
                    eta=1e-3,
                    loss_kwargs=kw,
                    targets_o=yo,
                    mask_o=mo,
                    method=method,
                )
                for method in ("factored", "gram")
            }
            for k in (0, 1):
                assert rel(got["factored"].terms[k], got["gram"].terms[k]) < 1e-10
            assert np.abs(np.asarray(got["gram"].terms[1])).max() > 0
