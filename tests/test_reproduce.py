"""``ldjax reproduce lm``: claim evaluators on synthetic histories, and one tiny end-to-end run."""

import json

import numpy as np
import pytest

from ldjax.experiments.reproduce import claims as C

TYPES = (
    "chosen",
    "chosen_initial",
    "rejected",
    "irr_train",
    "irr_test",
    "irr_hum",
    "random_permute",
    "random_nonhum",
    "greedy",
)


def _curve(first, last, n=4):
    return list(np.linspace(first, last, n))


def _run(changes: dict, firsts=None, argmax=(-60.0, -40.0), a_norm=(15.0, 16.0)):
    """A run's curves on sets train/test: log π of each type goes first -> first + change."""
    firsts = firsts or {}
    out = {}
    for s in ("train", "test"):
        out[s] = {}
        for t in TYPES:
            f = firsts.get(t, -100.0)
            d = {
                "logp_sum": _curve(f, f + changes.get(t, 0.0)),
                "argmax_path": _curve(*argmax) if t == "chosen" else _curve(-50, -50),
                "A_norm": _curve(*a_norm) if t == "chosen" else _curve(15, 15),
            }
            out[s][t] = d
    return out


def _good_curves():
    """Histories where every claim of the paper holds."""
    sft_changes = {
        "chosen": 30,
        "chosen_initial": 20,
        "rejected": 10,
        "irr_train": 5,
        "irr_test": 3,
        "irr_hum": -2,
        "random_permute": -5,
        "random_nonhum": -20,
        "greedy": 10,
    }
    dpo_changes = {t: -10.0 for t in TYPES}
    dpo_changes.update(chosen=-5, rejected=-40, greedy=8)
    return {
        "sft": _run(sft_changes, firsts={"random_nonhum": -150}),
        "sft_long": _run(sft_changes),
        "sft_extend": _run(dict(sft_changes, rejected=40)),
        "dpo": _run(dpo_changes),
        "dpo_long": _run({t: v * 2 for t, v in dpo_changes.items()}),
        "dpo_onpolicy": _run({t: v / 4 for t, v in dpo_changes.items()}),
        "dpo_extend": _run({t: v / 2 for t, v in dpo_changes.items()}, argmax=(-60, -50)),
    }


EXTRA = {
    "dpo.degeneration": 0.3,
    "dpo_extend.degeneration": 0.1,
    **C.history_measurements(
        "dpo",
        {"loss": list(np.linspace(0.69, 0.2, 10)), "margin": list(np.linspace(0.0, 12.0, 10))},
    ),
}


def _status(rows):
    return {r["id"]: r["status"] for r in rows}


def test_all_claims_pass_on_paper_like_histories():
    m = C.measure(_good_curves(), EXTRA)
    # extend's held-out chosen must not be below baseline: both decay, extend half as much
    rows = C.evaluate_claims([m])
    st = _status(rows)
    assert set(st) == {c.id for c in C.CLAIMS}
    assert all(v == "PASS" for v in st.values()), st
    assert m["dpo.train.others.fall_share"] == 1.0
    assert m["dpo.train.others.logp_sum.change"] == pytest.approx(-10.0)
    assert m["sft.train.chosen.logp_sum.change"] == pytest.approx(30.0)


