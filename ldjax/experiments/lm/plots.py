"""Figures of the LM experiments, our versions of the paper's Figures 3–5 (arXiv 2407.10490, §4).

Every function takes a tracker-like object (:class:`ldjax.experiments.lm.tracking.ProbeTracker` or
:class:`ldjax.experiments.lm.tracking.SavedTracking`: ``steps``, ``sets``, ``all_types``,
``label(t)``, ``curve(set, type, metric)``) and returns a ``matplotlib.figure.Figure`` (closed to
pyplot, so a notebook shows it once); :func:`ldjax.experiments.common.save_figure` writes it to a
file.

* :func:`plot_probe_grid` — one panel per probe type: mean log π(y|x) vs step, training prompts
  (solid) and held-out prompts (dashed). SFT: Fig 3 style; DPO: Fig 4 style.
* :func:`plot_probe_overview` — all types in one panel as the change from the first evaluation.
* :func:`plot_squeeze` — the DPO panels of Figs 4/5: log π of y⁺, y⁻ and the greedy y*; the
  teacher-forced argmax path Σ log max π and Σ log(1 − max π) along the chosen response;
  peakiness ‖A‖; the training loss and reward margin.
* :func:`plot_pretrain`, :func:`plot_one_step`, :func:`plot_compare`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "plot_probe_grid",
    "plot_probe_overview",
    "plot_squeeze",
    "plot_pretrain",
    "plot_one_step",
    "plot_compare",
]

_SET_STYLE = {
    "train": dict(ls="-", color="C0", label="training prompts"),
    "test": dict(ls="--", color="C1", label="held-out prompts"),
}
_DPI = 80


def _style(s, k):
    return _SET_STYLE.get(s, dict(ls=":", color=f"C{k + 2}", label=s))


def _done(fig):
    """Detaches ``fig`` from pyplot (no second display in notebooks) and returns it."""
    fig.set_dpi(_DPI)
    plt.close(fig)
    return fig


def _smooth(y, w: int = 10) -> np.ndarray:
    """Trailing running mean over ``w`` steps (fewer at the start)."""
    y = np.asarray(y, np.float64)
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - w, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _colors(n):
    cmap = plt.get_cmap("tab20")
    return [cmap(i % 20) for i in range(n)]


def plot_probe_grid(
    track, *, title: str, metric: str = "logp_sum", ylabel: str = "mean log π(y|x)"
):
    """One small panel per tracked type: mean ``metric`` over prompts vs training step."""
    types = track.all_types
    ncol = 4
    nrow = math.ceil(len(types) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.1 * ncol, 2.3 * nrow), squeeze=False)
    steps = np.asarray(track.steps)
    for i, t in enumerate(types):
        ax = axes[i // ncol][i % ncol]
        for k, s in enumerate(track.sets):
            ax.plot(steps, track.curve(s, t, metric), marker=".", ms=3, **_style(s, k))
        ax.set_title(track.label(t), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if i // ncol == nrow - 1 or i + ncol >= len(types):
            ax.set_xlabel("training step", fontsize=8)
    for j in range(len(types), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    return _done(fig)


def plot_probe_overview(track, *, title: str, s: str = "train", types: Sequence[str] | None = None):
    """All types in one figure: left, mean log π vs step; right, its change since the first
    evaluation (what each training phase does to each kind of response)."""
    types = list(types or track.all_types)
    steps = np.asarray(track.steps)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(14, 4.6))
    for c, t in zip(_colors(len(types)), types):
        y = track.curve(s, t)
        lw = 2.2 if t in ("chosen", "rejected", "greedy") else 1.2
        a0.plot(steps, y, color=c, lw=lw, label=track.label(t))
        a1.plot(steps, y - y[0], color=c, lw=lw)
    a0.set_ylabel("mean log π(y|x)")
    a1.set_ylabel("change of mean log π(y|x) since the first evaluation")
    a1.axhline(0, color="k", lw=0.6)
    for a in (a0, a1):
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
    fig.suptitle(f"{title} ({s} prompts)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.legend(
        *a0.get_legend_handles_labels(),
        loc="center left",
        bbox_to_anchor=(0.8, 0.5),
        fontsize=8,
        frameon=False,
    )
    return _done(fig)


def _monitor_panels(ax, ax_b, mon: dict, *, threshold: float = 0.5) -> None:
    """Panels (e), (f) of :func:`plot_squeeze` from ``SqueezeMonitor.from_history``."""
    st = mon["step"]
    ax.plot(st, mon["argmax_share"], "o-", color="C3", ms=3, label="share of moved mass → argmax")
    flagged = mon["squeezing"] > 0
    if flagged.any():
        ax.plot(
            st[flagged],
            mon["argmax_share"][flagged],
            "v",
            color="k",
            ms=5,
            label=f"flagged ({int(flagged.sum())} of {st.size})",
        )
    ax.axhline(threshold, color="0.3", ls=":", label=f"threshold {threshold:g}")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("(e) live monitor: negative term's mass moved onto the argmax", fontsize=10)
    ax.set_ylabel("Σ Δπ⁻(v*) / ½ Σ |Δπ⁻|  (predicted)")
    ax.legend(fontsize=7)
    ax_b.plot(st, mon["d_argmax_path"], color="C4", label="Δ argmax path, whole step")
    ax_b.plot(st, mon["d_argmax_path_neg"], color="C3", ls="--", label="… negative term")
    ax_b.axhline(0, color="0.6", lw=0.8)
    ax_b.set_ylabel("predicted Δ Σ log max π per step")
    ax_b.set_title("(f) live monitor: predicted Δ y* and peakiness", fontsize=10)
    if "A_norm" in mon:
        ax2 = ax_b.twinx()
        ax2.plot(st, mon["A_norm"], color="C7", lw=1, label="‖A‖ (monitored probes)")
        ax2.set_ylabel("‖A‖_F", color="C7")
    ax_b.legend(fontsize=7, loc="upper left")
    for a in (ax, ax_b):
        a.set_xlabel("training step")
        a.grid(alpha=0.3)


def plot_squeeze(
    track,
    *,
    title: str,
    history: dict | None = None,
    s: str = "train",
    monitor_threshold: float = 0.5,
):
    """The DPO dynamics panels (Figs 4/5): (a) log π of y⁺, y⁻, the greedy y* and the mean of the
    other types; (b) the teacher-forced argmax path Σ_m log max π_m and Σ_m log(1 − max π_m) along
    the chosen response; (c) peakiness ‖A‖ (mean over response positions); (d) the loss and the
    reward margin (r⁺ − r⁻) of the training batches. When the history holds the live squeezing
    monitor's numbers (:class:`ldjax.training.monitor.SqueezeMonitor`), a third row shows them:
    (e) the share of the mass moved by the negative-gradient term that lands on the argmax,
    with the threshold and the flagged steps; (f) the predicted per-step change of the argmax path
    (whole step and negative term) and the peakiness ‖A‖ of the monitored probes."""
    steps = np.asarray(track.steps)
    types = track.all_types
    mon = None
    if history and "squeeze/argmax_share" in history:
        from ldjax.training.monitor import SqueezeMonitor  # noqa: PLC0415

        mon = SqueezeMonitor.from_history(history)
    fig, axes = plt.subplots(3 if mon else 2, 2, figsize=(11, 11 if mon else 7.5))
    ax = axes[0][0]
    for t, c in (("chosen", "C2"), ("rejected", "C3"), ("greedy", "C0")):
        if t in types:
            ax.plot(steps, track.curve(s, t), color=c, lw=2, label=track.label(t))
    others = [t for t in types if t not in ("chosen", "rejected", "greedy")]
    if others:
        ax.plot(
            steps,
            np.mean([track.curve(s, t) for t in others], axis=0),
            color="0.4",
            ls="--",
            label=f"mean of the other {len(others)} types",
        )
    ax.set_title("(a) sequence log-probability", fontsize=10)
    ax.set_ylabel("mean log π(y|x)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    for k, st in enumerate(track.sets):
        sty = _style(st, k)
        ax.plot(
            steps,
            track.curve(st, "chosen", "argmax_path"),
            color="C4",
            ls=sty["ls"],
            label=f"Σ log max π (argmax path), {sty['label']}",
        )
        ax.plot(
            steps,
            track.curve(st, "chosen", "except_argmax"),
            color="C5",
            ls=sty["ls"],
            label=f"Σ log(1 − max π), {sty['label']}",
        )
    ax.set_title("(b) teacher-forced argmax path along y⁺ (the code's 'y*')", fontsize=10)
    ax.set_ylabel("sum over response positions")
    ax.legend(fontsize=7)

    ax = axes[1][0]
    for t, c in (
        ("chosen", "C2"),
        ("rejected", "C3"),
        ("greedy", "C0"),
        ("irr_hum", "C6"),
        ("random_nonhum", "C7"),
    ):
        if t in types:
            ax.plot(steps, track.curve(s, t, "A_norm"), color=c, label=track.label(t))
    ax.set_title("(c) peakiness: mean ‖A_m‖_F over response positions", fontsize=10)
    ax.set_ylabel("‖A‖_F = √(V − 2 + V‖π‖²)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    if history and history.get("step"):
        hs = np.asarray(history["step"])
        ax.plot(hs, history["loss"], color="C0", alpha=0.25, lw=0.8)
        ax.plot(hs, _smooth(history["loss"]), color="C0", lw=2, label="training loss")
        ax.set_ylabel("loss", color="C0")
        if "margin" in history:
            ax2 = ax.twinx()
            ax2.plot(hs, history["margin"], color="C1", alpha=0.25, lw=0.8)
            ax2.plot(
                hs, _smooth(history["margin"]), color="C1", lw=2, label="reward margin r⁺ − r⁻"
            )
            ax2.set_ylabel("margin r⁺ − r⁻ (running mean)", color="C1")
        ax.set_title("(d) training batches (faint: per step; bold: running mean)", fontsize=10)
    else:
        ax.axis("off")
    for a in axes.ravel()[:3]:
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
    axes[1][1].set_xlabel("training step")
    if mon:
        _monitor_panels(axes[2][0], axes[2][1], mon, threshold=monitor_threshold)
    fig.suptitle(f"{title} ({s} prompts)", fontsize=11)
    fig.tight_layout()
    return _done(fig)


def plot_pretrain(
    history: dict,
    *,
    title: str = "Pretraining",
    eval_steps: Sequence[int] | None = None,
    eval_loss: Sequence[float] | None = None,
    ax=None,
):
    """Next-token loss (nats per token) of the training batches, and held-out loss if given;
    drawn into ``ax`` if given (its figure is returned), else into a new figure."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 3.6))
    else:
        fig = ax.figure
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.3, color="C0")
    ax.plot(
        history["step"],
        _smooth(history["loss"]),
        lw=2,
        color="C0",
        label="training batches (running mean)",
    )
    if eval_steps is not None and eval_loss is not None and len(eval_steps):
        ax.plot(eval_steps, eval_loss, "o-", color="C3", label="held-out prompts")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if not own:
        return fig
    fig.tight_layout()
    return _done(fig)


