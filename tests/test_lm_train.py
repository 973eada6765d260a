"""LM training phases: resume is exact, the losses are ldjax.losses, masks, on-policy sampling."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldjax import losses
from ldjax.data.synthetic import generate_preferences
from ldjax.lm import train as T
from ldjax.lm.config import (
    DEFAULT,
    QUICK,
    PipelineConfig,
    PreferenceConfig,
    PretrainConfig,
    SFTConfig,
    load_config,
)
from ldjax.lm.model import LMConfig, init_params, make_apply_fn
from ldjax.lm.tokenizer import ByteTokenizer

LM = LMConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=48)
PL = 16  # max prompt tokens
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def records():
    return generate_preferences(20, seed=3)


@pytest.fixture(scope="module")
def p0():
    return init_params(LM, jax.random.PRNGKey(0))


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_resume_after_checkpoint_is_bit_identical(records, p0, tmp_path):
    cfg = SFTConfig(lr=3e-3, warmup=2, batch_size=4, steps=8, epochs=0.0, ckpt_every=4, seed=1)
    full = T.sft(p0, LM, records, cfg, max_prompt_len=PL, progress=False)
    d = tmp_path / "ckpt"
    part = T.sft(p0, LM, records, cfg, max_prompt_len=PL, ckpt_dir=d, stop_at=6, progress=False)
    assert not part.completed and part.step == 6  # checkpoints at 4 and 6 (the stop)
    assert not _leaves_equal(part.params, full.params)
    evals = []
    rest = T.sft(
        p0,
        LM,
        records,
        cfg,
        max_prompt_len=PL,
        ckpt_dir=d,
        resume=True,
        progress=False,
        on_eval=lambda s, p: evals.append(s),
    )
    assert rest.resumed_from == 6 and rest.completed
    assert _leaves_equal(
        rest.params, full.params
    )  # same data order (epoch 2 reshuffled), optimizer state
    assert rest.history["loss"] == full.history["loss"]
    assert evals == [8]  # no step-0 evaluation when resuming; the final one runs
    # a finished phase resumes to its result without training
    again = T.sft(p0, LM, records, cfg, max_prompt_len=PL, ckpt_dir=d, resume=True, progress=False)
    assert again.resumed_from == 8 and _leaves_equal(again.params, full.params)
    # without resume, a used folder is an error; another config cannot resume it
    with pytest.raises(ValueError, match="already holds"):
        T.sft(p0, LM, records, cfg, max_prompt_len=PL, ckpt_dir=d, progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        T.sft(
            p0,
            LM,
            records,
            dataclasses.replace(cfg, lr=1e-3),
            max_prompt_len=PL,
            ckpt_dir=d,
            resume=True,
            progress=False,
        )


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_sft_step_uses_engine_loss_and_response_mask(records, p0):
    """With SGD (no warm-up, no clip) one step is θ − η ∇[Σ_n sft_n / Σ mask]; the logged loss
    is −Σ sequence_logprob / Σ mask and only response positions count."""
    eta = 0.5
    cfg = SFTConfig(
        optimizer="sgd", lr=eta, warmup=0, grad_clip=None, batch_size=4, steps=1, epochs=0.0
    )
    res = T.sft(p0, LM, records, cfg, max_prompt_len=PL, progress=False)
    data = T.sft_examples(TOK, records, max_len=LM.max_len, max_prompt_len=PL)
    idx = T.batch_indices(T._keys(cfg)[0], 0, len(records), 4)
    b = {k: v[idx] for k, v in data.items()}
    assert np.array_equal(res.last_batch["tokens"], b["tokens"])
    f = jax.jit(make_apply_fn(LM))  # eager forward passes would compile op by op
    lp = losses.sequence_logprob(f(p0, b["tokens"]), b["targets"], b["mask"])
    ntok = b["mask"].sum()
    assert res.history["loss"][0] == pytest.approx(float(-lp.sum() / ntok), rel=1e-5)
    assert res.history["seq_loss"][0] == pytest.approx(float(-lp.mean()), rel=1e-5)
    assert res.history["tokens"][0] == ntok
    # mask = response tokens + EOS of each example, nothing of the prompt
    for i, n in enumerate(idx):
        assert b["mask"][i].sum() == min(
            len(TOK.encode(records[n]["chosen"])) + 1,
            LM.max_len - 1 - len(TOK.encode(records[n]["prompt"])[-PL:]),
        )
    obj = lambda p: (
        -jnp.sum(losses.sequence_logprob(f(p, b["tokens"]), b["targets"], b["mask"])) / ntok
    )
    g = jax.jit(jax.grad(obj))(p0)
    expect = jax.tree_util.tree_map(lambda p, gg: p - eta * gg, p0, g)
    for a, e in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(expect)):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6)
    # targets outside the mask (prompt positions) do not change the loss
    t2 = np.where(b["mask"], b["targets"], (b["targets"] + 7) % 256)
    lp2 = losses.sequence_logprob(f(p0, b["tokens"]), t2, b["mask"])
    np.testing.assert_allclose(lp2, lp, rtol=1e-6)


def test_extend_trains_on_chosen_and_rejected(records):
    d = T.sft_examples(TOK, records, max_len=LM.max_len, max_prompt_len=PL, extend=True)
    assert d["tokens"].shape == (2 * len(records), LM.max_len)
    rej = T.sft_examples(
        TOK, [dict(r, chosen=r["rejected"]) for r in records], max_len=LM.max_len, max_prompt_len=PL
    )
    assert np.array_equal(d["tokens"][len(records) :], rej["tokens"])


@pytest.mark.parametrize("loss", ["dpo", "ipo", "slic", "sppo"])
def test_pair_hyperparameters_reach_the_engine_loss(loss):
    cfg = PreferenceConfig(loss=loss, beta=0.25, delta=2.0, lam=0.5, c=3.0)
    rng = np.random.default_rng(0)
    zp, zn = (jnp.asarray(rng.normal(size=(2, 5, 7))) for _ in range(2))
    kw = dict(
        targets_pos=jnp.zeros((2, 5), int),
        targets_neg=jnp.ones((2, 5), int),
        ref_logp_pos=jnp.array([-1.0, -2.0]),
        ref_logp_neg=jnp.array([-3.0, -1.0]),
    )
    got = losses.PAIRWISE[loss](zp, zn, **kw, **T._pair_kwargs(cfg))
    want = {
        "dpo": lambda: losses.dpo(zp, zn, **kw, beta=0.25),
        "ipo": lambda: losses.ipo(zp, zn, **kw, beta=0.25),
        "slic": lambda: losses.slic(zp, zn, **kw, delta=2.0, lam=0.5),
        "sppo": lambda: losses.sppo(zp, zn, **kw, beta=0.25, c=3.0),
    }[loss]()
    np.testing.assert_allclose(got, want)
    assert not np.allclose(got, losses.PAIRWISE[loss](zp, zn, **kw))  # the defaults differ


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
@pytest.mark.parametrize("loss", ["dpo"])
def test_preference_loss_is_engine_loss(records, p0, loss):
    ref = init_params(LM, jax.random.PRNGKey(5))  # a reference unlike the policy: r± ≠ 0
    cfg = PreferenceConfig(
        loss=loss, optimizer="sgd", lr=0.1, warmup=0, batch_size=4, steps=1, epochs=0.0, beta=0.2
    )
    res = T.preference(p0, ref, LM, records, cfg, max_prompt_len=PL, progress=False)
    pos, neg = T.pair_examples(TOK, records, max_len=LM.max_len, max_prompt_len=PL)
    idx = T.batch_indices(T._keys(cfg)[0], 0, len(records), 4)
    f = jax.jit(make_apply_fn(LM))  # eager forward passes would compile op by op
    kw = dict(
        targets_pos=pos["targets"][idx],
        targets_neg=neg["targets"][idx],
        mask_pos=pos["mask"][idx],
        mask_neg=neg["mask"][idx],
        beta=0.2,
    )
    ref_p = losses.sequence_logprob(
        f(ref, pos["tokens"][idx]), pos["targets"][idx], pos["mask"][idx]
    )
    ref_n = losses.sequence_logprob(
        f(ref, neg["tokens"][idx]), neg["targets"][idx], neg["mask"][idx]
    )
    expect = losses.PAIRWISE[loss](
        f(p0, pos["tokens"][idx]),
        f(p0, neg["tokens"][idx]),
        ref_logp_pos=ref_p,
        ref_logp_neg=ref_n,
        **kw,
    ).mean()
    assert res.history["loss"][0] == pytest.approx(float(expect), rel=1e-4)
    assert abs(res.history["margin"][0]) > 1e-3  # the reference really entered


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_on_policy_negatives_are_model_samples(records, p0):
    cfg = PreferenceConfig(
        on_policy=True, lr=1e-3, warmup=0, batch_size=4, steps=1, epochs=0.0, max_new_tokens=12
    )
    res = T.preference(p0, p0, LM, records, cfg, max_prompt_len=PL, progress=False)
    b = res.last_batch
    idx = T.batch_indices(T._keys(cfg)[0], 0, len(records), 4)
    _, neg = T.pair_examples(TOK, records, max_len=LM.max_len, max_prompt_len=PL)
    assert not np.array_equal(b["neg_tokens"], neg["tokens"][idx])  # not the dataset's y⁻
    from ldjax.data.preferences import encode_prompt

    prompts = [encode_prompt(TOK, records[i]["prompt"], max_prompt_len=PL) for i in idx]
    smp = T.sample_responses(
        p0, LM, prompts, jax.random.fold_in(T._keys(cfg)[1], 0), max_new_tokens=12
    )
    assert np.array_equal(b["neg_tokens"], smp["tokens"])  # the policy's samples at step 0
    assert np.array_equal(b["pos_tokens"][:, :5], b["neg_tokens"][:, :5])  # same prompts
    assert b["neg_mask"].sum(1).max() <= 12 and b["neg_mask"].sum(1).min() >= 1


def test_encode_texts_targets_every_token_once():
    texts = ["hello world", "x" * 100]
    d = T.encode_texts(TOK, texts, 16)
    got = [int(t) for row, m in zip(d["targets"], d["mask"]) for t in row[m]]
    want = [t for s in texts for t in TOK.encode(s) + [TOK.eos_id]]
    assert got == want
    assert d["tokens"][0, 0] == TOK.bos_id
    d = T.encode_texts(TOK, texts, 16, eos=False)  # the pipeline's prompt pretraining: no EOS
    assert [int(t) for row, m in zip(d["targets"], d["mask"]) for t in row[m]] == [
        t for s in texts for t in TOK.encode(s)
    ]


def test_lr_schedule_and_optimizer():
    s = T.lr_schedule(PretrainConfig(lr=1.0, warmup=4, schedule="linear", steps=12), 12)
    np.testing.assert_allclose(
        [float(s(t)) for t in (0, 2, 4, 8, 12)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6
    )
    # RMSprop with PyTorch's update: ν = 0.01 g² on step one, Δθ = −η g / (√ν + 1e-8)
    tx = T.make_optimizer(SFTConfig(lr=1.0, warmup=0, grad_clip=None, steps=1), 1)
    g = {"w": jnp.array([2.0, -0.5])}
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], -g["w"] / (np.sqrt(0.01) * np.abs(g["w"]) + 1e-8), rtol=1e-5)
    tx = T.make_optimizer(SFTConfig(lr=1.0, optimizer="sgd", warmup=0, grad_clip=10.0, steps=1), 1)
    u, _ = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(g))
    np.testing.assert_allclose(u["w"], [-6.0, -8.0], rtol=1e-6)  # clipped to global norm 10


def test_config_json_roundtrip_and_errors(tmp_path):
    path = tmp_path / "c.json"
    QUICK.to_json(path)
    assert load_config(path) == QUICK
    (tmp_path / "p.json").write_text(json.dumps({"sft": {"extend": True, "lr": 0.01}}))
    c = load_config(tmp_path / "p.json", QUICK)
    assert c.sft.extend and c.sft.lr == 0.01 and c.model == QUICK.model
    (tmp_path / "bad.json").write_text(json.dumps({"sft": {"lrr": 1}}))
    with pytest.raises(ValueError, match="lrr"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="loss must be one of"):
        PipelineConfig.from_dict({"preference": {"loss": "kto"}})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.json")
    assert DEFAULT.lm_config().max_len == 256 and DEFAULT.model.n_heads == 2
    assert DEFAULT.sft.optimizer == DEFAULT.preference.optimizer == "rmsprop"
    assert DEFAULT.sft.grad_clip == 10.0 and DEFAULT.preference.beta == 0.1
