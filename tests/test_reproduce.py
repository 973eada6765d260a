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


N_PROMPTS = 6
_U = np.linspace(-1.0, 1.0, N_PROMPTS)


def _curve(first, last, n=4):
    """``(n, N_PROMPTS)`` curves: prompt p goes first -> first + (last − first)(1 + 0.1 u_p)."""
    return np.linspace(first, first + (last - first) * (1 + 0.1 * _U), n)


def _run(changes: dict, firsts=None, argmax=(-60.0, -40.0), a_norm=(15.0, 16.0), scale=1.0):
    """A run's curves on sets train/test: log π of each type goes first -> first + change."""
    firsts = firsts or {}
    out = {}
    for s in ("train", "test"):
        out[s] = {}
        for t in TYPES:
            f = firsts.get(t, -100.0)
            d = {
                "logp_sum": _curve(f, f + scale * changes.get(t, 0.0)),
                "argmax_path": _curve(*argmax) if t == "chosen" else _curve(-50, -50),
                "A_norm": _curve(*a_norm) if t == "chosen" else _curve(15, 15),
            }
            out[s][t] = d
    return out


def _good_curves(scale=1.0):
    """Histories where every claim of the paper holds (``scale`` varies the seeds)."""
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
    k = scale
    return {
        "sft": _run(sft_changes, firsts={"random_nonhum": -150}, scale=k),
        "sft_long": _run(sft_changes, scale=k),
        "sft_extend": _run(dict(sft_changes, rejected=40), scale=k),
        "dpo": _run(dpo_changes, scale=k),
        "dpo_long": _run({t: v * 2 for t, v in dpo_changes.items()}, scale=k),
        "dpo_onpolicy": _run({t: v / 4 for t, v in dpo_changes.items()}, scale=k),
        "dpo_extend": _run({t: v / 2 for t, v in dpo_changes.items()}, argmax=(-60, -50), scale=k),
    }


SCALES = (1.0, 0.9, 1.15)  # three "seeds"


def _extra(seed=0, loss=(0.69, 0.2), margin=(0.0, 12.0), degeneration=(0.3, 0.1)):
    """Per-run numbers of one seed: DPO loss/margin histories, per-prompt degeneration."""
    j = 0.01 * seed
    return {
        "dpo.degeneration": degeneration[0] + 0.02 * _U,
        "dpo_extend.degeneration": degeneration[1] + 0.02 * _U[::-1],
        **C.history_measurements(
            "dpo",
            {
                "loss": list(np.linspace(loss[0], loss[1] + j, 10)),
                "margin": list(np.linspace(margin[0], margin[1] + j, 10)),
            },
        ),
    }


EXTRA = _extra()


def _seeds(curves_fn=_good_curves, extra_fn=_extra):
    """Measurements of three seeds."""
    return [C.measure(curves_fn(k), extra_fn(i)) for i, k in enumerate(SCALES)]


def _status(rows):
    return {r["id"]: r["status"] for r in rows}


def test_all_claims_pass_on_paper_like_histories():
    per_seed = _seeds()
    m = per_seed[0]
    rows = C.evaluate_claims(per_seed)
    st = _status(rows)
    assert set(st) == {c.id for c in C.CLAIMS}
    assert all(v == "PASS" for v in st.values()), st
    assert np.all(np.asarray(m["dpo.train.others.fall_share"]) == 1.0)
    assert np.mean(m["dpo.train.others.logp_sum.change"]) == pytest.approx(-10.0)
    assert np.mean(m["sft.train.chosen.logp_sum.change"]) == pytest.approx(30.0)
    # every row keeps the numbers its decision used: (S, P) paired differences
    row = next(r for r in rows if r["id"] == "sft_chosen_rises")
    (e,) = row["effects"]
    assert np.shape(e["d"]) == (3, N_PROMPTS) and e["n_seeds"] == 3
    assert e["effect"] == pytest.approx(30 * np.mean(SCALES))
    assert e["lo"] > 0 and e["hi"] > e["effect"]
    assert next(r for r in rows if r["id"] == "dpo_learns")["effects"][0]["n_prompts"] == 1
    # one seed: probe claims are decided over prompts; per-run numbers (loss, margin) have no
    # interval from one number, so dpo_learns is INCONCLUSIVE
    st1 = _status(C.evaluate_claims(per_seed[:1]))
    assert st1.pop("dpo_learns") == "INCONCLUSIVE"
    assert all(v == "PASS" for v in st1.values()), st1


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
    def curves_fn(k):
        c = _good_curves(k)
        mutate(c)
        return c

    st = _status(C.evaluate_claims(_seeds(curves_fn)))
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
    st = _status(C.evaluate_claims(_seeds(extra_fn=lambda i: _extra(i, loss, margin))))
    assert st["dpo_learns"] == "FAIL" and sum(v == "FAIL" for v in st.values()) == 1, st