def plot_one_step(result: dict, *, title: str = "One SFT step: predicted vs actual Δ log π"):
    """Left: error of the prediction vs η (log-log) with its fitted slopes; right: predicted and
    actual Δ log π(y|x_u) per probe type at the smallest η."""
    etas = np.asarray(result["etas"])
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.4))
    a0.loglog(
        etas,
        result["rel_error_linear"],
        "o-",
        label=f"relative error of Δlog π (A·Δz), slope {result['slope_rel_error_linear']:.2f}",
    )
    a0.loglog(
        etas,
        result["entk_abs_error"],
        "s-",
        label=f"eNTK-step ‖Δz − (−ηKG)‖, slope {result['slope_entk_abs_error']:.2f}",
    )
    ref = result["entk_abs_error"][0] * (etas / etas[0]) ** 2
    a0.loglog(etas, ref, "k:", lw=1, label="slope 2 reference")
    a0.set_xlabel("learning rate η")
    a0.set_ylabel("error")
    a0.grid(alpha=0.3, which="both")
    a0.legend(fontsize=8)
    types = result["types"]
    x = np.arange(len(types))
    k = 0
    a1.bar(x - 0.2, result["pred"][k], 0.4, label="predicted (−η A K G)")
    a1.bar(x + 0.2, result["actual"][k], 0.4, label="actual (one SGD step)")
    a1.set_xticks(x)
    a1.set_xticklabels(types, rotation=60, ha="right", fontsize=8)
    a1.set_ylabel(f"Δ log π(y|x_u) at η = {etas[k]:g}")
    a1.axhline(0, color="k", lw=0.6)
    a1.grid(alpha=0.3, axis="y")
    a1.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _done(fig)


