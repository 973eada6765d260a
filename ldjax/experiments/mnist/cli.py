"""``ldjax mnist``: the MNIST warm-up (arXiv 2407.10490, §2 and Figure 1) — train LeNet, analyses
(a)–(e), figures.

Usage::

    ldjax mnist                       # embedded 800/200 real digits, the paper's recipe
    ldjax mnist --data DIR --out out/mnist --figures-dir benchmarks/results
    ldjax mnist --quick               # a smoke run: 5 epochs at peak lr 0.1 on 800 digits

Writes ``summary.json`` and ``mnist_{one_update,per_step,accumulated,confusion,entk}.png`` under
``--out``; with ``--checkpoint-dir DIR`` also the training's checkpoints (one per epoch, the
format of :mod:`ldjax.training.checkpoint`), which ``ldjax analyze mnist --checkpoint DIR`` reads.
Probes, the eNTK set and the candidates of (a) are held-out (test split) digits. The
settings are the preset (``--quick``, else the paper's), then ``--config FILE`` (a JSON of
:class:`WarmupConfig`, full or partial), then the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from ldjax.data.mnist import load_default, load_mnist, to_float
from ldjax.experiments import common
from ldjax.experiments.common import nonneg_int, positive_float, positive_int
from ldjax.experiments.mnist import analysis as an
from ldjax.experiments.mnist import plots
from ldjax.mnist.train import (
    PAPER,
    QUICK,
    TrainConfig,
    evaluate,
    initial_params,
    make_optimizer,
    steps_per_epoch,
    train,
)
from ldjax.training.config import Config, preset

__all__ = [
    "WarmupConfig",
    "PRESETS",
    "add_arguments",
    "build_config",
    "run",
    "main",
    "checkpoint_epochs",
]

FIGURES = ("one_update", "per_step", "accumulated", "confusion", "entk")
PAIRS = ((4, 9), (5, 3), (8, 5))


@dataclasses.dataclass(frozen=True)
class WarmupConfig(Config):
    """The MNIST warm-up experiment.

    Attributes:
      train: the training recipe (:class:`ldjax.mnist.train.TrainConfig`).
      probes_per_class: held-out probes per class for (b) and (c).
      kernel_per_class: held-out digits per class for ‖K_uo‖_F in (e).
      checkpoints: eNTK checkpoints besides epoch 0, log-spaced to the last epoch.
      compare_every: compare with an actual plain-SGD step every this many updates.
    """

    train: TrainConfig = PAPER
    probes_per_class: int = 5
    kernel_per_class: int = 10
    checkpoints: int = 6
    compare_every: int = 20

    def __post_init__(self):
        for f in ("probes_per_class", "kernel_per_class", "checkpoints", "compare_every"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be an int >= 1, got {v!r}")


PRESETS = {
    "paper": WarmupConfig(),
    "quick": WarmupConfig(train=QUICK, probes_per_class=3, kernel_per_class=5),
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``mnist`` options to ``parser`` and return it."""
    common.add_common_arguments(
        parser,
        out=os.path.join("out", "mnist"),
        data="folder with MNIST-layout IDX files (train-*/t10k-*); default: the embedded "
        "800 train / 200 test real digits (ldjax.data.mnist.load_default)",
        config=None,
        quick="a small, fast run: 5 epochs at peak lr 0.1 on 800 digits",
        figures_dir=None,
        no_plots=None,
        progress=None,
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epochs (default 100, the paper's; --quick: 5)",
    )
    parser.add_argument(
        "--n-train",
        type=positive_int,
        default=None,
        help="training digits (default 2000, the paper's, or all if fewer; --quick: 800)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="peak learning rate (default 1e-3, the paper's; --quick: 0.1)",
    )
    parser.add_argument(
        "--model", choices=("lenet", "mlp"), default=None, help="lenet (default) or mlp"
    )
    parser.add_argument("--seed", type=nonneg_int, default=None, help="random seed (default 0)")
    parser.add_argument(
        "--probes-per-class",
        type=positive_int,
        default=None,
        help="held-out probes per class for (b)/(c) (default 5; --quick: 3)",
    )
    parser.add_argument(
        "--kernel-per-class",
        type=positive_int,
        default=None,
        help="held-out digits per class for ‖K_uo‖_F in (e) (default 10; --quick: 5)",
    )
    parser.add_argument(
        "--checkpoints",
        type=positive_int,
        default=None,
        help="eNTK checkpoints besides epoch 0, log-spaced to the last epoch (default 6)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="also write the training's checkpoints (one per epoch) here, for `ldjax analyze "
        "mnist --checkpoint DIR`; a folder that already holds them resumes (same config)",
    )
    parser.add_argument(
        "--compare-every",
        type=positive_int,
        default=None,
        help="compare with an actual plain-SGD step every this many updates (default 20)",
    )
    return parser


def build_config(args: argparse.Namespace, n_available: int | None = None) -> WarmupConfig:
    """The preset (``--quick``), then ``--config``, then the flags; without ``--n-train`` the
    number of training digits is capped by ``n_available``."""
    cfg = preset(PRESETS, "quick" if args.quick else "paper")
    if args.config:
        cfg = WarmupConfig.load(args.config, cfg)
    train = {
        k: getattr(args, k)
        for k in ("epochs", "n_train", "lr", "model", "seed")
        if getattr(args, k) is not None
    }
    if args.n_train is None and n_available is not None and cfg.train.n_train is not None:
        train["n_train"] = min(cfg.train.n_train, n_available)
    top = {
        k: getattr(args, k)
        for k in ("probes_per_class", "kernel_per_class", "checkpoints", "compare_every")
        if getattr(args, k) is not None
    }
    return cfg.replace(train=train, **top)


def checkpoint_epochs(epochs: int, n: int) -> list[int]:
    """0, about ``n`` log-spaced epochs in [1, epochs], and ``epochs``."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    e = np.unique(np.round(np.geomspace(1, epochs, max(n, 1))).astype(int))
    return sorted(set([0, epochs] + [int(v) for v in e]))


def _load(args) -> tuple:
    if args.data is not None:
        if not os.path.isdir(args.data):
            raise FileNotFoundError(f"--data {args.data}: no such folder")
        xi, yi = load_mnist(args.data, "train")
        xt, yt = load_mnist(args.data, "test")
        source = os.path.abspath(args.data)
    else:
        xi, yi = load_default("train")
        xt, yt = load_default("test")
        source = "embedded default (ldjax.data.mnist.load_default)"
    if xi.shape[1:] != (28, 28) or xt.shape[1:] != (28, 28):
        raise ValueError(
            f"images must be 28x28 for LeNet; got train {xi.shape[1:]}, test {xt.shape[1:]}"
        )
    return xi, yi, xt, yt, source


def run(args: argparse.Namespace, argv_text: str = "ldjax mnist") -> dict[str, Any]:
    """Run everything for parsed ``args`` (see :func:`add_arguments`): the config is resolved once
    (:func:`build_config`); the results are written to a staging folder and moved into ``--out``
    only when the whole run succeeded. Returns the summary dict."""
    t0 = time.time()
    common.check_writable(args.out)
    if args.figures_dir:
        common.check_writable(args.figures_dir, "--figures-dir")
    xi, yi, xt, yt, source = _load(args)
    wcfg = build_config(args, n_available=len(xi))
    cfg = wcfg.train
    n_train = cfg.n_train if cfg.n_train is not None else len(xi)
    if n_train > len(xi):
        raise ValueError(f"--n-train {n_train} but the training split has only {len(xi)} digits")
    f = an.jitted_apply(cfg.model)
    xtf = jnp.asarray(to_float(xt))
    p_idx = an.pick_per_class(yt, wcfg.probes_per_class)
    k_idx = an.pick_per_class(yt, wcfg.kernel_per_class)
    probe_x, probe_y = xtf[p_idx], yt[p_idx]
    spe = steps_per_epoch(cfg, n_train)
    lrs = an.learning_rates(cfg, n_train)
    steps = an.StepTracker(
        f, probe_x, lrs, compare_every=wcfg.compare_every, optimizer=make_optimizer(cfg, spe)
    )
    ck_epochs = checkpoint_epochs(cfg.epochs, wcfg.checkpoints)
    kern = an.KernelTracker(f, xtf[k_idx], yt[k_idx], ck_epochs, spe)
    kern.record(0, initial_params(cfg))

    t_train = time.time()
    params, hist = train(
        cfg,
        xi,
        yi,
        ckpt_dir=getattr(args, "checkpoint_dir", None),
        resume=False,
        on_step=steps,
        on_epoch=kern,
        progress=common.progress_enabled(args),
    )
    t_train = time.time() - t_train
    train_loss, train_acc = evaluate(params, cfg.model, xi[:n_train], yi[:n_train])
    test_loss, test_acc = evaluate(params, cfg.model, xt, yt)

    # (a) one update on a "4" of the held-out pool, on the trained model.
    pool = min(len(xt), 500)
    one = an.one_update(f, params, xtf[:pool], yt[:pool], label=4)
    # (b), (c)
    rec = steps.arrays()
    per_step = an.per_step_summary(rec)
    acc = an.accumulated(rec, momentum=cfg.momentum, probe_y=probe_y)
    # (d)
    conf = an.class_confusion(an.probs(f, params, xtf), yt)
    ranks = an.offdiag_ranks(conf)
    # (e)
    karr = kern.arrays()
    norms = karr["norms"]
    consecutive = [
        (
            int(karr["epochs"][i]),
            int(karr["epochs"][i + 1]),
            an.ranking_stability(norms, i, i + 1)["mean_row"],
        )
        for i in range(len(norms) - 1)
    ]
    vs_last = [
        (
            int(karr["epochs"][i]),
            int(karr["epochs"][-1]),
            an.ranking_stability(norms, i, len(norms) - 1)["mean_row"],
        )
        for i in range(len(norms) - 1)
    ]
    late = an.ranking_stability(norms, len(norms) - 2, len(norms) - 1)
    late_diag = an.ranking_stability(norms, len(norms) - 2, len(norms) - 1, include_diagonal=True)
    infl_actual = an.influence_matrix(acc["actual_sum"], probe_y)
    infl_pred = an.influence_matrix(acc["pred_sum_momentum"], probe_y)
    iv_actual = an.influence_vs_kernel(infl_actual, karr, lrs)
    iv_pred = an.influence_vs_kernel(infl_pred, karr, lrs)
    runtime_before_plots = time.time() - t0

    machine = common.machine_info()
    footer = (
        f"{argv_text}  |  {machine['processor']}, {machine['cpus_available']} CPUs, "
        f"jax {machine['jax']} "
        f"({machine['backend']}), load {machine['loadavg']}  |  {cfg.model}, {n_train} digits, "
        f"{cfg.epochs} epochs, lr {cfg.lr:g}, seed {cfg.seed}"
    )
    figs = {}
    if not args.no_plots:
        figs = {
            "one_update": plots.plot_one_update(one, np.asarray(xt[:pool])),
            "per_step": plots.plot_per_step(rec),
            "accumulated": plots.plot_accumulated(acc, probe_y),
            "confusion": plots.plot_confusion(conf, n_test=len(yt)),
            "entk": plots.plot_entk(
                karr, dict(consecutive=consecutive, vs_last=vs_last), iv_actual, infl_actual
            ),
        }
    figures = [f"mnist_{name}.png" for name in figs]

    scalars = lambda dct: {k: v for k, v in dct.items() if not isinstance(v, np.ndarray)}
    summary = dict(
        command=argv_text,
        machine=machine,
        data=dict(
            source=source,
            n_train_available=int(len(xi)),
            n_test=int(len(xt)),
            probes=dict(split="test", per_class=wcfg.probes_per_class, indices=p_idx),
            kernel_set=dict(split="test", per_class=wcfg.kernel_per_class, indices=k_idx),
        ),
        config=dict(dataclasses.asdict(cfg), steps_per_epoch=spe, total_steps=int(lrs.size)),
        experiment=wcfg.to_dict(),
        training=dict(
            final_epoch_loss=hist["loss"][-1],
            train_loss=train_loss,
            train_acc=train_acc,
            test_loss=test_loss,
            test_acc=test_acc,
            seconds=round(t_train, 1),
        ),
        one_update=dict(
            u=one["u"],
            eta=one["eta"],
            G=one["G"],
            pi_u=one["pi_u"],
            compare=one["compare"],
            step_rule="eta such that the predicted Δlog π(4|x_u) on x_u itself is 0.02 nats",
            observers=[
                dict(
                    kind=o["kind"],
                    index=o["index"],
                    label=o["label"],
                    k_fro=o["k_fro"],
                    pi4=o["pi"][4],
                    dpi4_pred=o["dpi_pred"][4],
                    dpi4_pred_exact=o["dpi_pred_exact"][4],
                    dpi4_actual=o["dpi_actual"][4],
                    rel_err_dpi=float(
                        np.linalg.norm(o["dpi_pred"] - o["dpi_actual"])
                        / np.linalg.norm(o["dpi_actual"])
                    ),
                    rel_err_dpi_exact=float(
                        np.linalg.norm(o["dpi_pred_exact"] - o["dpi_actual"])
                        / np.linalg.norm(o["dpi_actual"])
                    ),
                    dpi_pred=o["dpi_pred"],
                    dpi_actual=o["dpi_actual"],
                )
                for o in one["observers"]
            ],
        ),
        per_step=dict(
            per_step,
            definition=(
                "cmp_sgd: the engine's prediction (plain SGD, eta = lr_t / B) vs an actual "
                "plain-SGD step from the same params (ldjax.actual_step); cmp_real: the same "
                "prediction vs the real update (momentum 0.9 + weight decay); cmp_opt: the "
                "optimizer-aware prediction (ldjax.decompose with the training's optimizer and "
                "the state each update started from) vs the real update; fields are "
                "ldjax.compare's relative errors over probes x classes"
            ),
            compared_steps=rec["cmp_steps"],
        ),
        accumulated=dict(
            acc["stats"],
            definition=(
                "plain: sum over every update of the predicted Δlog π (linear, plain SGD at "
                "lr_t/B); momentum: each step's prediction times c_t/lr_t, "
                "c_t = sum_{s>=t} lr_s 0.9^(s-t); optimizer: sum of the optimizer-aware "
                "predictions of the real updates (no reweighting); actual: log π_T − log π_0; "
                "correlations over all probes x classes"
            ),
        ),
        confusion=dict(
            matrix=conf,
            top5=[list(p) for p in ranks["order"][:5]],
            ranks={f"{a},{b}": ranks[(a, b)] for a, b in PAIRS + tuple((b, a) for a, b in PAIRS)},
            definition="M[c, y] = mean over held-out digits of true class c of π(y|x); ranks "
            "among the 90 off-diagonal entries, 1 = largest",
        ),
        entk=dict(
            checkpoint_epochs=karr["epochs"],
            norms=norms,
            spearman_consecutive=consecutive,
            spearman_vs_last=vs_last,
            spearman_last_two=dict(
                mean_row=late["mean_row"],
                min_row=late["min_row"],
                whole=late["whole"],
                mean_row_with_diagonal=late_diag["mean_row"],
            ),
            influence_actual=dict(scalars(iv_actual), matrix=infl_actual),
            influence_predicted=scalars(iv_pred),
            definition=(
                "norms[e, u, o] = mean over held-out x_u of class u and x_o of class o "
                "(x_u != x_o) of ‖K(x_o, x_u)‖_F from ldjax.entk(reduction='full'); Spearman "
                "over o != u per row u, averaged over u; influence I[u, o] = mean over probes "
                "x_o of class o of the accumulated Δlog π(u|x_o) (actual, or predicted "
                "momentum-weighted); correlated with the trapezoid integral over update steps "
                "of norms[:, u, o] (and of lr_t·norms) over the 90 pairs u != o: Pearson and "
                "Spearman"
            ),
        ),
        figures=figures,
        runtime_s=dict(
            total=round(time.time() - t0, 1), before_plots=round(runtime_before_plots, 1)
        ),
    )
    with common.staged_output(args.out) as stage:
        for name, fig in figs.items():
            common.save_figure(fig, stage / f"mnist_{name}.png", footer=footer)
        common.write_json(stage / "summary.json", summary)
    if args.figures_dir:
        os.makedirs(args.figures_dir, exist_ok=True)
        for name in figures:
            with common.atomic_path(os.path.join(args.figures_dir, name)) as tmp:
                shutil.copy(os.path.join(args.out, name), tmp)
    return summary


def _report(s: dict) -> str:
    tr, one, ps, ac, cf, en = (
        s["training"],
        s["one_update"],
        s["per_step"],
        s["accumulated"],
        s["confusion"],
        s["entk"],
    )
    lines = [
        f"trained {s['config']['model']} on {s['config']['n_train']} digits, "
        f"{s['config']['epochs']} epochs "
        f"({tr['seconds']} s): train acc {tr['train_acc']:.3f}, test acc {tr['test_acc']:.3f}",
        f"(a) step on a 4 (eta {one['eta']:.3g}): Δπ(4) pred/actual "
        + "; ".join(
            f"{o['kind']} ({o['label']}, ‖K‖ {o['k_fro']:.3g}) "
            f"{o['dpi4_pred']:+.2e}/{o['dpi4_actual']:+.2e}"
            for o in one["observers"]
        ),
        f"(b) per-step rel. error, median: SGD prediction vs plain SGD "
        f"{ps['cmp_sgd']['linear']['median']:.3g}, vs the real update "
        f"{ps['cmp_real']['linear']['median']:.3g}; optimizer-aware prediction vs the real update "
        f"{ps['cmp_opt']['linear']['median']:.3g} (sign agreement "
        f"{ps['cmp_opt']['sign_agreement']['median']:.3f}; {ps['n_compared_steps']} steps)",
        f"(c) accumulated: Pearson plain {ac['plain']['pearson']:.3f}, momentum-weighted "
        f"{ac['momentum']['pearson']:.3f}, optimizer-aware {ac['optimizer']['pearson']:.3f} "
        f"(slope {ac['optimizer']['slope']:.3f})",
        f"(d) top-5 off-diagonal {cf['top5']}; ranks {cf['ranks']}",
        "(e) Spearman of ‖K_uo‖ ranking, last two checkpoints: "
        f"{en['spearman_last_two']['mean_row']:.3f}; "
        f"influence vs ∫‖K‖: Pearson {en['influence_actual']['pearson']:.3f}, "
        f"Spearman {en['influence_actual']['spearman']:.3f}",
        f"runtime {s['runtime_s']['total']} s, load {s['machine']['loadavg']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv``, run, print a short report; returns the exit code: 0 done,
    2 a usage or input error, 1 a file system error, 130 interrupted (Ctrl-C: ``--out`` keeps its
    previous results; the run holds no checkpoints, a rerun starts again)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_arguments(
        argparse.ArgumentParser(prog="ldjax mnist", description=__doc__.splitlines()[0])
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (2) or --help (0)
        return int(e.code or 0)
    try:
        summary = run(args, argv_text=" ".join(["ldjax mnist"] + [shlex.quote(a) for a in argv]))
    except (ValueError, FileNotFoundError) as e:
        print(f"ldjax mnist: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ldjax mnist: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"ldjax mnist: interrupted; {args.out} keeps its previous results, rerun to start "
            "again",
            file=sys.stderr,
        )
        return 130
    print(_report(summary))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and {len(summary['figures'])} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
