"""Real-LLM adapter (ldjax.llm, penzai): a tiny random-init GPT-NeoX, built offline, through the
engine's paths: eNTK = the jacrev definition (float64), decompose vs actual_step (η² slope),
influence and the projected eNTK; penzai's scanned LayerStack and a plain scanned, remat'd model.

Every JAX compile of a penzai model takes 10–20 s on the shared 2-core machine: everything that
compiles one is in the slow tier. The fast tier checks the text layout (no compile)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jacrev_entk, precision, rel

import ldjax
from ldjax import losses

pytest.importorskip("penzai")
import ldjax.llm as llm  # noqa: E402

V = 11  # tiny vocabulary: K blocks (N_o, N_u, T, T, V, V) stay small


def _record():
    path = os.path.join(os.environ.get("LDJAX_DATA", ""), "hh_probe", "formal_prob_train.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline())
    return {
        "prompt": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Why?\n\nAssistant:",
        "chosen": " Because.",
        "rejected": " No.",
        "irr_train": " Something else.",
    }


# ------------------------------------------------------------------------------ fast: text layout


def test_hh_messages_and_probe_layout():
    rec = _record()
    msgs = llm.hh_messages(rec["prompt"])
    assert msgs and msgs[0]["role"] == "user" and msgs[-1]["role"] == "user"
    assert all(m["content"] and "Human:" not in m["content"] for m in msgs)
    tok = llm.load_tokenizer("tiny-random")
    types, o = llm.probe_arrays(tok, rec, max_len=96, max_prompt_len=48)
    assert o["tokens"].shape == (len(types), 96) and len(types) >= 3
    assert types[0] == "chosen"
    # the mask selects the positions whose target is a response token (EOS included)
    for k, t in enumerate(types):
        ids = tok.encode(rec[t])[: int(o["mask"][k].sum()) - 1] + [tok.eos_id]
        assert o["targets"][k][o["mask"][k]].tolist() == ids
    pos, neg = llm.pair_arrays(tok, rec, max_len=96, max_prompt_len=48)
    assert pos["tokens"].shape == neg["tokens"].shape == (1, 96)
    np.testing.assert_array_equal(pos["tokens"], o["tokens"][:1])


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="pythia-410m"):
        llm.gpt_neox_config("pythia-7x")
    with pytest.raises(ValueError, match="bogus"):
        llm.gpt_neox_config("tiny", bogus=1)


# ------------------------------------------------------------------------------ slow: the engine


def _tiny(stack=False, dtype=jnp.float64, seed=0):
    cfg = llm.gpt_neox_config("tiny", vocab_size=V, dtype=dtype, use_layer_stack=stack)
    return llm.from_penzai(llm.build_gpt_neox(cfg, seed=seed), dtype=dtype)


def _dpo_kw(f, p, xp, xn, m):
    tp, tn = jnp.roll(xp, -1, 1), jnp.roll(xn, -1, 1)
    ref_p = losses.sequence_logprob(f(p, xp), tp, m) + 0.3
    ref_n = losses.sequence_logprob(f(p, xn), tn, m) - 0.2
    return dict(
        targets_pos=tp,
        targets_neg=tn,
        mask_pos=m,
        mask_neg=m,
        ref_logp_pos=ref_p,
        ref_logp_neg=ref_n,
        beta=0.5,
    )


def _tokens(n, t, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (n, t)), jnp.int32)


@pytest.mark.slow
def test_penzai_logits_and_entk_equal_the_jacrev_definition_float64():
    with precision("float64"):
        model = llm.build_gpt_neox(llm.gpt_neox_config("tiny", vocab_size=V, dtype=jnp.float64))
        xo, xu = _tokens(2, 4, 0), _tokens(1, 4, 1)
        # the adapter is the model: the same logits as penzai's own call
        from penzai import pz

        f, p = llm.from_penzai(model)
        direct = model(pz.nx.wrap(xo).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")
        assert rel(f(p, xo), direct) == 0.0
        p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)  # as dtype= does
        K_def = np.asarray(jacrev_entk(f, p, xo, xu))
        assert K_def.shape == (2, 1, 4, 4, V, V)
        for impl in ("auto", "structured"):
            K = ldjax.entk(f, p, xo, xu, implementation=impl)
            assert rel(K, K_def) <= 1e-12, impl
        v = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, V)))
        assert rel(ldjax.entk_vp(f, p, xo, xu, v), np.einsum("oumlij,ulj->omi", K_def, v)) <= 1e-12


@pytest.mark.slow
def test_penzai_dpo_decompose_vs_actual_step_eta_squared():
    """One DPO step on a random GPT-NeoX: ‖Δz_actual − (−η K G)‖ falls as η² (float64)."""
    with precision("float64"):
        f, p = _tiny()
        xo, xp, xn = _tokens(3, 6, 3), _tokens(1, 6, 4), _tokens(1, 6, 5)
        m = jnp.zeros((1, 6), bool).at[:, 2:5].set(True)
        kw = _dpo_kw(f, p, xp, xn, m)
        etas = np.logspace(-4, -1.5, 5)
        errs = []
        for eta in etas:
            d = ldjax.decompose(f, p, xo, (xp, xn), losses.dpo, eta=eta, loss_kwargs=kw)
            a = ldjax.actual_step(f, p, xo, (xp, xn), losses.dpo, eta=eta, loss_kwargs=kw)
            errs.append(float(np.linalg.norm(np.asarray(a.delta_logits - d.delta_logits))))
            if eta == etas[0]:
                assert rel(d.delta_logits, a.delta_logits) <= 1e-3
        slope = np.polyfit(np.log(etas), np.log(errs), 1)[0]
        assert abs(slope - 2) <= 0.1, (slope, errs)


@pytest.mark.slow
def test_penzai_influence_and_projected_entk_through_the_adapter():
    """The batch influence job's sequence readout equals decompose's A·(−ηKG) summed on the
    response; the projected eNTK's estimate is within its standard error of the exact trace."""
    with precision("float64"):
        f, p = _tiny()
        xo, xp, xn = _tokens(2, 5, 6), _tokens(1, 5, 7), _tokens(1, 5, 8)
        m = jnp.zeros((1, 5), bool).at[:, 1:4].set(True)
        kw = _dpo_kw(f, p, xp, xn, m)
        yo, mo = jnp.roll(xo, -1, 1), jnp.ones((2, 5), bool).at[:, -1].set(False)
        eta = 1e-3
        inf = ldjax.influence(
            f, p, (xp, xn), xo, losses.dpo, eta=eta, loss_kwargs=kw, targets_o=yo, mask_o=mo
        )
        d = ldjax.decompose(f, p, xo, (xp, xn), losses.dpo, eta=eta, loss_kwargs=kw)
        lin = np.take_along_axis(np.asarray(d.delta_logp_linear), np.asarray(yo)[..., None], -1)
        seq = (lin[..., 0] * np.asarray(mo)).sum(-1)
        assert rel(np.asarray(inf.delta)[0], seq) <= 1e-10
        exact = ldjax.entk(f, p, xo, xp, reduction="trace")
        est = ldjax.entk(
            f,
            p,
            xo,
            xp,
            reduction="trace",
            implementation="projected",
            dim=4096,
            key=jax.random.key(0),
        )
        assert rel(est, exact) <= 0.2