@pytest.mark.parametrize(
    "claim,mutate",
    [
        (
            "sft_chosen_rises",
            lambda c: c["sft"]["train"]["chosen"].update(logp_sum=_curve(-100, -101)),
        ),
        (
            "sft_irr_train_rises",
            lambda c: c["sft"]["train"]["irr_train"].update(logp_sum=_curve(-100, -100.5)),
        ),
        (
            "sft_random_permute_falls",
            lambda c: c["sft"]["train"]["random_permute"].update(logp_sum=_curve(-100, -99)),
        ),
        # falls (-50 -> -55) but stays above every natural-language type (lowest: irr_hum at -102)
        (
            "sft_random_nonhum_lowest",
            lambda c: c["sft"]["train"]["random_nonhum"].update(logp_sum=_curve(-50, -55)),
        ),
        # rejected falls, but slower than chosen
        (
            "dpo_rejected_falls_faster",
            lambda c: c["dpo"]["train"]["rejected"].update(logp_sum=_curve(-100, -103)),
        ),
        # argmax path falls (extend's falls more, so "extend: y* rises more slowly" still holds)
        (
            "dpo_argmax_path_rises",
            lambda c: (
                c["dpo"]["train"]["chosen"].update(argmax_path=_curve(-40, -41)),
                c["dpo_extend"]["train"]["chosen"].update(argmax_path=_curve(-40, -45)),
            ),
        ),
        (
            "dpo_peakiness_rises",
            lambda c: c["dpo"]["train"]["chosen"].update(A_norm=_curve(16, 15.9)),
        ),
        (
            "dpo_greedy_rises",
            lambda c: c["dpo"]["train"]["greedy"].update(logp_sum=_curve(-30, -31)),
        ),
        (
            "extend_rejected_higher",
            lambda c: c["sft_extend"]["train"]["rejected"].update(logp_sum=_curve(-100, -95)),
        ),
    ],
)
def test_single_claim_fails_when_its_numbers_contradict_it(claim, mutate):
    curves = _good_curves()
    mutate(curves)
    st = _status(C.evaluate_claims([C.measure(curves, EXTRA)]))
    assert st[claim] == "FAIL", st
    assert sum(v == "FAIL" for v in st.values()) == 1, st


def test_history_measurements_average_first_and_last_fifth():
    m = C.history_measurements(
        "dpo", {"loss": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "margin": [0.0] * 10}
    )
    assert m["dpo.loss.first"] == pytest.approx(1.5) and m["dpo.loss.last"] == pytest.approx(9.5)
    m = C.history_measurements(
        "x", {"loss": [3.0, 1.0], "margin": [0.0, 2.0]}
    )  # fifth < 1 step: one step
    assert (m["x.loss.first"], m["x.loss.last"], m["x.margin.last"]) == (3.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="history of run 'dpo' has no 'margin'"):
        C.history_measurements("dpo", {"loss": [1.0]})
    with pytest.raises(ValueError, match="dpo.loss"):
        C.history_measurements("dpo", {"loss": [], "margin": []})


@pytest.mark.parametrize(
    "loss,margin",
    [
        ((0.69, 0.8), (0.0, 5.0)),  # the loss rose (an earlier run's 0.69 -> 0.8): FAIL
        ((0.69, 0.3), (2.0, -1.0)),  # the margin shrank
    ],
)
def test_dpo_learns_fails_when_loss_or_margin_go_the_wrong_way(loss, margin):
    extra = dict(
        EXTRA,
        **C.history_measurements(
            "dpo", {"loss": list(np.linspace(*loss, 10)), "margin": list(np.linspace(*margin, 10))}
        ),
    )
    st = _status(C.evaluate_claims([C.measure(_good_curves(), extra)]))
    assert st["dpo_learns"] == "FAIL" and sum(v == "FAIL" for v in st.values()) == 1, st


def test_most_types_fall_needs_a_majority():
    curves = _good_curves()
    others = [t for t in TYPES if t not in C.OTHER_EXCLUDE]  # 6 types
    for t in others[:3]:  # half rise: 0.5 is not "most"
        curves["dpo"]["train"][t]["logp_sum"] = _curve(-100, -90)
    m = C.measure(curves, EXTRA)
    assert m["dpo.train.others.fall_share"] == pytest.approx(0.5)
    assert _status(C.evaluate_claims([m]))["dpo_most_types_fall"] == "FAIL"


