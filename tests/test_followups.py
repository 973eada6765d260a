"""The follow-up analyses (ldjax.experiments.followups): closed forms of their statistics, the
per-pair measurements and the GRPO decomposition against ldjax.decompose / actual_step, and
(slow) the end-to-end ``ldjax reproduce followups --quick`` with its numbers re-derived."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldjax
from ldjax import losses
from ldjax.experiments.followups import config as C
from ldjax.experiments.followups import entanglement, grpo, pairs
from ldjax.experiments.stats import OUTCOMES, pearson, spearman
from ldjax.lm.model import LMConfig, init_params, make_apply_fn

LM = LMConfig(vocab_size=259, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=24)


def test_comovement_closed_form():
    k = entanglement.comovement([1.0, 1.0, 1.0, 0.0, 2.0], [1.0, -1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(k, [1.0, -1.0, 0.0, 0.0, 0.8])


def test_jackknife_pseudo_values_of_the_mean_are_the_data():
    x = np.array([3.0, -1.0, 4.0, 1.0, 5.0])
    np.testing.assert_allclose(entanglement.jackknife(np.mean, x), x, atol=1e-12)
    # of a correlation: their mean is the jackknife estimate n·r − (n−1)·mean(r_{−i})
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=12), rng.normal(size=12)
    pv = entanglement.jackknife(pearson, a, b)
    loo = [pearson(np.delete(a, i), np.delete(b, i)) for i in range(12)]
    assert np.isclose(pv.mean(), 12 * pearson(a, b) - 11 * np.mean(loo))


def test_ches_closed_form():
    h_pos = np.array([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # the 3rd position is masked
    h_neg = np.array([[[2.0, 0.0], [5.0, 5.0], [1.0, 1.0]]])
    m_pos = np.array([[True, True, False]])
    m_neg = np.array([[True, False, True]])
    # H⁺ = (1, 1), H⁻ = (3, 1): ⟨H⁺,H⁻⟩ − ‖H⁺‖² = 4 − 2
    np.testing.assert_allclose(pairs.ches(h_pos, m_pos, h_neg, m_neg), [2.0])
    # ln-CHES: means (½, ½), (3/2, ½): 1 − ½
    np.testing.assert_allclose(pairs.ches(h_pos, m_pos, h_neg, m_neg, normalize=True), [0.5])


def _pairs(n=3, t=LM.max_len, seed=0):
    rng = np.random.default_rng(seed)

    def side():
        tok = rng.integers(0, 256, (n, t)).astype(np.int32)
        tgt = np.roll(tok, -1, 1)
        m = np.zeros((n, t), bool)
        m[:, 6 : t - 4 - seed] = True
        return {"tokens": tok, "targets": tgt, "mask": m}

    return side(), side()


def _seq(delta_logp, d):  # Σ_t mask_t Δlog π(target_t), (N,)
    got = jnp.take_along_axis(delta_logp, jnp.asarray(d["targets"])[..., None], -1)[..., 0]
    return np.asarray((got * d["mask"]).sum(1))


@pytest.mark.slow
def test_measure_pairs_matches_ldjax_decompose_and_actual_step():
    params = init_params(LM, jax.random.PRNGKey(0))
    pos, neg = _pairs()
    beta, eta = 0.1, 0.05
    m = pairs.measure_pairs(params, LM, pos, neg, beta=beta, eta=eta)
    apply_fn = make_apply_fn(LM)
    i = 1
    one = lambda d: {k: jnp.asarray(v[i : i + 1]) for k, v in d.items()}
    p, n = one(pos), one(neg)
    lp = lambda d: losses.sequence_logprob(apply_fn(params, d["tokens"]), d["targets"], d["mask"])
    kw = dict(
        targets_pos=p["targets"],
        targets_neg=n["targets"],
        mask_pos=p["mask"],
        mask_neg=n["mask"],
        ref_logp_pos=lp(p),
        ref_logp_neg=lp(n),
        beta=beta,
    )
    xu = (p["tokens"], n["tokens"])
    for d, key in ((p, "pos"), (n, "neg")):
        dec = ldjax.decompose(
            apply_fn, params, d["tokens"], xu, losses.dpo, eta=eta, loss_kwargs=kw
        )
        act = ldjax.actual_step(
            apply_fn, params, d["tokens"], xu, losses.dpo, eta=eta, loss_kwargs=kw
        )
        np.testing.assert_allclose(
            m[f"pred_{key}"][i], _seq(dec.delta_logp_linear, d)[0], rtol=2e-3
        )
        np.testing.assert_allclose(
            m[f"act_{key}"][i], _seq(act.delta_logp, d)[0], rtol=2e-2, atol=1e-5
        )
    assert m["eta"] == eta
    assert np.all(np.abs(m["cos"]) <= 1 + 1e-6)


@pytest.mark.slow
def test_grpo_decompose_step_matches_ldjax_decompose():
    """The correct/incorrect terms add up to ldjax.decompose's prediction of the same step."""
    cfg = C.QUICK.replace(
        sft=C.QUICK.sft.replace(max_len=LM.max_len, max_prompt_len=8),
        grpo=C.QUICK.grpo.replace(group_size=3, prompts_per_step=2, lr=0.05),
    )
    params = init_params(LM, jax.random.PRNGKey(1))
    grp, _ = _pairs(3, seed=1)
    grp["rewards"] = np.array([1.0, 0.0, 0.0], np.float32)
    grp["advantages"] = np.asarray(losses.group_advantages(jnp.asarray(grp["rewards"]), 3))
    out = grpo.decompose_step(params, LM, grp, cfg, "grpo")
    apply_fn = make_apply_fn(LM)
    # the group's share of a training step: the mean loss over prompts_per_step groups
    kw = dict(
        targets=jnp.asarray(grp["targets"]),
        mask=jnp.asarray(grp["mask"]),
        advantages=jnp.asarray(grp["advantages"]),
    )
    share = cfg.grpo.lr * cfg.grpo.decompose_scale / (3 * cfg.grpo.prompts_per_step)
    tok = jnp.asarray(grp["tokens"])
    dec = ldjax.decompose(apply_fn, params, tok, tok, losses.grpo, eta=share, loss_kwargs=kw)
    pred = _seq(dec.delta_logp_linear, grp)
    np.testing.assert_allclose(out["predicted"], pred[0], rtol=2e-3)
    np.testing.assert_allclose(out["correct_term"] + out["incorrect_term"], pred[0], rtol=2e-3)
    act = ldjax.actual_step(apply_fn, params, tok, tok, losses.grpo, eta=share, loss_kwargs=kw)
    np.testing.assert_allclose(out["actual"], _seq(act.delta_logp, grp)[0], rtol=2e-2, atol=1e-5)