@pytest.mark.slow
def test_penzai_layer_stack_scan_works_exactly():
    """use_layer_stack=True: the blocks run under jax.lax.scan. The structured eNTK reads the
    scanned weights' Jacobian rows (no structured site inside a scan) and stays exact."""
    with precision("float64"):
        f, p = _tiny(stack=True)
        xo, xu = _tokens(2, 4, 9), _tokens(1, 4, 10)
        assert p["transformer/blocks/attention/query/Linear.weights"].shape[0] == 2  # stacked
        K = ldjax.entk(f, p, xo, xu, implementation="structured")
        assert rel(K, jacrev_entk(f, p, xo, xu)) <= 1e-12
        m = jnp.ones((1, 4), bool)
        kw = dict(targets=jnp.roll(xu, -1, 1), mask=m)
        # first order: the relative error is O(η) (1.2e-3 at η = 1e-4)
        d = ldjax.decompose(f, p, xo, xu, losses.sft, eta=1e-5, loss_kwargs=kw)
        a = ldjax.actual_step(f, p, xo, xu, losses.sft, eta=1e-5, loss_kwargs=kw)
        assert rel(d.delta_logits, a.delta_logits) <= 1e-3


def scanned_remat_lm(n_layers=3, d=8, v=V, seed=0):
    """A plain-JAX LM with its layers stacked under ``lax.scan`` and each layer under
    ``jax.checkpoint`` (remat): ``(apply_fn, params)``. Also the byom guide's example."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "embed": jax.random.normal(k[0], (v, d)) / np.sqrt(d),
        "w1": jax.random.normal(k[1], (n_layers, d, 2 * d)) / np.sqrt(d),
        "w2": jax.random.normal(k[2], (n_layers, 2 * d, d)) / np.sqrt(2 * d),
        "head": jax.random.normal(k[3], (d, v)) / np.sqrt(d),
    }

    @jax.checkpoint
    def layer(h, w):
        w1, w2 = w
        mix = jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1)[:, None]  # causal mean
        return h + jnp.tanh((h + mix) @ w1) @ w2, None

    def apply_fn(params, tokens):
        h = params["embed"][tokens]
        h, _ = jax.lax.scan(layer, h, (params["w1"], params["w2"]))
        return h @ params["head"]

    return apply_fn, params


@pytest.mark.slow
def test_plain_scan_and_remat_model_works_exactly():
    with precision("float64"):
        f, p = scanned_remat_lm()
        p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
        xo, xu = _tokens(2, 5, 11), _tokens(1, 5, 12)
        K_def = jacrev_entk(f, p, xo, xu)
        for impl in ("auto", "structured", "vp"):
            assert rel(ldjax.entk(f, p, xo, xu, implementation=impl), K_def) <= 1e-12, impl
        m = jnp.ones((1, 5), bool)
        kw = dict(targets=jnp.roll(xu, -1, 1), mask=m)
        etas = (1e-3, 1e-2)
        errs = []
        for eta in etas:
            d = ldjax.decompose(f, p, xo, xu, losses.sft, eta=eta, loss_kwargs=kw)
            a = ldjax.actual_step(f, p, xo, xu, losses.sft, eta=eta, loss_kwargs=kw)
            errs.append(float(np.linalg.norm(np.asarray(a.delta_logits - d.delta_logits))))
        assert np.log(errs[1] / errs[0]) / np.log(10) == pytest.approx(2.0, abs=0.1)


def test_dynamic_while_loop_fails_naming_the_construct():
    """A layer loop with a data-dependent trip count (lax.while_loop) has no reverse-mode
    derivative: the engine's error is JAX's, naming while_loop (write the loop as a scan)."""

    def apply_fn(p, x):
        n = jnp.asarray(x.shape[1]) // x.shape[1] * 2  # a traced bound: a while_loop
        h = jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ p["w"]), x)
        return h @ p["head"]

    p = {"w": jnp.eye(3) * 0.5, "head": jnp.ones((3, 4))}
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="while_loop"):
        ldjax.decompose(
            apply_fn, p, x, x, losses.sft, eta=0.1, loss_kwargs=dict(targets=jnp.array([0, 1]))
        )


@pytest.mark.parametrize(
    "name",
    [
        "ldjax.llm.text",
        pytest.param("ldjax.llm.penzai_adapter", marks=pytest.mark.slow),
        pytest.param("ldjax.llm", marks=pytest.mark.slow),
    ],
)
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
