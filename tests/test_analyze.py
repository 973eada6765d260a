"""ldjax analyze: the readouts equal a direct computation from per-pair ldjax.decompose; the
figures are figures; the CLI runs end to end on a tiny config, resumes, does nothing when done,
refuses a changed job and names bad checkpoints and data."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model

import ldjax
from ldjax import losses
from ldjax.experiments.analyze import pipeline, plots, readouts

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "ldjax", "analyze", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=dict(__import__("os").environ, PYTHONPATH=str(ROOT)),
    )


def test_top_k_and_aggregates_equal_a_direct_computation_from_decompose():
    f, p, x_o, x_u = small_model("mlp", "float32")
    rng = np.random.default_rng(0)
    x_u = jnp.asarray(rng.normal(size=(7, x_u.shape[1])), jnp.float32)
    y_u = rng.integers(0, 5, 7)
    y_o = np.array([1, 4, 0])
    inf = ldjax.influence(
        f, p, x_u, x_o, losses.sft, eta=0.05, loss_kwargs=dict(targets=y_u), targets_o=y_o
    )
    # the score of every pair from a per-u decompose: Δ log π(y_o|x_o)
    direct = np.zeros((7, 3))
    for u in range(7):
        kw = dict(targets=y_u[u : u + 1])
        d = ldjax.decompose(f, p, x_o, x_u[u : u + 1], losses.sft, eta=0.05, loss_kwargs=kw)
        direct[u] = np.asarray(d.delta_logp_linear)[np.arange(3), y_o]
    s = readouts.scores(inf.delta, y_o)
    np.testing.assert_allclose(s, direct, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(s, -np.asarray(inf.delta_loss_o), rtol=1e-6)
    top = readouts.top_k(s, 3)
    for o in range(3):
        assert top["helpful"][o].tolist() == np.argsort(-direct[:, o])[:3].tolist()
        assert top["harmful"][o].tolist() == np.argsort(direct[:, o])[:3].tolist()
        np.testing.assert_allclose(top["helpful_score"][o], np.sort(direct[:, o])[::-1][:3], 1e-4)
    agg = readouts.aggregate(s, y_u, y_o, order_u=range(5), order_o=[0, 1, 4])
    for i, a in enumerate(range(5)):
        for j, b in enumerate([0, 1, 4]):
            block = direct[np.ix_(y_u == a, y_o == b)]
            if block.size:
                assert agg["mean"][i, j] == pytest.approx(block.mean(), rel=1e-4, abs=1e-8)
            else:
                assert np.isnan(agg["mean"][i, j]) and agg["count"][i, j] == 0
    assert readouts.top_k(s, 50)["helpful"].shape == (3, 7)  # k is capped at N_u
    # the K entries largest in |S| (token maps): ties go to the smaller u, then the smaller o
    t = np.array([[1.0, -3.0, 2.0], [3.0, 0.5, -2.0]])
    u, o = readouts.top_abs(t, 4)
    assert list(zip(u.tolist(), o.tolist())) == [(0, 1), (1, 0), (0, 2), (1, 2)]
    assert len(readouts.top_abs(t, 99)[0]) == 6
    with pytest.raises(ValueError, match="targets_o"):
        readouts.scores(inf.delta)
    with pytest.raises(ValueError, match="k must be"):
        readouts.top_k(s, 0)
    with pytest.raises(ValueError, match="groups_u"):
        readouts.aggregate(s, y_u[:3], y_o)


def test_figures_are_returned_not_written(tmp_path):
    import matplotlib.figure

    rng = np.random.default_rng(1)
    s = rng.normal(size=(12, 6)) * 1e-3
    gu, go = rng.integers(0, 3, 12), rng.integers(0, 3, 6)
    top = readouts.top_k(s, 2)
    audit = dict(
        predicted=rng.normal(size=(4, 6)),
        actual=rng.normal(size=(4, 6)),
        rel_error=np.abs(rng.normal(size=4)) * 1e-3,
        median_rel_error=1e-3,
    )
    imgs = rng.integers(0, 255, (12, 28, 28)).astype(np.uint8)
    figs = [
        plots.plot_heatmap(s, gu, go),
        plots.plot_aggregate(readouts.aggregate(s, gu, go)),
        plots.plot_gallery(top, imgs, gu, imgs[:6], go, [0, 5]),
        plots.plot_audit(audit),
    ]
    assert all(isinstance(fg, matplotlib.figure.Figure) for fg in figs)
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoint_and_probes_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint .*no such folder"):
        pipeline.load_mnist_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        pipeline.load_mnist_checkpoint(tmp_path / "empty")
    imgs, labels = np.zeros((30, 28, 28), np.uint8), np.repeat(np.arange(10), 3)
    assert pipeline.mnist_probes(2, imgs, labels)[0].shape == (20, 28, 28)
    with pytest.raises(ValueError, match="only 3 digits"):
        pipeline.mnist_probes(4, imgs, labels)
    with pytest.raises(FileNotFoundError, match="--probes nope.npz"):
        pipeline.mnist_probes("nope.npz", imgs, labels)
    np.savez(tmp_path / "p.npz", images=np.zeros((2, 5, 5), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"'images' must be uint8 \(N, 28, 28\)"):
        pipeline.mnist_probes(tmp_path / "p.npz", imgs, labels)
    with pytest.raises(ValueError, match="--loss"):
        pipeline.lm_pairs([], "kto", None, None, 8)


@pytest.mark.slow
def test_cli_mnist_end_to_end_resumes_refuses_and_reads_a_training_checkpoint(tmp_path):
    from test_mnist_data import write_split

    from ldjax.data.mnist import load_default

    out = tmp_path / "run"
    r = _cli("mnist", "--quick", "--out", out, "--audit", 4, "--devices", 2, "--chunk-size", 64)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["n_u"] == 256 and s["n_o"] == 20 and s["devices"]["count"] == 2
    assert s["chunks"] == {"computed": 4, "total": 4} and s["audit"]["n"] == 4
    assert s["audit"]["median_rel_error"] < 0.05  # a prediction always comes with its error
    for name in ("heatmap", "aggregate", "gallery", "audit"):
        assert (out / f"analyze_{name}.png").stat().st_size > 1000
    top = json.loads((out / "top_k.json").read_text())
    assert len(top) == 20 and len(top[0]["helpful"]) == 5
    # the stored arrays and the readouts agree
    stored = ldjax.load_influence(out / "influence")
    assert stored["done"]
    delta = np.asarray(stored["delta"])
    yo = np.array([row["label"] for row in top])
    sc = readouts.scores(delta, yo)
    assert [e["u"] for e in top[3]["helpful"]] == np.argsort(-sc[:, 3], kind="stable")[:5].tolist()
    # rerun: nothing computed; a changed setting is refused, naming what changed
    again = _cli("mnist", "--quick", "--out", out, "--audit", 4, "--devices", 2, "--chunk-size", 64)
    assert again.returncode == 0, again.stderr
    assert "computed 0 of 4 chunks" in again.stdout
    changed = _cli("mnist", "--quick", "--out", out, "--devices", 2, "--chunk-size", 64, "--eta", 1)
    assert changed.returncode == 2 and "another influence job" in changed.stderr
    assert "eta" in changed.stderr
    # an explicit checkpoint (the training's format) and an IDX folder
    idx = tmp_path / "idx"
    write_split(idx, *load_default("train"), "train")
    write_split(idx, *load_default("test"), "test")
    r = _cli(
        "mnist",
        "--checkpoint",
        out / "train" / "ckpt",
        "--train",
        idx,
        "--n-train",
        40,
        "--probes",
        1,
        "--out",
        tmp_path / "explicit",
        "--audit",
        2,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "explicit" / "summary.json").read_text())["n_u"] == 40
    # a damaged checkpoint is named
    step = sorted(p for p in (out / "train" / "ckpt").iterdir() if p.name.isdigit())[-1]
    meta = step / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"step"', '"stp"'))
    bad = _cli("mnist", "--checkpoint", out / "train" / "ckpt", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "edited or damaged" in bad.stderr
    bad = _cli("mnist", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "no such folder" in bad.stderr


@pytest.mark.slow
def test_cli_lm_end_to_end(tmp_path):
    out = tmp_path / "lm"
    r = _cli("lm", "--quick", "--out", out, "--audit", 2, "--loss", "dpo", "--token-maps", 3)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["n_u"] == 12 and s["loss"] == "dpo" and s["audit"]["n"] == 2
    assert s["readouts"]["by_type"]["rows"] == ["total", "y⁺ term", "y⁻ term"]
    total, pos, neg = np.asarray(s["readouts"]["by_type"]["mean"])
    np.testing.assert_allclose(total, pos + neg, rtol=1e-4, atol=1e-9)
    assert (out / "top_k.md").read_text().startswith("# Top training pairs per probe (dpo)")
    # --token-maps 3: the chosen pairs are the top 3 of |S| in the stored matrix, and each pair's
    # y⁺ and y⁻ maps, summed over both positions and both branches, are its entry of S
    sc = np.asarray(ldjax.load_influence(out / "influence")["delta"], np.float64)
    rank = json.loads((out / "token_maps" / "ranking.json").read_text())
    chosen = [(e["u"], e["o"]) for e in rank]
    assert len(chosen) == 3 and [list(c) for c in chosen] == s["token_maps"]["pairs"]
    flat = np.argsort(-np.abs(sc).ravel(), kind="stable")[:3]
    assert chosen == [tuple(int(i) for i in np.unravel_index(f, sc.shape)) for f in flat]
    rest = np.ones(sc.shape, bool)
    rest[tuple(np.array(chosen).T)] = False
    assert np.abs(sc[~rest]).min() >= np.abs(sc[rest]).max()
    with np.load(out / "token_maps" / "maps.npz") as z:
        maps = {k: z[k] for k in z.files}
    assert maps["map_pos"].dtype == np.float32 and maps["map_neg"].shape == (3, 96, 96)
    assert [(int(u), int(o)) for u, o in zip(maps["u"], maps["o"])] == chosen
    sums = maps["map_pos"].sum(axis=(1, 2), dtype=np.float64) + maps["map_neg"].sum(
        axis=(1, 2), dtype=np.float64
    )
    np.testing.assert_allclose(sums, [sc[u, o] for u, o in chosen], rtol=1e-5, atol=0)
    pngs = sorted((out / "figures" / "token_maps").glob("*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 1000 for p in pngs)
    bad = _cli("lm", "--checkpoint", out / "train", "--pairs", tmp_path / "none.jsonl")
    assert bad.returncode == 2 and "none.jsonl" in bad.stderr


@pytest.mark.slow  # ~20 s on 2 cores: a one-epoch training run, then two influence jobs
def test_mnist_step_by_the_runs_optimizer_is_its_sgd_part_plus_the_carry(tmp_path, capsys):
    """SGD momentum + weight decay is linear in the gradient: u's part of the run's own update
    is exactly plain SGD at η = lr_t / B on u, and the carry-over (momentum, decay) comes apart."""
    from ldjax.data.mnist import load_default
    from ldjax.experiments.analyze import cli
    from ldjax.mnist.train import TrainConfig, train

    xi, yi = load_default("train")
    cfg = TrainConfig(n_train=64, epochs=1, batch_size=32, lr=0.05, schedule="constant")
    train(cfg, xi, yi, ckpt_dir=tmp_path / "ckpt", progress=False)
    ck = pipeline.load_mnist_checkpoint(tmp_path / "ckpt", optimizer=True)
    leaves = [np.asarray(a) for a in __import__("jax").tree_util.tree_leaves(ck["opt_state"])]
    assert any(a.ndim > 0 and np.abs(a).max() > 0 for a in leaves)  # the momentum was restored
    pre = ldjax.preconditioner(ck["optimizer"], ck["opt_state"], ck["params"])
    lr_t = float(np.asarray(__import__("jax").tree_util.tree_leaves(pre)[0]).ravel()[0])
    assert lr_t == pytest.approx(cfg.lr, rel=1e-6)  # a constant schedule
    mesh = ldjax.default_mesh()
    train_set, probes = (xi[:12], yi[:12]), (xi[100:106], yi[100:106])

    def opts(name):
        return dict(chunk_size=6, mesh=mesh, out=tmp_path / name, audit=3, seed=0)

    s_opt, _, _ = pipeline.run_mnist(ck, train_set, probes, eta=None, opts=opts("opt"))
    s_sgd, _, _ = pipeline.run_mnist(
        ck, train_set, probes, eta=lr_t / cfg.batch_size, opts=opts("sgd")
    )
    d_opt = np.asarray(ldjax.load_influence(tmp_path / "opt" / "influence")["delta"])
    d_sgd = np.asarray(ldjax.load_influence(tmp_path / "sgd" / "influence")["delta"])
    assert np.linalg.norm(d_opt - d_sgd) <= 1e-5 * np.linalg.norm(d_sgd)
    # the audit (u's part + the carry against the real optimizer step) stays first-order small
    assert s_opt["audit"]["median_rel_error"] < 0.05 and s_opt["eta"] is None
    assert s_opt["carry"]["max"] != 0.0 and "optimizer" in s_opt["step"]
    # a cosine run's last checkpoint has learning rate 0: refused, not a silent zero
    train(cfg.replace(schedule="cosine"), xi, yi, ckpt_dir=tmp_path / "cos", progress=False)
    with pytest.raises(ValueError, match="learning rate is 0 at epoch 1.*--epoch"):
        pipeline.load_mnist_checkpoint(tmp_path / "cos", optimizer=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint of epoch 3"):
        pipeline.load_mnist_checkpoint(tmp_path / "cos", epoch=3)
    # the command end to end: its report and summary name the step
    code = cli.main(
        ["mnist", "--checkpoint", str(tmp_path / "ckpt"), "--step", "optimizer", "--n-train",
         "12", "--probes", "1", "--audit", "2", "--out", str(tmp_path / "cli_ok")]
    )  # fmt: skip
    assert code == 0 and "the run's optimizer" in capsys.readouterr().out
    s_cli = json.loads((tmp_path / "cli_ok" / "summary.json").read_text())
    assert s_cli["eta"] is None and s_cli["carry"]["max"] != 0.0
    # --eta with --step optimizer is a usage error naming both
    code = cli.main(
        [
            "mnist",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--step",
            "optimizer",
            "--eta",
            "0.1",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 2 and "--eta" in capsys.readouterr().err