def test_comparisons_between_runs_can_fail():
    curves = _good_curves()
    # on-policy decays more than off-policy; extend decays more; long SFT decays less
    curves["dpo_onpolicy"] = _run({t: -30.0 for t in TYPES})
    curves["dpo_extend"] = _run({t: -30.0 for t in TYPES}, argmax=(-60, -10))
    curves["dpo_long"] = _run({t: -1.0 for t in TYPES})
    st = _status(
        C.evaluate_claims(
            [
                C.measure(
                    curves, dict(EXTRA, **{"dpo.degeneration": 0.1, "dpo_extend.degeneration": 0.4})
                )
            ]
        )
    )
    for k in (
        "onpolicy_less_decay",
        "extend_others_decay_slower",
        "extend_ystar_rises_slower",
        "longer_sft_more_squeeze",
        "extend_heldout_chosen",
        "extend_less_degenerate",
    ):
        assert st[k] == "FAIL", (k, st)


def test_missing_measurement_is_reported_not_hidden():
    curves = _good_curves()
    del curves["dpo_onpolicy"]
    rows = C.evaluate_claims([C.measure(curves, EXTRA)])
    row = next(r for r in rows if r["id"] == "onpolicy_less_decay")
    assert row["status"] == "MISSING" and "dpo_onpolicy" in row["error"]


def test_seeds_mean_std_and_per_seed_passes():
    good = C.measure(_good_curves(), EXTRA)
    bad_curves = _good_curves()
    bad_curves["sft"]["train"]["chosen"]["logp_sum"] = _curve(-100, -110)  # Δ = -10 vs +30
    bad = C.measure(bad_curves, EXTRA)
    rows = C.evaluate_claims([good, good, bad])
    row = next(r for r in rows if r["id"] == "sft_chosen_rises")
    mean, std = row["numbers"]["change"]
    assert mean == pytest.approx((30 + 30 - 10) / 3)
    assert std == pytest.approx(np.std([30, 30, -10]))
    assert row["status"] == "PASS" and row["seeds_passed"] == 2 and row["n_seeds"] == 3
    md = C.claims_markdown(rows)
    assert "2/3" in md and "±" in md


def test_repeated_ngram_share_closed_form():
    assert C.repeated_ngram_share(["a b c d"], 2) == 0.0
    # "a b a b a b": 5 bigrams, 2 distinct -> 1 - 2/5
    assert C.repeated_ngram_share(["a b a b a b"], 2) == pytest.approx(0.6)
    assert C.repeated_ngram_share(["a b a b a b", "x y z", "one"], 2) == pytest.approx(0.3)
    assert np.isnan(C.repeated_ngram_share(["one", ""], 2))


def test_measure_rejects_bad_curves():
    with pytest.raises(ValueError, match="sft.train.chosen.logp_sum"):
        C.measure({"sft": {"train": {"chosen": {"logp_sum": []}}}})