def test_config_round_trips_and_rejects_unknown_fields(tmp_path):
    p = tmp_path / "c.json"
    C.QUICK.to_json(p)
    assert C.load_config(p) == C.QUICK
    p.write_text(json.dumps({"grpo": {"no_such": 1}}))
    with pytest.raises(ValueError, match="no_such"):
        C.load_config(p)


@pytest.mark.slow
def test_reproduce_followups_quick_end_to_end(tmp_path):
    """``ldjax reproduce followups --quick`` (smaller still) writes a claims table whose numbers
    re-derive from its own per-pair arrays and whose first pair's actual step re-runs with
    ldjax.actual_step on the cached SFT model."""
    from ldjax.experiments.followups import cli
    from ldjax.experiments.followups.model import sft_model

    small = {
        "sft": {"steps": 40},
        "pairs": {"n_pairs": 12},
        "grpo": {"n_prompts": 6, "steps": 2, "n_track": 2, "seeds": 2, "prompts_per_step": 2},
    }
    cp = tmp_path / "small.json"
    cp.write_text(json.dumps(small))
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--quick", "--config", str(cp), "--out", str(out), "--cache-dir", str(cache)]
    assert cli.main(args) == 0
    doc = json.loads((out / "claims.json").read_text())
    md = (out / "claims.md").read_text()
    rows = {r["id"]: r for r in doc["claims"]}
    assert set(rows) == {
        "entanglement_predicts_comovement",
        "chosen_falls_explained",
        "ches_ranks_displacement",
        "prediction_beats_ches",
        "lld_incorrect_terms_pull_down",
        "grpo_correct_rise",
        "nthr_one_step",
        "nthr_run_correct_rise_more",
    }
    for r in rows.values():
        assert r["status"] in OUTCOMES, r
        assert f"**{r['status']}**" in md
    for name in ("entanglement", "displacement", "grpo"):
        assert (out / "figures" / f"followups_{name}.png").stat().st_size > 1000
    pm = {k: np.asarray(v, float) for k, v in doc["pairs"].items() if isinstance(v, list)}
    # the rows' levels re-derive from the per-pair arrays
    k = entanglement.comovement(pm["act_pos"], pm["act_neg"])
    lev = rows["entanglement_predicts_comovement"]["numbers"]
    assert np.isclose(lev["Pearson(cos, κ)"][0], pearson(pm["cos"], k))
    lev = rows["prediction_beats_ches"]["numbers"]
    assert np.isclose(lev["Spearman(pred, Δ⁺)"][0], spearman(pm["pred_pos"], pm["act_pos"]))
    assert np.isclose(lev["Spearman(−CHES, Δ⁺)"][0], spearman(-pm["ches"], pm["act_pos"]))
    eff = rows["prediction_beats_ches"]["effects"][0]
    pv = entanglement.jackknife(
        lambda a, b, c: spearman(a, c) - spearman(b, c), pm["pred_pos"], -pm["ches"], pm["act_pos"]
    )
    assert np.isclose(eff["effect"], pv.mean())
    assert eff["lo"] <= eff["effect"] <= eff["hi"]
    # pair 0's DPO step, independently: ldjax.actual_step on the cached SFT model
    cfg = C.load_config(cp, C.QUICK)
    params, lm, info = sft_model(cfg, cache_dir=cache)
    assert info["from_cache"]
    from ldjax.data.synthetic import generate_preferences

    pos, neg = pairs.encode_pairs(
        generate_preferences(1, 0), cfg.replace(pairs=cfg.pairs.replace(n_pairs=1))
    )
    apply_fn = make_apply_fn(lm)
    one = lambda d: {kk: jnp.asarray(v[:1]) for kk, v in d.items()}
    p, n = one(pos), one(neg)
    lp = lambda d: losses.sequence_logprob(apply_fn(params, d["tokens"]), d["targets"], d["mask"])
    kw = dict(
        targets_pos=p["targets"],
        targets_neg=n["targets"],
        mask_pos=p["mask"],
        mask_neg=n["mask"],
        ref_logp_pos=lp(p),
        ref_logp_neg=lp(n),
        beta=cfg.pairs.beta,
    )
    eta = doc["pairs"]["eta"]
    act = ldjax.actual_step(
        apply_fn,
        params,
        p["tokens"],
        (p["tokens"], n["tokens"]),
        losses.dpo,
        eta=eta,
        loss_kwargs=kw,
    )
    np.testing.assert_allclose(pm["act_pos"][0], _seq(act.delta_logp, p)[0], rtol=2e-2, atol=1e-4)
    # GRPO rows: one effect per seed and tracked prompt
    g = rows["lld_incorrect_terms_pull_down"]["effects"][0]
    assert np.asarray(g["d"]).shape == (2, 2)
