"""Probe tracker metrics against direct computations, LBK, one-step slopes, plots and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldjax.data.probes import build_probes
from ldjax.data.synthetic import generate_preferences
from ldjax.experiments.lm import plots
from ldjax.experiments.lm.one_step import loglog_slope, run_one_step, sequence_delta
from ldjax.experiments.lm.tracking import GREEDY, ProbeTracker, SavedTracking, lbk, probe_stats
from ldjax.lm import train as T
from ldjax.lm.config import DataConfig, ModelConfig, PipelineConfig
from ldjax.lm.decode import generate
from ldjax.lm.model import LMConfig, init_params

LM = LMConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=48)
PL = 16


@pytest.fixture(scope="module")
def probes():
    recs = build_probes(generate_preferences(14, seed=1), seed=0, n_test=4)
    return recs[:5], recs[5:8]


@pytest.fixture(scope="module")
def p0():
    return init_params(LM, jax.random.PRNGKey(0))


def test_probe_stats_equal_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 7)) * 3
    logits[0, 2] = [30.0, 0, 0, 0, 0, 0, 0]  # max π ≈ 1: log(1 − max π) must stay finite and exact
    targets = rng.integers(0, 7, size=(3, 6))
    mask = rng.random((3, 6)) < 0.6
    mask[0, 2] = True
    with jax.enable_x64(True):
        got = jax.device_get(
            probe_stats(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
        )
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    m = mask.astype(float)
    lp = np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    top = p.max(-1)
    rest = np.log(np.sort(p, -1)[..., :-1].sum(-1))  # log(1 − max π) without cancellation
    an = np.sqrt(7 - 2 + 7 * (p**2).sum(-1))
    n = np.maximum(m.sum(-1), 1)
    np.testing.assert_allclose(got["logp_sum"], (lp * m).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(got["logp_mean"], (lp * m).sum(-1) / n, rtol=1e-10)
    np.testing.assert_allclose(got["argmax_path"], (np.log(top) * m).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(got["except_argmax"], (rest * m).sum(-1), rtol=1e-9)
    np.testing.assert_allclose(got["A_norm"], (an * m).sum(-1) / n, rtol=1e-10)
    np.testing.assert_allclose(got["A_norm_sq"], (an**2 * m).sum(-1), rtol=1e-10)
    assert got["except_argmax"][0] < -20  # log(1 − max π) ≈ −30 + log 6 at the peaked position


@pytest.mark.slow  # > 10 s on 2 cores
def test_tracker_matches_direct_computation(probes, p0, tmp_path):
    train, test = probes
    tr = ProbeTracker(
        LM,
        {"train": train, "test": test},
        max_prompt_len=PL,
        eval_batch=16,
        decode_max_new_tokens=10,
    )
    assert tr.all_types[-1] == GREEDY and "chosen" in tr.types and "irr_train" in tr.types
    p1 = jax.tree_util.tree_map(lambda a: a * 1.3, p0)
    tr.evaluate(0, p0)
    tr.evaluate(5, p1)
    tr.evaluate(10, p1)
    K = len(tr.all_types)
    assert tr.arrays("train", "logp_sum").shape == (3, K, len(train))
    # log π(chosen | x) equals the direct teacher-forced sum
    k = tr.types.index("rejected")
    direct = T.sequence_logprobs(p1, LM, tr.batches["test"]["rejected"])
    np.testing.assert_allclose(tr.arrays("test", "logp_sum")[1, k], direct, rtol=1e-5)
    # y* is the KV-cache greedy decode of the start parameters, and along y* each token is the
    # argmax, so log π(y*) equals the teacher-forced argmax path at the start
    from ldjax.data.preferences import encode_prompt

    prompts = [encode_prompt(tr.tokenizer, r["prompt"], max_prompt_len=PL) for r in train]
    assert tr.greedy_ids["train"] == generate(p0, LM, prompts, 10, include_eos=True)
    g = tr.all_types.index(GREEDY)
    np.testing.assert_allclose(
        tr.arrays("train", "logp_sum")[0, g],
        tr.arrays("train", "argmax_path")[0, g],
        rtol=1e-4,
        atol=1e-4,
    )
    assert np.all(
        tr.arrays("train", "argmax_path")[0, :-1] >= tr.arrays("train", "logp_sum")[0, :-1] - 1e-4
    )
    # LBK and SignDelta between evaluations
    hist = {"step": list(range(1, 11)), "G_norm_sq": [float(i) for i in range(1, 11)]}
    tr.finalize(hist)
    lp, a2 = tr.arrays("train", "logp_sum"), tr.arrays("train", "A_norm_sq")
    d = lp[1] - lp[0]
    np.testing.assert_allclose(
        tr.arrays("train", "lbk")[1], (d / 5) ** 2 / (a2[0] * np.mean([1, 2, 3, 4, 5]))
    )
    np.testing.assert_allclose(tr.arrays("train", "sign_delta")[1], d.mean(-1))
    assert np.all(np.isnan(tr.arrays("train", "lbk")[0]))
    np.testing.assert_allclose(
        tr.arrays("train", "lbk")[2], 0.0, atol=1e-20
    )  # same params: no change
    assert lbk(2.0, 4.0, 0.25, 2) == pytest.approx(1.0)
    # save / load (a resumed run) and re-evaluation dropping later records
    paths = tr.save(tmp_path, "probes")
    summ = json.loads(open(paths["json"]).read())
    assert summ["steps"] == [0, 5, 10] and summ["types"] == tr.all_types
    tr2 = ProbeTracker(
        LM,
        {"train": train, "test": test},
        max_prompt_len=PL,
        eval_batch=16,
        decode_max_new_tokens=10,
    )
    assert tr2.load(paths["npz"])
    assert tr2.greedy_ids == tr.greedy_ids and tr2.steps == [0, 5, 10]
    tr2.evaluate(5, p0)
    assert tr2.steps == [0, 5]
    np.testing.assert_allclose(
        tr2.arrays("train", "logp_sum")[1], tr.arrays("train", "logp_sum")[0], rtol=1e-6
    )
    view = SavedTracking(paths["npz"])
    np.testing.assert_allclose(view.curve("test", "chosen"), tr.curve("test", "chosen"))
    # figures from the saved view
    from matplotlib.figure import Figure

    from ldjax.experiments.common import save_figure

    for fn in (plots.plot_probe_grid, plots.plot_probe_overview, plots.plot_squeeze):
        fig = fn(view, title="t")
        assert isinstance(fig, Figure) and len(fig.axes) >= 1
        out = save_figure(fig, tmp_path / f"{fn.__name__}.png")
        assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_tracker_errors(probes):
    train, _ = probes
    with pytest.raises(ValueError, match="missing in set"):
        ProbeTracker(
            LM,
            {"train": train, "test": [{"prompt": "x", "chosen": "y"}]},
            types=["chosen", "rejected"],
            max_prompt_len=PL,
        )
    tr = ProbeTracker(LM, {"train": train}, max_prompt_len=PL, greedy=False)
    with pytest.raises(ValueError, match="nothing recorded"):
        tr.arrays("train", "logp_sum")


@pytest.mark.slow  # > 10 s on 2 cores
def test_one_step_error_falls_like_eta_squared(probes):
    """float64: the eNTK-step error is O(η²) (slope ≈ 2), the relative error of Δ log π O(η)."""
    cfg = PipelineConfig(
        model=ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, dtype="float64"),
        data=DataConfig(max_len=48, max_prompt_len=PL),
    )
    rec = probes[0][0]
    with jax.enable_x64(True):
        params = init_params(cfg.lm_config(), jax.random.PRNGKey(1))
        r = run_one_step(params, cfg, rec, [1e-6, 1e-5, 1e-4])
    assert r["dtype"] == "float64" and r["types"][0] == "chosen" and len(r["types"]) >= 8
    assert r["slope_entk_abs_error"] == pytest.approx(2.0, abs=0.05)
    assert r["slope_rel_error_linear"] == pytest.approx(1.0, abs=0.05)
    assert r["rel_error_linear"][0] < 1e-3 and r["rel_error_linear"][0] < r["rel_error_linear"][-1]
    assert r["actual"][0][0] > 0  # an SFT step on y⁺ raises log π(y⁺)
    assert loglog_slope([1, 10, 100], [3, 300, 30000]) == pytest.approx(2.0)


def test_sequence_delta():
    d = np.zeros((1, 3, 4))
    d[0, 0, 2], d[0, 1, 1], d[0, 2, 3] = 1.0, 2.0, 5.0
    assert sequence_delta(d, np.array([[2, 1, 3]]), np.array([[True, True, False]]))[0] == 3.0


@pytest.mark.slow
def test_cli_quick_sft_and_cache(tmp_path, capsys):
    from ldjax.experiments.lm import cli

    cfg = {
        "model": {
            "d_model": 16,
            "n_heads": 2,
            "n_layers": 1,
            "d_ff": 32,
        },  # LM: shares compiled code
        # pretraining with SFT's update rule: both phases share one compiled step
        "pretrain": {
            "steps": 4,
            "optimizer": "rmsprop",
            "lr": 1e-3,
            "warmup": 2,
            "schedule": "constant",
        },
        "sft": {"steps": 4, "eval_every": 2},
        "data": {
            "n_records": 24,
            "n_heldout": 4,
            "n_track": 3,
            "synthetic_n": 24,
            "max_len": 48,
            "max_prompt_len": PL,
        },
        "track": {"decode_max_new_tokens": 10, "eval_batch": 16},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    args = [
        "sft",
        "--quick",
        "--config",
        str(tmp_path / "c.json"),
        "--out",
        str(tmp_path / "run"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["pretrain"]["from_cache"] is None and s["sft"]["steps"] == 4
    assert s["data"]["n_train"] == 20 and s["data"]["n_track"] == [3, 3]
    z = np.load(tmp_path / "run" / "sft" / "probes.npz")
    assert z["steps"].tolist() == [0, 2, 4] and z["train/logp_sum"].shape[1:] == (
        len(s["probe_types"]),
        3,
    )
    assert all(
        (tmp_path / "run" / "figures" / f).exists()
        for f in ("lm_sft_probes.png", "lm_pretrain.png")
    )
    # the same config and data again: the pretrained model comes from the cache; --resume reuses SFT
    assert cli.main(args + ["--resume"]) == 0
    s2 = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s2["pretrain"]["from_cache"] and s2["sft"]["resumed_from"] == 4
    assert s2["sft"]["probes"]["train"]["chosen"] == s["sft"]["probes"]["train"]["chosen"]
    assert (
        cli.main(["sft", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    )
    assert "not found" in capsys.readouterr().err
