"""The MNIST warm-up analyses (arXiv 2407.10490, §2) on the engine: closed forms, then the paper's
claims.

The claims train LeNet once per module on 2,000 real digits from ``$LDJAX_DATA/mnist``
(skipped when LDJAX_DATA is not set). To keep the test short, it trains 6 epochs at peak lr 0.05
(cosine, momentum 0.9, wd 5e-4) instead of the paper's 100 epochs at lr 1e-3; the CLI's default
is the paper's recipe.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldjax
from ldjax.data.mnist import load_default, load_mnist, to_float
from ldjax.experiments.mnist import analysis as an
from ldjax.mnist.train import TrainConfig, initial_params, make_optimizer, steps_per_epoch, train

F = an.jitted_apply("lenet")  # the CLI's jitted apply_fn: engine compiles are shared
CFG = TrainConfig(n_train=2000, epochs=6, lr=0.05)
CHECKPOINTS = (0, 1, 2, 4, 5, 6)


# ----------------------------------------------------------------------------- closed forms


def test_learning_rates_match_the_optimizer():
    cfg = TrainConfig(n_train=100, epochs=3, batch_size=32, lr=0.1, momentum=0.0, weight_decay=0.0)
    lrs = an.learning_rates(cfg, 100)
    spe = steps_per_epoch(cfg, 100)
    assert lrs.shape == (3 * spe,) == (12,)
    tx = make_optimizer(cfg, spe)
    p = {"w": jnp.zeros(())}
    state = tx.init(p)
    for t in range(lrs.size):  # with μ = wd = 0 the update of a unit gradient is −η_t
        upd, state = tx.update({"w": jnp.ones(())}, state, p)
        assert float(upd["w"]) == pytest.approx(-lrs[t], rel=1e-5, abs=1e-8)  # float32
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] < lrs[0]
    const = an.learning_rates(TrainConfig(n_train=100, epochs=1, schedule="constant", lr=0.3), 100)
    np.testing.assert_allclose(const, 0.3)


def test_momentum_weights_closed_form():
    lrs = np.full(50, 0.2)
    c = an.momentum_weights(lrs, 0.9)
    s = np.arange(50)
    np.testing.assert_allclose(c, 0.2 * (1 - 0.9 ** (50 - s)) / (1 - 0.9), rtol=1e-12)
    np.testing.assert_allclose(an.momentum_weights(lrs, 0.0), lrs)
    # c_s really is the total step of g_s under heavy-ball SGD with a schedule
    lrs = np.linspace(1.0, 0.1, 7)
    m, theta = 0.0, 0.0
    for t in range(7):
        m = 0.5 * m + (1.0 if t == 2 else 0.0)  # one unit gradient at step 2
        theta -= lrs[t] * m
    assert -theta == pytest.approx(an.momentum_weights(lrs, 0.5)[2])


def test_rank_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + rng.normal(size=40)
    b[:5] = b[5]  # ties
    assert an.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert an.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
    with pytest.raises(ValueError, match="equal size"):
        an.pearson(a, b[:3])


def test_confusion_ranks_and_influence_matrix():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.6, 0.3, 0.1]])
    y = np.array([0, 1, 2, 0])
    m = an.class_confusion(p, y, 3)
    np.testing.assert_allclose(m[0], [0.65, 0.25, 0.1])
    np.testing.assert_allclose(m[2], [0.5, 0.1, 0.4])
    r = an.offdiag_ranks(m)
    assert r["order"][0] == (2, 0) and r[(2, 0)] == 1 and r[(0, 1)] == 2 and len(r["order"]) == 6
    np.testing.assert_allclose(an.influence_matrix(p, y, 3), m.T)
    with pytest.raises(ValueError, match="class 2 has no example"):
        an.class_confusion(p[:2], y[:2], 3)
    with pytest.raises(ValueError, match="class 1 has 1 examples"):
        an.pick_per_class(y, 2, 3)


def test_influence_vs_kernel_integral():
    steps = np.array([0.0, 10.0, 30.0])
    norms = np.stack([np.full((3, 3), v) for v in (1.0, 3.0, 2.0)])
    norms[:, 0, 1] *= 2
    infl = np.arange(9.0).reshape(3, 3)
    out = an.influence_vs_kernel(infl, dict(steps=steps, norms=norms), lrs=np.ones(31))
    assert out["integral"][1, 0] == pytest.approx(10 * 2 + 20 * 2.5)  # trapezoid
    assert out["integral"][0, 1] == pytest.approx(2 * 70)
    assert out["n_pairs"] == 6
    assert out["integral_eta"][1, 0] == pytest.approx(
        out["integral"][1, 0] + (1 + 2) / 2, rel=1e-12
    )
    with pytest.raises(ValueError, match=">= 2 kernel checkpoints"):
        an.influence_vs_kernel(infl, dict(steps=steps[:1], norms=norms[:1]))


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_kernel_class_norms_from_engine_blocks():
    x, y = load_default("test")
    idx = an.pick_per_class(y, 5)  # 50 digits: the shapes of the claims' kernel set (one compile)
    xs, ys = jnp.asarray(to_float(x[idx])), y[idx]
    params = initial_params(CFG)
    n = an.kernel_class_norms(F, params, xs, ys)
    fro = np.linalg.norm(
        np.asarray(ldjax.entk(F, params, xs, xs, reduction="full"), np.float64), axis=(-2, -1)
    )
    fours, nines = np.arange(20, 25), np.arange(45, 50)
    assert (ys[fours] == 4).all() and (ys[nines] == 9).all()
    assert n[4, 9] == pytest.approx(fro[np.ix_(nines, fours)].mean(), rel=1e-6)
    off = ~np.eye(5, dtype=bool)  # same class: pairs of an example with itself left out
    assert n[4, 4] == pytest.approx(fro[np.ix_(fours, fours)][off].mean(), rel=1e-6)
    np.testing.assert_allclose(n, n.T, rtol=1e-4)  # ‖K(a, b)‖_F = ‖K(b, a)‖_F
    with pytest.raises(ValueError, match="no pair for classes"):
        an.kernel_class_norms(F, params, xs[:10], ys[:10])


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_step_tracker_without_momentum_is_the_sgd_step():
    """μ = wd = 0: the real update is the plain-SGD step, so the tracker's two actuals coincide;
    the per-step actuals telescope to log π_T − log π_0."""
    x, y = load_default("train")
    cfg = TrainConfig(n_train=192, epochs=1, lr=0.5, momentum=0.0, weight_decay=0.0)
    xt, yt = load_default("test")
    probe = jnp.asarray(to_float(xt[an.pick_per_class(yt, 5)]))  # the claims' probe shapes
    tr = an.StepTracker(F, probe, an.learning_rates(cfg, 192), compare_every=2)
    params, _ = train(cfg, x, y, on_step=tr, progress=False)
    rec = tr.arrays()
    assert rec["pred_linear"].shape == (3, 50, 10) and list(rec["cmp_steps"]) == [0, 2]
    np.testing.assert_allclose(rec["sgd_actual"], rec["actual"][[0, 2]], atol=2e-5)
    total = np.asarray(
        jax.nn.log_softmax(F(params, probe)) - jax.nn.log_softmax(F(initial_params(cfg), probe))
    )
    np.testing.assert_allclose(rec["actual"].sum(0), total, atol=1e-4)
    assert max(rec["cmp_sgd"]["linear"]) < 0.1 and min(rec["cmp_sgd"]["sign_agreement"]) > 0.9
    acc = an.accumulated(rec, momentum=0.0)
    np.testing.assert_allclose(acc["pred_sum"], acc["pred_sum_momentum"])


@pytest.mark.slow  # trains 24 steps with the tracker: ~20 s
def test_step_tracker_predicts_the_real_momentum_update():
    """The paper's optimizer (momentum 0.9, weight decay 5e-4): the optimizer-aware prediction
    follows the real update step by step (error O(Δθ²)), the plain-SGD prediction does not once
    the momentum buffer dominates, and the step-by-step sum tracks log π_T − log π_0 with slope ≈
    1 without any reweighting."""
    x, y = load_default("train")
    cfg = TrainConfig(n_train=256, epochs=3, lr=0.01, batch_size=32)
    xt, yt = load_default("test")
    probe = jnp.asarray(to_float(xt[an.pick_per_class(yt, 3)]))
    spe = steps_per_epoch(cfg, 256)
    tr = an.StepTracker(
        F,
        probe,
        an.learning_rates(cfg, 256),
        compare_every=4,
        optimizer=make_optimizer(cfg, spe),
    )
    train(cfg, x, y, on_step=tr, progress=False)
    rec = tr.arrays()
    ps = an.per_step_summary(rec)
    # the real update's relative error: first order in Δθ
    assert ps["cmp_opt"]["linear"]["median"] < 0.01
    assert ps["cmp_opt"]["sign_agreement"]["median"] > 0.99
    # the plain-SGD kernel predicts the batch's gradient step, not the momentum update
    assert ps["cmp_real"]["linear"]["median"] > 10 * ps["cmp_opt"]["linear"]["median"]
    acc = an.accumulated(rec, momentum=cfg.momentum)
    np.testing.assert_allclose(acc["stats"]["optimizer"]["slope"], 1.0, atol=0.02)
    assert acc["stats"]["optimizer"]["pearson"] > 0.999
    assert abs(acc["stats"]["plain"]["slope"] - 1.0) > 0.5  # without the optimizer: not 1


# ----------------------------------------------------------------------------- the paper's claims


@pytest.fixture(scope="module")
def shared():
    if not os.environ.get("LDJAX_DATA"):
        pytest.skip(
            "LDJAX_DATA is not set: the MNIST claims need the shared IDX files ($LDJAX_DATA/mnist)"
        )
    xi, yi = load_mnist(split="train")
    xt, yt = load_mnist(split="test")
    return xi, yi, xt, yt


@pytest.fixture(scope="module")
def run(shared):
    """Train once: per-step tracking on 50 held-out probes, ‖K_uo‖_F on 50 held-out digits."""
    xi, yi, xt, yt = shared
    xtf = jnp.asarray(to_float(xt))
    p_idx = an.pick_per_class(yt, 5)
    k_idx = an.pick_per_class(yt[200:], 5) + 200  # a second set of 50, disjoint from the probes
    lrs = an.learning_rates(CFG, 2000)
    steps = an.StepTracker(F, xtf[p_idx], lrs, compare_every=16)
    kern = an.KernelTracker(F, xtf[k_idx], yt[k_idx], CHECKPOINTS, steps_per_epoch(CFG, 2000))
    kern.record(0, initial_params(CFG))
    params, hist = train(CFG, xi, yi, on_step=steps, on_epoch=kern, progress=False)
    return dict(
        params=params,
        hist=hist,
        rec=steps.arrays(),
        kern=kern.arrays(),
        probe_y=yt[p_idx],
        xtf=xtf,
        yt=yt,
        lrs=lrs,
    )


@pytest.mark.slow
def test_one_update_on_a_four(run):
    """(a): π(4) rises on another 4, more on the most similar non-4 than on the least similar
    one; predicted and actual Δπ agree in sign and within 10%."""
    res = an.one_update(F, run["params"], run["xtf"][:200], run["yt"][:200], label=4)
    another, similar, dissimilar = res["observers"]
    np.testing.assert_allclose(res["G"], res["pi_u"] - np.eye(10)[4], atol=1e-6)  # G = π − e_4
    assert another["label"] == 4 and similar["label"] != 4 and dissimilar["label"] != 4
    assert similar["k_fro"] > 5 * dissimilar["k_fro"]
    assert another["dpi_actual"][4] > 0
    assert similar["dpi_actual"][4] > dissimilar["dpi_actual"][4]
    assert similar["dpi_actual"][4] > 0
    for o in res["observers"]:
        a, p = o["dpi_actual"][4], o["dpi_pred"][4]
        assert np.sign(p) == np.sign(a), (o["kind"], p, a)
        assert abs(p - a) <= 0.1 * abs(a), (o["kind"], p, a)
        assert np.linalg.norm(o["dpi_pred"] - o["dpi_actual"]) <= 0.1 * np.linalg.norm(
            o["dpi_actual"]
        )
    print(
        "one_update",
        res["eta"],
        [
            (o["kind"], o["label"], round(o["k_fro"], 1), o["dpi_pred"][4], o["dpi_actual"][4])
            for o in res["observers"]
        ],
    )


@pytest.mark.slow
def test_four_and_nine_are_confused(run):
    """(d): (4,9) or (9,4) among the 5 largest of the 90 off-diagonal mean π(y|x) on held-out
    digits."""
    m = an.class_confusion(an.probs(F, run["params"], run["xtf"]), run["yt"])
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    r = an.offdiag_ranks(m)
    print(
        "confusion top5",
        r["order"][:5],
        {p: r[p] for p in [(4, 9), (9, 4), (5, 3), (3, 5), (8, 5), (5, 8)]},
    )
    assert min(r[(4, 9)], r[(9, 4)]) <= 5


@pytest.mark.slow
def test_per_step_prediction_and_accumulated_influence(run):
    """(b) per-step errors against a plain-SGD step are small, against the real optimizer not;
    (c) summed predictions track the accumulated change."""
    rec = run["rec"]
    assert rec["steps"].size == 6 * 32
    ps = an.per_step_summary(rec)
    print(
        "per-step",
        json.dumps(
            {
                k: {f: round(v["median"], 4) for f, v in ps[k].items()}
                for k in ("cmp_sgd", "cmp_real")
            }
        ),
    )
    assert ps["cmp_sgd"]["linear"]["median"] < 0.03  # measured 0.008 (lr 0.05 / 64 per example)
    assert ps["cmp_sgd"]["sign_agreement"]["median"] > 0.98
    assert ps["cmp_real"]["linear"]["median"] > 0.3  # momentum: the real step is not −ηKG
    acc = an.accumulated(rec, momentum=CFG.momentum, probe_y=run["probe_y"])
    np.testing.assert_allclose(acc["actual_sum"], acc["cum_actual"][-1])
    print("accumulated", acc["stats"])
    # measured Pearson 0.87 (plain) and 0.88 (momentum-weighted) over 50 probes x 10 classes
    assert acc["stats"]["plain"]["pearson"] > 0.75
    assert acc["stats"]["momentum"]["pearson"] > 0.75


@pytest.mark.slow
def test_kernel_ranking_is_stable_late(run):
    """(e): the ranking over o of ‖K_uo‖_F is stable between the last checkpoints (Spearman ≥ 0.8),
    and accumulated influence correlates with the time-integral of ‖K_uo‖_F."""
    k = run["kern"]
    assert list(k["epochs"]) == list(CHECKPOINTS)
    late = an.ranking_stability(k["norms"], -2, -1)
    print(
        "ranking late",
        late["mean_row"],
        late["min_row"],
        "early",
        an.ranking_stability(k["norms"], 0, 1)["mean_row"],
    )
    assert late["mean_row"] >= 0.8
    acc = an.accumulated(run["rec"], momentum=CFG.momentum)
    infl = an.influence_matrix(acc["actual_sum"], run["probe_y"])
    iv = an.influence_vs_kernel(infl, k, run["lrs"])
    print(
        "influence vs integral",
        {n: iv[n] for n in ("pearson", "spearman", "pearson_eta", "spearman_eta")},
    )
    assert iv["n_pairs"] == 90
    assert iv["spearman"] > 0.3 and iv["pearson"] > 0.3  # measured 0.55 and 0.50


@pytest.mark.slow  # ~20 s: trains and analyses
def test_cli_end_to_end_tiny(tmp_path, capsys):
    """``ldjax mnist`` on the embedded digits, tiny: summary.json and the five figures."""
    from ldjax.experiments.mnist import cli

    out = tmp_path / "mnist"
    # probes and kernel set of 50 digits, 200 candidates in (a): the shapes compiled above
    rc = cli.main(
        [
            "--epochs",
            "1",
            "--n-train",
            "128",
            "--probes-per-class",
            "5",
            "--kernel-per-class",
            "5",
            "--checkpoints",
            "1",
            "--compare-every",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["total_steps"] == 2 and s["per_step"]["n_compared_steps"] == 2
    assert s["entk"]["checkpoint_epochs"] == [0, 1] and len(s["confusion"]["top5"]) == 5
    assert s["data"]["source"].startswith("embedded") and s["machine"]["loadavg"] is not None
    assert sorted(s["figures"]) == sorted(f"mnist_{n}.png" for n in cli.FIGURES)
    for name in s["figures"]:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 200_000
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["--n-train", "5000", "--out", str(out)]) == 2
    assert "only 800 digits" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous results survive
