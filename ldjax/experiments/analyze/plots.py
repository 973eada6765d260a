"""Figures of a batch influence job (``ldjax analyze``): the influence matrix sorted by class or
type, the aggregate by group pair, the top-k digits of each probe, and the audit's predicted
against actual changes.

Every function returns a ``matplotlib.figure.Figure`` (closed to pyplot) and writes nothing;
:func:`ldjax.experiments.common.save_figure` writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import SymLogNorm, TwoSlopeNorm
from matplotlib.ticker import MaxNLocator

from ldjax.experiments.analyze.readouts import sort_order

__all__ = ["plot_heatmap", "plot_aggregate", "plot_gallery", "plot_audit"]


def _done(fig):
    fig.set_dpi(90)
    plt.close(fig)
    return fig


def _norm(values):
    """A symmetric log colour scale around 0 (influence spans decades)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    top = float(np.max(np.abs(v))) if v.size else 1.0
    top = top if top > 0 else 1.0
    nz = np.abs(v[v != 0])
    lin = float(np.quantile(nz, 0.5)) if nz.size else top / 10
    return SymLogNorm(linthresh=max(lin, top * 1e-6), vmin=-top, vmax=top, base=10)


def _colorbar(fig, im, ax, label):
    """A colour bar whose ticks inside the linear part of a symlog scale are dropped but 0 (they
    would sit on top of each other)."""
    cb = fig.colorbar(im, ax=ax, shrink=0.85, label=label)
    lin = getattr(im.norm, "linthresh", None)
    if lin is not None:
        ticks = [t for t in cb.get_ticks() if t == 0 or abs(t) >= lin]
        top = im.norm.vmax
        cb.set_ticks([t for t in ticks if abs(t) <= top * (1 + 1e-9)])
    return cb


def _boundaries(ax, groups_sorted, axis: str):
    g = np.asarray(groups_sorted)
    cuts = np.flatnonzero(g[1:] != g[:-1]) + 0.5
    for c in cuts:
        (ax.axhline if axis == "y" else ax.axvline)(c, color="k", lw=0.4, alpha=0.6)
    starts = np.r_[0, np.ceil(cuts)].astype(int)
    ends = np.r_[np.ceil(cuts), len(g)].astype(int)
    centres = (starts + ends - 1) / 2
    labels = [str(g[s]) for s in starts]
    if axis == "y":
        ax.set_yticks(centres, labels, fontsize=7)
    else:
        ax.set_xticks(centres, labels, fontsize=7, rotation=45 if len(labels) > 10 else 0)


def plot_heatmap(
    score,
    groups_u: Sequence,
    groups_o: Sequence,
    *,
    order_u=None,
    order_o=None,
    title: str = "",
    label_u: str = "training example u",
    label_o: str = "probe o",
    max_rows: int = 2000,
):
    """The influence matrix ``S[u, o]`` (:func:`~ldjax.experiments.analyze.readouts.scores`),
    rows sorted by the group of u and columns by the group of o, on a symmetric log colour
    scale (red: u raises the probe's log-probability, blue: lowers it).

    Args:
      score: ``(N_u, N_o)``.
      groups_u, groups_o: the group (class or type) of every u and o.
      max_rows: at most this many rows are drawn (evenly spaced after sorting).
    """
    s = np.asarray(score, np.float64)
    iu, io = sort_order(groups_u, order_u), sort_order(groups_o, order_o)
    if len(iu) > max_rows:
        iu = iu[np.linspace(0, len(iu) - 1, max_rows).astype(int)]
    m = s[np.ix_(iu, io)]
    fig, ax = plt.subplots(figsize=(8, 6.5))
    im = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=_norm(m), interpolation="nearest")
    _boundaries(ax, np.asarray(groups_u)[iu], "y")
    _boundaries(ax, np.asarray(groups_o)[io], "x")
    ax.set_ylabel(f"{label_u} (sorted by group; {len(iu)} of {s.shape[0]} shown)")
    ax.set_xlabel(f"{label_o} (sorted by group)")
    ax.set_title(title or "predicted Δ log π(y_o|x_o) after one step on u", fontsize=10)
    _colorbar(fig, im, ax, "Δ log π(y_o|x_o) (symlog)")
    fig.tight_layout()
    return _done(fig)