@pytest.mark.parametrize("n_rise,status", [(3, "INCONCLUSIVE"), (4, "FAIL")])
def test_most_types_fall_needs_a_majority(n_rise, status):
    others = [t for t in TYPES if t not in C.OTHER_EXCLUDE]  # 6 types

    def curves_fn(k):
        curves = _good_curves(k)
        for t in others[:n_rise]:  # half rise: exactly 0.5 is neither most nor a minority
            curves["dpo"]["train"][t]["logp_sum"] = _curve(-100, -90)
        return curves

    per_seed = _seeds(curves_fn)
    share = np.asarray(per_seed[0]["dpo.train.others.fall_share"])
    assert share == pytest.approx(1 - n_rise / 6)
    assert _status(C.evaluate_claims(per_seed))["dpo_most_types_fall"] == status


def test_comparisons_between_runs_can_fail():
    def curves_fn(k):
        curves = _good_curves(k)
        # on-policy decays more than off-policy; extend decays more; long SFT decays less
        curves["dpo_onpolicy"] = _run({t: -30.0 for t in TYPES}, scale=k)
        curves["dpo_extend"] = _run({t: -30.0 for t in TYPES}, argmax=(-60, -10), scale=k)
        curves["dpo_long"] = _run({t: -1.0 for t in TYPES}, scale=k)
        return curves

    st = _status(C.evaluate_claims(_seeds(curves_fn, lambda i: _extra(i, degeneration=(0.1, 0.4)))))
    for k in (
        "onpolicy_less_decay",
        "extend_others_decay_slower",
        "extend_ystar_rises_slower",
        "longer_sft_more_squeeze",
        "extend_heldout_chosen",
        "extend_less_degenerate",
    ):
        assert st[k] == "FAIL", (k, st)


def test_a_claim_without_finite_differences_is_missing_not_a_crash():
    nan = lambda i: _extra(i, degeneration=(np.nan, np.nan))  # no decode had two words
    rows = C.evaluate_claims(_seeds(extra_fn=nan))
    row = next(r for r in rows if r["id"] == "extend_less_degenerate")
    assert row["status"] == "MISSING" and "no finite" in row["error"]
    assert sum(r["status"] == "PASS" for r in rows) == len(C.CLAIMS) - 1


def test_missing_measurement_is_reported_not_hidden():
    curves = _good_curves()
    del curves["dpo_onpolicy"]
    rows = C.evaluate_claims([C.measure(curves, EXTRA)])
    row = next(r for r in rows if r["id"] == "onpolicy_less_decay")
    assert row["status"] == "MISSING" and "dpo_onpolicy" in row["error"]


def test_a_mean_carried_by_two_seeds_of_three_is_inconclusive():
    good = C.measure(_good_curves(), EXTRA)
    bad_curves = _good_curves()
    bad_curves["sft"]["train"]["chosen"]["logp_sum"] = _curve(-100, -110)  # Δ = -10 vs +30
    bad = C.measure(bad_curves, EXTRA)
    rows = C.evaluate_claims([good, good, bad])
    row = next(r for r in rows if r["id"] == "sft_chosen_rises")
    mean, std = row["numbers"]["chosen last"]
    assert mean == pytest.approx(-100 + (30 + 30 - 10) / 3)
    assert std == pytest.approx(np.std([30, 30, -10]))
    (e,) = row["effects"]
    assert e["seed_effects"] == pytest.approx([30, 30, -10])
    assert e["effect"] == pytest.approx(50 / 3)
    # no prompt effect beyond the proportional jitter: ν ≈ 2 and the interval is the t-interval
    # of the seed means, 50/3 ± 4.30 · 23.1 / √3 — it contains 0
    assert e["lo"] < 0 < e["hi"]
    assert row["status"] == "INCONCLUSIVE" and row["seeds_passed"] == 2 and row["n_seeds"] == 3
    md = C.claims_markdown(rows)
    assert "2/3" in md and "±" in md and "INCONCLUSIVE" in md


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
    assert all(r["status"] in ("PASS", "FAIL", "INCONCLUSIVE") for r in doc["claims"])
    assert sum(doc["outcomes"].values()) == len(C.CLAIMS)
    for r in doc["claims"]:  # every number of the decision is kept
        for e in r["effects"]:
            assert np.shape(e["d"])[0] == 1 and {"lo", "hi", "df", "effect"} <= set(e)
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
    assert sum(md.count(f"| **{k}** |") for k in ("PASS", "FAIL", "INCONCLUSIVE")) == len(C.CLAIMS)
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


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
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


def test_redecide_an_earlier_claims_json(tmp_path):
    from ldjax.experiments.reproduce.cli import main

    # an earlier document: one number per seed (means over prompts) and old PASS/FAIL rows
    per_seed = [C.scalar_measurements(m) for m in _seeds()]
    src = tmp_path / "old.json"
    src.write_text(json.dumps({"command": "old", "measurements_per_seed": per_seed, "claims": []}))
    out = tmp_path / "new"
    assert main(["lm", "--redecide", str(src), "--out", str(out)]) == 0
    doc = json.loads((out / "claims.json").read_text())
    assert doc["measurements_per_seed"] == per_seed
    row = next(r for r in doc["claims"] if r["id"] == "sft_chosen_rises")
    (e,) = row["effects"]
    assert e["n_prompts"] == 1 and e["df"] == 2
    assert e["seed_effects"] == pytest.approx([30 * k for k in SCALES])
    assert sum(doc["outcomes"].values()) == len(C.CLAIMS)
    assert "t-interval over seeds" in (out / "claims.md").read_text()
    src.write_text("{}")
    assert main(["lm", "--redecide", str(src), "--out", str(out)]) == 2