TINY = {
    "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32},
    "data": {
        "max_len": 64,
        "max_prompt_len": 32,
        "n_records": 24,
        "n_heldout": 4,
        "n_track": 3,
        "synthetic_n": 24,
    },
    "pretrain": {"steps": 4, "batch_size": 4, "warmup": 1, "eval_every": 4, "ckpt_every": 4},
    "sft": {
        "steps": 3,
        "epochs": 0.0,
        "batch_size": 4,
        "warmup": 1,
        "eval_every": 3,
        "ckpt_every": 3,
    },
    "preference": {
        "steps": 2,
        "epochs": 0.0,
        "batch_size": 4,
        "warmup": 1,
        "eval_every": 2,
        "ckpt_every": 2,
        "max_new_tokens": 8,
    },
    "track": {"eval_batch": 32, "decode_max_new_tokens": 8},
}


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_every_claim(tmp_path):
    from ldjax.data.synthetic import generate_preferences
    from ldjax.experiments.reproduce.cli import main

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    # a plain prompt/chosen/rejected file (no probe fields): the probe types are built from it
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "".join(
            json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
            for r in generate_preferences(120)
        )
    )
    out = tmp_path / "out"
    rc = main(
        [
            "lm",
            "--data",
            str(plain),
            "--quick",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--no-cache",
        ]
    )
    assert rc == 0
    doc = json.loads((out / "claims.json").read_text())
    assert [r["id"] for r in doc["claims"]] == [c.id for c in C.CLAIMS]
    assert all(r["status"] in ("PASS", "FAIL") for r in doc["claims"]), doc["claims"]
    # long SFT = 2 x 3 steps; baseline SFT's last evaluation is its step 3
    assert doc["steps"]["sft"] == 3 and doc["steps"]["sft_long"] == 6
    m = doc["measurements_per_seed"][0]
    for run in ("sft", "sft_long", "sft_extend", "dpo", "dpo_extend", "dpo_onpolicy", "dpo_long"):
        assert f"{run}.train.chosen.logp_sum.change" in m
        assert f"{run}.test.chosen.logp_sum.last" in m
    for run in ("dpo", "dpo_extend", "dpo_onpolicy", "dpo_long"):
        # 2 DPO steps: the first and last fifth are steps 1 and 2 of the run's history
        assert np.isfinite(m[f"{run}.loss.first"]) and m[f"{run}.loss.first"] == pytest.approx(
            np.log(2), abs=0.05
        )
        assert np.isfinite(m[f"{run}.margin.last"])
    md = (out / "claims.md").read_text()
    assert md.count("| **PASS** |") + md.count("| **FAIL** |") == len(C.CLAIMS)
    for f in doc["figures"]:
        assert (tmp_path / f).exists() or __import__("os").path.exists(f)


def test_cli_errors_are_clear(tmp_path, capsys):
    from ldjax.experiments.reproduce.cli import main

    assert main(["lm", "--data", str(tmp_path / "nope.jsonl"), "--quick"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["lm", "--synthetic", "--quick", "--seeds", "0"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"preference": {"n_pairs": 2}}))
    assert main(["lm", "--synthetic", "--quick", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "preference.n_pairs" in err and "batch_size=8" in err


def test_preference_trains_on_the_first_n_pairs_only():
    from ldjax.lm.config import DEFAULT, QUICK, PreferenceConfig

    assert DEFAULT.preference.n_pairs == 128 and DEFAULT.preference.epochs == 4.0
    assert QUICK.preference.n_pairs == 32 and QUICK.preference.steps == 32
    # epochs over n_pairs: 128 pairs / batch 8 = 16 steps per epoch, 4 epochs
    assert DEFAULT.preference.total_steps(min(468, DEFAULT.preference.n_pairs)) == 64
    with pytest.raises(ValueError, match="n_pairs"):
        PreferenceConfig(n_pairs=4, batch_size=8)


def test_preference_n_pairs_uses_the_first_records():
    import jax

    from ldjax.data.synthetic import generate_preferences
    from ldjax.lm import train as T
    from ldjax.lm.config import PreferenceConfig
    from ldjax.lm.model import LMConfig, init_params
    from ldjax.lm.tokenizer import ByteTokenizer

    lm = LMConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=48)
    records = generate_preferences(12, seed=3)
    p0 = init_params(lm, jax.random.PRNGKey(0))
    cfg = PreferenceConfig(n_pairs=4, batch_size=4, steps=3, epochs=0.0, warmup=0, lr=1e-3)
    res = T.preference(p0, p0, lm, records, cfg, max_prompt_len=16, progress=False)
    assert res.total_steps == 3 and len(res.history["loss"]) == 3
    pos, _ = T.pair_examples(ByteTokenizer(), records, max_len=48, max_prompt_len=16)
    got = sorted(map(tuple, res.last_batch["pos_tokens"].tolist()))
    assert got == sorted(map(tuple, pos["tokens"][:4].tolist()))  # the first 4 pairs, nothing else
    assert got != sorted(map(tuple, pos["tokens"][4:8].tolist()))
