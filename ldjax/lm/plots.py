"""Figures of the LM experiments, our versions of the paper's Figures 3–5 (matplotlib, Agg).

Every function takes a tracker-like object (:class:`ldjax.lm.tracking.ProbeTracker` or
:class:`ldjax.lm.tracking.SavedTracking`: ``steps``, ``sets``, ``all_types``, ``label(t)``,
``curve(set, type, metric)``) and writes one small PNG, returning its path.

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
from pathlib import Path
from typing import Optional, Sequence

from ldjax._png import save_png
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_probe_grid", "plot_probe_overview", "plot_squeeze", "plot_pretrain",
           "plot_one_step", "plot_compare"]

_SET_STYLE = {"train": dict(ls="-", color="C0", label="training prompts"),
              "test": dict(ls="--", color="C1", label="held-out prompts")}
_DPI = 80


def _style(s, k):
    return _SET_STYLE.get(s, dict(ls=":", color=f"C{k + 2}", label=s))


def _save(fig, path) -> str:
    """The one PNG writer of the package (:func:`ldjax._png.save_png`: 256-colour palette)."""
    return save_png(fig, str(Path(path)), dpi=_DPI)


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


def plot_probe_grid(track, path, *, title: str, metric: str = "logp_sum",
                    ylabel: str = "mean log π(y|x)") -> str:
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
    return _save(fig, path)


def plot_probe_overview(track, path, *, title: str, s: str = "train",
                        types: Optional[Sequence[str]] = None) -> str:
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
    fig.legend(*a0.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.8, 0.5),
               fontsize=8, frameon=False)
    return _save(fig, path)


def plot_squeeze(track, path, *, title: str, history: Optional[dict] = None,
                 s: str = "train") -> str:
    """The DPO dynamics panels (Figs 4/5): (a) log π of y⁺, y⁻, the greedy y* and the mean of the
    other types; (b) the teacher-forced argmax path Σ_m log max π_m and Σ_m log(1 − max π_m) along
    the chosen response; (c) peakiness ‖A‖ (mean over response positions); (d) the loss and the
    reward margin (r⁺ − r⁻) of the training batches."""
    steps = np.asarray(track.steps)
    types = track.all_types
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    for t, c in (("chosen", "C2"), ("rejected", "C3"), ("greedy", "C0")):
        if t in types:
            ax.plot(steps, track.curve(s, t), color=c, lw=2, label=track.label(t))
    others = [t for t in types if t not in ("chosen", "rejected", "greedy")]
    if others:
        ax.plot(steps, np.mean([track.curve(s, t) for t in others], axis=0), color="0.4", ls="--",
                label=f"mean of the other {len(others)} types")
    ax.set_title("(a) sequence log-probability", fontsize=10)
    ax.set_ylabel("mean log π(y|x)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    for k, st in enumerate(track.sets):
        sty = _style(st, k)
        ax.plot(steps, track.curve(st, "chosen", "argmax_path"), color="C4", ls=sty["ls"],
                label=f"Σ log max π (argmax path), {sty['label']}")
        ax.plot(steps, track.curve(st, "chosen", "except_argmax"), color="C5", ls=sty["ls"],
                label=f"Σ log(1 − max π), {sty['label']}")
    ax.set_title("(b) teacher-forced argmax path along y⁺ (the code's 'y*')", fontsize=10)
    ax.set_ylabel("sum over response positions")
    ax.legend(fontsize=7)

    ax = axes[1][0]
    for t, c in (("chosen", "C2"), ("rejected", "C3"), ("greedy", "C0"), ("irr_hum", "C6"),
                 ("random_nonhum", "C7")):
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
            ax2.plot(hs, _smooth(history["margin"]), color="C1", lw=2, label="reward margin r⁺ − r⁻")
            ax2.set_ylabel("margin r⁺ − r⁻ (running mean)", color="C1")
        ax.set_title("(d) training batches (faint: per step; bold: running mean)", fontsize=10)
    else:
        ax.axis("off")
    for a in axes.ravel()[:3]:
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
    axes[1][1].set_xlabel("training step")
    fig.suptitle(f"{title} ({s} prompts)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_pretrain(history: dict, path, *, title: str = "Pretraining",
                  eval_steps: Optional[Sequence[int]] = None,
                  eval_loss: Optional[Sequence[float]] = None) -> str:
    """Next-token loss (nats per token) of the training batches, and held-out loss if given."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.3, color="C0")
    ax.plot(history["step"], _smooth(history["loss"]), lw=2, color="C0", label="training batches (running mean)")
    if eval_steps is not None and eval_loss is not None and len(eval_steps):
        ax.plot(eval_steps, eval_loss, "o-", color="C3", label="held-out prompts")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_one_step(result: dict, path, *, title: str = "One SFT step: predicted vs actual Δ log π") -> str:
    """Left: error of the prediction vs η (log-log) with its fitted slopes; right: predicted and
    actual Δ log π(y|x_u) per probe type at the smallest η."""
    etas = np.asarray(result["etas"])
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.4))
    a0.loglog(etas, result["rel_error_linear"], "o-",
              label=f"relative error of Δlog π (A·Δz), slope {result['slope_rel_error_linear']:.2f}")
    a0.loglog(etas, result["entk_abs_error"], "s-",
              label=f"eNTK-step ‖Δz − (−ηKG)‖, slope {result['slope_entk_abs_error']:.2f}")
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
    return _save(fig, path)


def plot_compare(tracks: dict, path, *, title: str, types: Sequence[str] = ("chosen", "rejected", "greedy"),
                 s: str = "train", metric: str = "logp_sum", relative: bool = False, ncol: int = 4) -> str:
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
    return _save(fig, path)