def _paper_layout_file(path, n=40, seed=7):
    """A JSONL of the paper's layout (prompt + the 13 response fields) that shares nothing with
    the shared probe file: its own words (non-ASCII among them), fields in reverse order, an
    extra field, prompts with and without the open ``Assistant:`` turn, fewer records."""
    from ldjax.data.probes import PROBE_TYPES

    rng = np.random.default_rng(seed)
    words = "río árbol piedra luz sombra camino viento agua fuego tierra noche día mar sol".split()
    words += "kettle orbit lantern pebble meadow quartz violet harbor ember glacier".split()

    def sent(k):
        return " " + " ".join(rng.choice(words, k)) + "."

    recs = []
    for i in range(n):
        r = {"meta": {"id": i}}
        for t in reversed(PROBE_TYPES):
            r[t] = sent(int(rng.integers(4, 12)))
        r["random_permute"] = " " + " ".join(rng.permutation(r["chosen"].split()))
        turn = "\n\nAssistant:" if i % 3 else ""
        r["prompt"] = f"\n\nHuman: ¿{' '.join(rng.choice(words, 6))}?{turn}"
        recs.append(r)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), "utf-8")
    return recs


def test_a_held_out_file_of_the_paper_layout_is_read_as_is(tmp_path):
    from ldjax.data.probes import PROBE_TYPES
    from ldjax.experiments.lm.pipeline import load_records, prepare_data
    from ldjax.experiments.lm.tracking import common_probe_types
    from ldjax.lm.config import QUICK

    path = tmp_path / "heldout_layout.jsonl"
    recs = _paper_layout_file(path)
    cfg = QUICK.replace(data={"n_heldout": 6, "n_track": 4, "n_records": None})
    records, source = load_records(str(path), cfg)
    data = prepare_data(records, cfg, source)
    assert source == str(path) and len(data.train) == 34 and len(data.heldout) == 6
    # every probe field comes from the file (nothing rebuilt from the shared file's layout)
    by_prompt = {r["prompt"]: r for r in recs}
    for r in data.track_train + data.track_test:
        for t in PROBE_TYPES:
            assert r[t] == by_prompt[r["prompt"]][t]
    types = common_probe_types({"train": data.track_train, "test": data.track_test})
    assert types == list(PROBE_TYPES)


@pytest.mark.slow
def test_claims_run_end_to_end_on_a_held_out_layout_file(tmp_path):
    from ldjax.data.probes import PROBE_TYPES
    from ldjax.experiments.reproduce.cli import main

    path = tmp_path / "heldout_layout.jsonl"
    _paper_layout_file(path)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dict(TINY, data=dict(TINY["data"], n_records=None, n_heldout=6))))
    out = tmp_path / "out"
    args = ["lm", "--data", str(path), "--quick", "--config", str(cfg), "--out", str(out)]
    assert main([*args, "--no-cache"]) == 0
    doc = json.loads((out / "claims.json").read_text())
    assert doc["data"] == str(path) and doc["n_train"] == 34 and doc["n_heldout"] == 6
    # every claim is decided from this file's probes, every effect finite; only the 2-gram claim
    # may lack data (the tiny model's 8-byte decodes rarely hold two words)
    missing = [r for r in doc["claims"] if r["status"] == "MISSING"]
    assert all(r["id"] == "extend_less_degenerate" for r in missing), missing
    for r in doc["claims"]:
        for e in r["effects"]:
            assert np.all(np.isfinite(e["d"])) or r["id"] == "extend_less_degenerate", r["id"]
    m = doc["measurements_per_seed"][0]
    for t in PROBE_TYPES:  # the file's own 13 types are tracked, incl. those no builder makes
        assert f"sft.train.{t}.logp_sum.change" in m


def test_redecide_a_stopped_run_from_its_per_prompt_seed_files(tmp_path):
    from ldjax.experiments.reproduce.cli import main

    run = tmp_path / "run"
    for s, m in enumerate(_seeds()[:2]):  # two seeds finished, per-prompt measurements
        (run / f"seed{s}").mkdir(parents=True)
        (run / f"seed{s}" / "measurements.json").write_text(json.dumps(m))
    out = tmp_path / "new"
    assert main(["lm", "--redecide", str(run), "--out", str(out)]) == 0
    doc = json.loads((out / "claims.json").read_text())
    (e,) = next(r for r in doc["claims"] if r["id"] == "sft_chosen_rises")["effects"]
    assert (e["n_seeds"], e["n_prompts"]) == (2, N_PROMPTS) and e["status"] == "PASS"
    assert np.shape(e["d"]) == (2, N_PROMPTS)
    assert "seeds × prompts" in (out / "claims.md").read_text()
    assert main(["lm", "--redecide", str(tmp_path / "empty"), "--out", str(out)]) == 2