def plot_compare(
    tracks: dict,
    *,
    title: str,
    types: Sequence[str] = ("chosen", "rejected", "greedy"),
    s: str = "train",
    metric: str = "logp_sum",
    relative: bool = False,
    ncol: int = 4,
):
    """Several runs (``{name: track}``, e.g. baseline vs extend) on a few types, one panel per type;
    ``relative`` plots the change since each run's first evaluation."""
    nrow = math.ceil(len(types) / ncol)
    ncol = min(ncol, len(types))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow), squeeze=False)
    for i, t in enumerate(types):
        ax = axes[i // ncol][i % ncol]
        for k, (name, tr) in enumerate(tracks.items()):
            if t in tr.all_types:
                y = tr.curve(s, t, metric)
                ax.plot(tr.steps, y - y[0] if relative else y, color=f"C{k}", label=name)
        ax.set_title(tracks[next(iter(tracks))].label(t), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel(("change of " if relative else "") + f"mean {metric}", fontsize=8)
        if i + ncol >= len(types):
            ax.set_xlabel("training step", fontsize=8)
    for j in range(len(types), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title} ({s} prompts)", fontsize=11)
    fig.tight_layout()
    return _done(fig)


# ----------------------------------------------------------------------------------------------
# Token maps (ldjax.token_influence)
# ----------------------------------------------------------------------------------------------


def _token_text(tokenizer, t: int) -> str:
    if t in (getattr(tokenizer, "eos_id", -1),):
        return "EOS"
    s = tokenizer.decode([int(t)])
    return {" ": "␣", "\n": "⏎", "": "·"}.get(s, s if s.isprintable() else "?")


def plot_token_map(
    c,
    probe_targets,
    probe_mask,
    train_targets,
    train_mask,
    tokenizer,
    *,
    title: str = "",
    ax=None,
    max_tokens: int = 60,
):
    """Heatmap of one token map ``c[m, l]`` (:func:`ldjax.token_influence` for one probe o and one
    training sequence u): rows are the probe's read positions m, columns the training positions l
    its loss trains, each labelled by the token it predicts; red pushes the probe token up, blue
    down. The first ``max_tokens`` of each are shown. Draws into ``ax`` if given."""
    c = np.asarray(c, np.float64)
    rm = np.flatnonzero(np.asarray(probe_mask))[:max_tokens]
    cl = np.flatnonzero(np.asarray(train_mask))[:max_tokens]
    block = c[np.ix_(rm, cl)]
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(2.0 + 0.16 * len(cl), 1.6 + 0.16 * len(rm)))
    else:
        fig = ax.figure
    lim = max(np.abs(block).max(), 1e-30)
    im = ax.imshow(
        block, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"
    )
    ax.set_yticks(range(len(rm)))
    ax.set_yticklabels(
        [_token_text(tokenizer, t) for t in np.asarray(probe_targets)[rm]],
        fontsize=6.5,
        family="monospace",
    )
    ax.set_xticks(range(len(cl)))
    ax.set_xticklabels(
        [_token_text(tokenizer, t) for t in np.asarray(train_targets)[cl]],
        fontsize=6.5,
        family="monospace",
    )
    ax.set_xlabel("training position l (the token it trains)")
    ax.set_ylabel("probe position m (its token)")
    ax.set_title(title or "C[m, l]: position l's push on the probe's token at m", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="Δ log π (linear)")
    if not own:
        return fig
    fig.tight_layout()
    return _done(fig)


def plot_token_push(
    c, train_targets, train_mask, tokenizer, *, title: str = "", width: int = 70, ax=None
):
    """The training response as text, each token coloured by its total push ``Σ_m c[m, l]`` on the
    probe (red: raises the probe's log π, blue: lowers it). Draws into ``ax`` if given."""
    c = np.asarray(c, np.float64)
    cols = np.flatnonzero(np.asarray(train_mask))
    push = c[:, cols].sum(axis=0)
    words = [_token_text(tokenizer, t) for t in np.asarray(train_targets)[cols]]
    lines = max(1, int(np.ceil(len(words) / width)))
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(0.13 * min(width, len(words)) + 1.5, 0.35 * lines + 1.0))
    else:
        fig = ax.figure
    lim = max(np.abs(push).max(), 1e-30)
    cmap = plt.get_cmap("RdBu_r")
    for k, (w, v) in enumerate(zip(words, push)):
        x, y = k % width, k // width
        ax.text(
            x,
            -y,
            w,
            ha="center",
            va="center",
            family="monospace",
            fontsize=8,
            bbox=dict(boxstyle="square,pad=0.15", fc=cmap(0.5 + 0.5 * v / lim), ec="none"),
        )
    ax.set_xlim(-1, min(width, len(words)))
    ax.set_ylim(-lines, 1)
    ax.axis("off")
    ax.set_title(
        title or f"each training token's total push on the probe (max |push| {lim:.2e})", fontsize=9
    )
    if not own:
        return fig
    fig.tight_layout()
    return _done(fig)


def plot_dpo_token_maps(
    c_pos,
    c_neg,
    probe_targets,
    probe_mask,
    pos,
    neg,
    tokenizer,
    *,
    title: str = "",
    max_tokens: int = 40,
):
    """A DPO step's two token maps side by side: the y⁺ branch (positions of x⁺) and the y⁻
    branch (positions of x⁻) on the same probe. ``pos``/``neg``: ``(targets, mask)`` of x⁺, x⁻."""
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 0.32 * max_tokens, 1.8 + 0.16 * max_tokens))
    plot_token_map(
        c_pos,
        probe_targets,
        probe_mask,
        *pos,
        tokenizer,
        ax=axes[0],
        max_tokens=max_tokens,
        title="y⁺ branch: C⁺[m, l]",
    )
    plot_token_map(
        c_neg,
        probe_targets,
        probe_mask,
        *neg,
        tokenizer,
        ax=axes[1],
        max_tokens=max_tokens,
        title="y⁻ branch: C⁻[m, l]",
    )
    fig.suptitle(title or "One DPO step, per token: the y⁺ and y⁻ terms", fontsize=11)
    fig.tight_layout()
    return _done(fig)