def plot_aggregate(agg: dict, *, title: str = "", label_u: str = "u", label_o: str = "o"):
    """The mean score by group pair (:func:`~ldjax.experiments.analyze.readouts.aggregate`), each
    cell annotated with its value."""
    m = np.asarray(agg["mean"], np.float64)
    fig, ax = plt.subplots(
        figsize=(max(4.5, 0.62 * m.shape[1] + 2.5), max(2.6, 0.5 * m.shape[0] + 1.8))
    )
    top = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    top = top if top > 0 else 1.0
    im = ax.imshow(
        m, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -top, top), aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(range(m.shape[1]), [str(g) for g in agg["groups_o"]], fontsize=8)
    ax.set_yticks(range(m.shape[0]), [str(g) for g in agg["groups_u"]], fontsize=8)
    if m.shape[1] > 8 and any(len(str(g)) > 3 for g in agg["groups_o"]):
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right")
    if m.size <= 200:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                dark = abs(v) > 0.6 * top
                ax.text(
                    j,
                    i,
                    f"{v:.1e}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if dark else "k",
                )
    ax.set_xlabel(label_o)
    ax.set_ylabel(label_u)
    ax.set_title(title or "mean predicted Δ log π(y_o|x_o) by group pair", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.85)
    fig.tight_layout()
    return _done(fig)


def _image(ax, img, title, color="k"):
    ax.imshow(np.asarray(img).reshape(28, 28), cmap="gray_r")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7, color=color)


def plot_gallery(top: dict, images_u, labels_u, images_o, labels_o, probes: Sequence[int]):
    """For each probe in ``probes``: its digit, then its top-k most helpful (green) and most
    harmful (red) training digits with their label and score.

    Args:
      top: :func:`~ldjax.experiments.analyze.readouts.top_k` of the score matrix.
      images_u, labels_u: the training digits ``(N_u, 28, 28[, 1])`` and labels.
      images_o, labels_o: the probes' digits and labels.
      probes: which probes (indices into O) get a row.
    """
    k = top["helpful"].shape[1]
    probes = list(probes)
    fig, axes = plt.subplots(
        len(probes), 2 * k + 1, figsize=(1.05 * (2 * k + 1), 1.25 * len(probes)), squeeze=False
    )
    for r, o in enumerate(probes):
        _image(axes[r, 0], images_o[o], f"probe {o}: {labels_o[o]}")
        for j in range(k):
            u, s = top["helpful"][o, j], top["helpful_score"][o, j]
            _image(axes[r, 1 + j], images_u[u], f"+{labels_u[u]} {s:+.1e}", "#1a7f1a")
            u, s = top["harmful"][o, j], top["harmful_score"][o, j]
            _image(axes[r, 1 + k + j], images_u[u], f"-{labels_u[u]} {s:+.1e}", "#c0392b")
    fig.suptitle(
        f"each probe, its {k} most helpful (green) and {k} most harmful (red) training digits "
        "(label, predicted Δ log π(y_o|x_o))",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _done(fig)


def plot_audit(audit: dict, *, what: str = "Δ log π"):
    """Predicted against actual change of every audited (u, probe, readout) (one real step on
    each audited u, :func:`ldjax.audit`), with the line y = x and the median relative error."""
    pred = np.asarray(audit["predicted"], np.float64).ravel()
    act = np.asarray(audit["actual"], np.float64).ravel()
    rel = np.asarray(audit["rel_error"], np.float64)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.3), gridspec_kw=dict(width_ratios=[1.4, 1]))
    lim = float(np.max(np.abs(np.r_[pred, act]))) if pred.size else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.7, label="y = x", zorder=1)
    ax.scatter(act, pred, s=9, alpha=0.6, color="#1f77b4", lw=0, zorder=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    ax.set_xlabel(f"actual {what} (one real step on u)")
    ax.set_ylabel(f"predicted {what}")
    ax.set_title(
        f"{len(rel)} audited u, {pred.size} values; median relative error "
        f"{audit['median_rel_error']:.2e}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    bx.hist(np.log10(np.maximum(rel, 1e-16)), bins=min(30, max(5, len(rel))), color="#ff7f0e")
    bx.xaxis.set_major_locator(MaxNLocator(5))
    bx.yaxis.set_major_locator(MaxNLocator(integer=True))
    bx.set_xlabel("log10 relative error per audited u")
    bx.set_ylabel("count")
    bx.set_title("‖predicted − actual‖ / ‖actual‖ over the probes", fontsize=9)
    fig.tight_layout()
    return _done(fig)
