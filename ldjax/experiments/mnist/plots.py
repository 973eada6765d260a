"""Figures of the MNIST warm-up analyses (Ren & Sutherland, ICLR 2025, arXiv 2407.10490, §2 and
Figure 1): one figure per analysis (a)–(e).

Every function takes the output of :mod:`ldjax.experiments.mnist.analysis` and returns a
``matplotlib.figure.Figure`` (closed to pyplot, so a notebook shows it once, where it is the value
of a cell); :func:`ldjax.experiments.common.save_figure` writes it to a file.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from ldjax.experiments.mnist.analysis import offdiag_ranks

__all__ = ["plot_one_update", "plot_per_step", "plot_accumulated", "plot_confusion", "plot_entk"]

_PRED = "#1f77b4"
_EXACT = "#9ecae1"
_ACT = "#ff7f0e"
_SGD = "#2ca02c"
_REAL = "#d62728"


def _done(fig):
    """Detaches ``fig`` from pyplot (no second display in notebooks) and returns it."""
    fig.set_dpi(90)
    plt.close(fig)
    return fig


def _need(d: dict, keys, who: str) -> None:
    for k in keys:
        if k not in d:
            raise ValueError(f"{who}: input lacks field '{k}'")


# ----------------------------------------------------------------------------- (a)


def plot_one_update(res: dict, images: np.ndarray):
    """(a) One SGD step on x_u (a "4"): the image, G = π − e_4, and Δπ on three observers.

    Args:
      res: :func:`ldjax.experiments.mnist.analysis.one_update`.
      images: the pool it used, ``(N, 28, 28[, 1])`` (for the thumbnails).
    """
    _need(res, ("u", "G", "observers", "eta", "label", "pi_u"), "plot_one_update")
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    lab = res["label"]
    V = len(res["G"])
    cls = np.arange(V)
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.2), gridspec_kw=dict(height_ratios=[0.8, 1.4]))
    axes[0, 0].imshow(images[res["u"]], cmap="gray_r")
    axes[0, 0].set_title(
        f"x_u: a {lab} (updated)\nπ({lab}|x_u) = {res['pi_u'][lab]:.3f}", fontsize=9
    )
    ax = axes[1, 0]
    ax.bar(cls, res["G"], color=["#d62728" if i == lab else "#7f7f7f" for i in cls])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(cls)
    ax.set_xlabel("class")
    ax.set_ylabel(f"G = π(x_u) − e_{lab}")
    ax.set_title(f"residual G on x_u; one SGD step, η = {res['eta']:.3g}", fontsize=9)
    w = 0.28
    for k, o in enumerate(res["observers"]):
        axes[0, k + 1].imshow(images[o["index"]], cmap="gray_r")
        axes[0, k + 1].set_title(
            f"x_o {k + 1}: {o['kind']} (label {o['label']})\n‖K(x_o, x_u)‖_F = {o['k_fro']:.3g},"
            f" π({lab}|x_o) = {o['pi'][lab]:.3f}",
            fontsize=8.5,
        )
        ax = axes[1, k + 1]
        ax.bar(cls - w, o["dpi_pred"], w, color=_PRED, label="predicted −ηAKG (linear)")
        ax.bar(cls, o["dpi_pred_exact"], w, color=_EXACT, label="predicted, exact log-softmax")
        ax.bar(cls + w, o["dpi_actual"], w, color=_ACT, label="actual SGD step")
        ax.axhline(0, color="k", lw=0.6)
        ax.axvline(lab, color="#d62728", lw=0.6, ls=":")
        ax.set_xticks(cls)
        ax.set_xlabel("class y")
        ax.set_ylabel("Δπ(y | x_o)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        rel = np.linalg.norm(o["dpi_pred"] - o["dpi_actual"]) / max(
            np.linalg.norm(o["dpi_actual"]), 1e-300
        )
        ax.set_title(
            f"Δπ({lab}|x_o) pred {o['dpi_pred'][lab]:+.2e} / actual {o['dpi_actual'][lab]:+.2e}\n"
            f"rel. error over the {V} classes {rel:.1%}",
            fontsize=8.5,
            pad=14,
        )
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[1, 1].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=3,
        fontsize=8,
        bbox_to_anchor=(0.5, 0.955),
        frameon=False,
    )
    fig.suptitle(
        f"(a) One SGD step on a '{lab}' pulls class {lab} up on x_o in proportion to K(x_o, x_u):"
        f" Δlog π(x_o) ≈ −η A(x_o) K(x_o, x_u) G",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.93))
    return _done(fig)


# ----------------------------------------------------------------------------- (b)


def plot_per_step(rec: dict, max_points: int = 4000, seed: int = 0):
    """(b) Per-step predicted vs actual Δlog π on the probes along training.

    Args:
      rec: :meth:`ldjax.experiments.mnist.analysis.StepTracker.arrays`.
    """
    _need(
        rec,
        ("cmp_steps", "cmp_sgd", "cmp_real", "pred_linear", "actual", "sgd_actual", "steps"),
        "plot_per_step",
    )
    steps = rec["cmp_steps"]
    pos = np.searchsorted(rec["steps"], steps)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    ax = axes[0]
    cs, cr = rec["cmp_sgd"], rec["cmp_real"]
    ax.plot(
        steps, cs["linear"], "-o", ms=2.5, color=_SGD, label="vs plain-SGD step: total (A linear)"
    )
    ax.plot(
        steps, cs["exact"], "--", color=_SGD, alpha=0.7, label="vs plain-SGD step: eNTK step only"
    )
    ax.plot(
        steps,
        cs["linearisation"],
        ":",
        color="#8c564b",
        label="vs plain-SGD step: A linearisation only",
    )
    ax.plot(steps, cr["linear"], "-o", ms=2.5, color=_REAL, label="vs real step (momentum + wd)")
    co = rec.get("cmp_opt")
    if co is not None:
        ax.plot(
            steps,
            co["linear"],
            "-o",
            ms=2.5,
            color=_PRED,
            label="optimizer-aware prediction vs real step",
        )
    ax.set_yscale("log")
    ax.set_xlabel("update step t")
    ax.set_ylabel("relative error of Δlog π")
    ax.set_title(
        "‖pred − actual‖ / ‖actual‖ over probes × classes\n"
        "(where η_t → 0 the actual change nears float32 round-off)",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(rec["steps"], rec["lr"], color="#999999", lw=0.8, label="η_t (right axis)")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate η_t", color="#777777", fontsize=8)
    lr_ax.tick_params(axis="y", labelsize=7, colors="#777777")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = lr_ax.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left")
    rng = np.random.default_rng(seed)
    pred = rec["pred_linear"][pos].ravel()
    opt = co is not None and "pred_opt_linear" in rec
    for ax, act, name, col, cmp in (
        (axes[1], rec["sgd_actual"].ravel(), "actual plain-SGD step", _SGD, cs),
        (axes[2], rec["actual"][pos].ravel(), "actual real step (momentum + wd)", _REAL, cr),
    ):
        sel = rng.choice(pred.size, size=min(pred.size, max_points), replace=False)
        label = "plain-SGD prediction [−ηAKG]_y" if opt and col == _REAL else None
        ax.scatter(pred[sel], act[sel], s=3, color=col, alpha=0.5, edgecolors="none", label=label)
        shown = [pred[sel], act[sel]]
        title = (
            f"{name}: median rel. error {np.median(cmp['linear']):.2g},\n"
            f"sign agreement {np.median(cmp['sign_agreement']):.2f} "
            f"({len(steps)} steps × probes × classes)"
        )
        if opt and col == _REAL:
            p_opt = rec["pred_opt_linear"][pos].ravel()
            ax.scatter(
                p_opt[sel],
                act[sel],
                s=3,
                color=_PRED,
                alpha=0.6,
                edgecolors="none",
                label="optimizer-aware prediction J_o Δθ",
            )
            shown.append(p_opt[sel])
            title = (
                f"{name}, median rel. error:\nplain-SGD {np.median(cmp['linear']):.2g} "
                f"(sign agreement {np.median(cmp['sign_agreement']):.2f}),\noptimizer-aware "
                f"{np.median(co['linear']):.2g} (sign agreement "
                f"{np.median(co['sign_agreement']):.2f})"
            )
        lim = np.abs(np.concatenate(shown)).max() * 1.05
        ax.plot([-lim, lim], [-lim, lim], "k-", lw=0.6, label="y = x")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(7))
        ax.set_xlabel(
            "predicted Δlog π(y|x_o)"
            if opt and col == _REAL
            else "predicted Δlog π(y|x_o) = [−ηAKG]_y, η = η_t / B"
        )
        ax.set_ylabel(name)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", markerscale=3)
    fig.suptitle(
        "(b) Per-step prediction on fixed probes: the engine's decomposition (plain SGD and "
        "optimizer-aware) vs the actual change",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    return _done(fig)


# ----------------------------------------------------------------------------- (c)


def plot_accumulated(
    acc: dict, probe_y: np.ndarray, pairs=((4, 9), (9, 4), (5, 3)), lrs: np.ndarray | None = None
):
    """(c) Σ_t predicted Δlog π against the actual total change, and three class pairs over time.

    Args:
      acc: :func:`ldjax.experiments.mnist.analysis.accumulated` (with ``probe_y``).
      probe_y: ``(P,)`` probe labels.
      pairs: ``(u, o)``: curves of mean accumulated Δlog π(u | x_o) over probes of class o.
    """
    _need(
        acc,
        ("pred_sum", "pred_sum_momentum", "actual_sum", "cum_pred", "cum_actual", "stats"),
        "plot_accumulated",
    )
    probe_y = np.asarray(probe_y)
    a = acc["actual_sum"]
    own = np.zeros(a.shape, bool)
    own[np.arange(a.shape[0]), probe_y] = True
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    middle = (
        ("pred_sum_optimizer", "optimizer")
        if "pred_sum_optimizer" in acc
        else (
            "pred_sum_momentum",
            "momentum",
        )
    )
    for ax, key, name in ((axes[0], "pred_sum", "plain"), (axes[1], *middle)):
        p = acc[key]
        st = acc["stats"][name]
        ax.scatter(
            p[~own],
            a[~own],
            s=5,
            alpha=0.5,
            color="#7f7f7f",
            edgecolors="none",
            label="y ≠ label of x_o",
        )
        ax.scatter(
            p[own], a[own], s=9, alpha=0.8, color=_REAL, edgecolors="none", label="y = label of x_o"
        )
        lim = np.array([min(p.min(), 0), max(p.max(), 0)])
        ax.plot(
            lim,
            st["slope"] * lim,
            "k--",
            lw=0.8,
            label=f"least squares: actual = {st['slope']:.2f} × pred",
        )
        ax.set_xlabel(
            "Σ_t predicted Δlog π(y|x_o)"
            + {
                "plain": " (plain-SGD steps)",
                "momentum": " · c_t/η_t",
                "optimizer": " (the real updates, optimizer-aware)",
            }[name]
        )
        ax.set_ylabel("actual log π_T(y|x_o) − log π_0(y|x_o)")
        what = {
            "plain": "plain-SGD predictions",
            "momentum": "momentum-weighted (c_t = Σ_s≥t η_s μ^(s−t))",
            "optimizer": "optimizer-aware predictions (no reweighting)",
        }[name]
        ax.set_title(
            f"{what}\nPearson {st['pearson']:.3f}, Spearman {st['spearman']:.3f} "
            f"over {a.size} probe×class entries",
            fontsize=9,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax = axes[2]
    t = np.arange(acc["cum_actual"].shape[0]) + 1
    cum_key, cum_name = (
        ("cum_pred_optimizer", "optimizer-aware")
        if "cum_pred_optimizer" in acc
        else ("cum_pred_momentum", "momentum-weighted")
    )
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    for (u, o), col in zip(pairs, colors):
        sel = probe_y == o
        if not sel.any():
            continue
        ax.plot(
            t,
            acc["cum_actual"][:, sel, u].mean(1),
            "-",
            color=col,
            label=f"actual Δlog π({u}|x_o), x_o a {o}",
        )
        ax.plot(
            t,
            acc[cum_key][:, sel, u].mean(1),
            "--",
            color=col,
            label=f"  predicted ({cum_name})",
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("update step t")
    ax.set_ylabel("Σ Δlog π(u|x_o), mean over probes")
    ax.set_title("accumulated influence over training, selected class pairs", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower left")
    fig.suptitle(
        "(c) Accumulated influence: summed one-step predictions vs the actual total change "
        "on the probes",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    return _done(fig)


# ----------------------------------------------------------------------------- (d)


def plot_confusion(
    m: np.ndarray, highlight=((4, 9), (5, 3), (8, 5)), n_test: int | None = None, *, ax=None
):
    """(d) The 10×10 matrix of mean π(y|x) per true class (log colour scale), top pairs boxed.

    Args:
      m: :func:`ldjax.experiments.mnist.analysis.class_confusion` ``(C, C)``, rows = true class.
      highlight: pairs whose ranks the title states.
      n_test: the number of digits behind ``m`` (for the title).
      ax: draw into this axes (and its figure) instead of a new figure.
    Returns:
      The figure.
    """
    m = np.asarray(m)
    c = m.shape[0]
    ranks = offdiag_ranks(m)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7.4, 6.6))
    else:
        fig = ax.figure
    im = ax.imshow(
        np.clip(m, 1e-4, 1), cmap="viridis", norm=LogNorm(vmin=max(m.min(), 1e-4), vmax=1)
    )
    for i in range(c):
        for j in range(c):
            v = m[i, j]
            ax.text(
                j,
                i,
                f"{v:.2f}" if v >= 0.01 else f"{v:.0e}".replace("e-0", "e-"),
                ha="center",
                va="center",
                fontsize=6.5,
                color="w" if v < 0.3 else "k",
            )
    top5 = ranks["order"][:5]
    for i, j in top5:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#ff3030", lw=1.8))
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xlabel("class y")
    ax.set_ylabel("true class of x")
    fig.colorbar(im, ax=ax, label="mean π(y | x)  (log scale)")
    hl = ", ".join(f"({a},{b}) #{ranks[(a, b)]}, ({b},{a}) #{ranks[(b, a)]}" for a, b in highlight)
    ax.set_title(
        "(d) mean π(y|x) per true class"
        f"{'' if n_test is None else f' on {n_test} held-out digits'}\n"
        f"red boxes: the 5 largest of the 90 off-diagonal entries\nranks: {hl}",
        fontsize=9,
    )
    if not own:
        return fig
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _done(fig)


# ----------------------------------------------------------------------------- (e)


def plot_entk(
    kernel: dict,
    stability: dict,
    infl: dict,
    influence: np.ndarray,
    pairs=((4, 9), (5, 3), (8, 5), (1, 0)),
):
    """(e) ‖K_uo‖_F per class pair through training, ranking stability and influence vs ∫‖K‖.

    Args:
      kernel: :meth:`ldjax.experiments.mnist.analysis.KernelTracker.arrays`.
      stability: ``{"consecutive": [(e_a, e_b, mean_row), ...], "vs_last": [...]}``.
      infl: :func:`ldjax.experiments.mnist.analysis.influence_vs_kernel`.
      influence: ``I[u, o]`` the accumulated-influence matrix used for ``infl``.
    """
    _need(kernel, ("epochs", "norms"), "plot_entk")

    def epoch_axis(ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 4.0, 6.0)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "0" if v == 0.5 else f"{v:g}"))

    norms = np.asarray(kernel["norms"])
    ep = np.asarray(kernel["epochs"])
    c = norms.shape[1]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9.5))
    ax = axes[0, 0]
    im = ax.imshow(norms[-1], cmap="magma", norm=LogNorm())
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xlabel("class o of the observed digit x_o")
    ax.set_ylabel("class u of the updated digit x_u")
    ax.set_title(
        f"mean ‖K(x_o, x_u)‖_F at epoch {ep[-1]} (last checkpoint)\n"
        "row u ranked over o: the digits that an update on u moves most",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="‖K_uo‖_F (log scale)")
    ax = axes[0, 1]
    x = np.where(ep == 0, 0.5, ep)
    for u, o in pairs:
        ax.plot(x, norms[:, u, o], "-o", ms=3, label=f"u={u}, o={o}")
    ax.plot(x, norms[:, np.arange(c), np.arange(c)].mean(1), "k--", lw=1, label="u = o (mean)")
    off = norms[:, ~np.eye(c, dtype=bool)]
    ax.plot(x, off.mean(1), "k:", lw=1, label="all u ≠ o (mean)")
    epoch_axis(ax)
    ax.set_yscale("log")
    ax.set_xlabel("epoch (log scale; epoch 0 drawn at 0.5)")
    ax.set_ylabel("mean ‖K_uo‖_F (log scale)")
    ax.set_title(
        "the magnitudes change during training (‖K_uo‖_F = ‖K_ou‖_F: symmetric)", fontsize=9
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    cons = stability["consecutive"]
    vl = stability["vs_last"]
    ax.plot(
        [b for _, b, _ in cons],
        [r for _, _, r in cons],
        "-o",
        ms=3,
        label="checkpoint vs the previous one (x: the later)",
    )
    ax.plot(
        [a if a > 0 else 0.5 for a, _, _ in vl],
        [r for _, _, r in vl],
        "-s",
        ms=3,
        label="checkpoint vs the last one",
    )
    ax.axhline(0.8, color="#999999", lw=0.8, ls="--", label="ρ = 0.8")
    epoch_axis(ax)
    ax.set_ylim(min(0.0, min(r for *_, r in cons + vl) - 0.05), 1.02)
    ax.set_xlabel("epoch (log scale)")
    ax.set_ylabel("Spearman ρ, ranking over o ≠ u, mean over u")
    ax.set_title("the ranking of ‖K_uo‖_F over o is stable late in training", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1, 1]
    off_mask = ~np.eye(c, dtype=bool)
    xi = infl["integral"][off_mask]
    yi = np.asarray(influence)[off_mask]
    ax.scatter(xi, yi, s=14, alpha=0.8, color="#1f77b4", edgecolors="none")
    k = 0
    for u, o in pairs[:3]:
        for a, b in ((u, o), (o, u)):
            ax.plot(infl["integral"][a, b], influence[a, b], "o", ms=5, mfc="none", mec="#d62728")
            ax.annotate(
                f"u={a}, o={b}",
                (infl["integral"][a, b], influence[a, b]),
                fontsize=7,
                color="#d62728",
                xytext=(-48, 8 if k % 2 == 0 else -12),
                textcoords="offset points",
            )
            k += 1
    ax.set_xlabel("∫ ‖K_uo‖_F dt  (trapezoid over update steps)")
    ax.set_ylabel("I[u, o] = Σ_t Δlog π(u|x_o) (actual), mean over x_o in o")
    ax.set_title(
        f"accumulated influence vs time-integral of ‖K_uo‖_F, {infl['n_pairs']} pairs u ≠ o:\n"
        f"Pearson {infl['pearson']:.2f}, Spearman {infl['spearman']:.2f}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    fig.suptitle(
        "(e) eNTK norms ‖K_uo‖_F per class pair on fixed held-out digits, through training",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    return _done(fig)
