"""Figures for the squeezing-effect toy (PAPER.md §4): per-case before/after bars, trends.

Matplotlib with the Agg backend (no display needed).  Every function writes one
PNG and returns its path.
"""

from __future__ import annotations

import os
from typing import Any

from ldjax._png import save_png
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_case", "plot_trends"]

_BEFORE = "#9e9e9e"
_AFTER = "#1f77b4"
_NEG = "#d62728"
_STAR = "#2ca02c"


def _ensure_dir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def _log(ax, which: str = "y", numticks: int = 7) -> None:
    """Log scale with few major ticks and no minor ticks (wide ranges otherwise cost seconds)."""
    from matplotlib.ticker import LogLocator, NullLocator

    getattr(ax, f"set_{which}scale")("log")
    a = ax.yaxis if which == "y" else ax.xaxis
    a.set_major_locator(LogLocator(base=10, numticks=numticks))
    a.set_minor_locator(NullLocator())


def _save(fig, path: str, dpi: int) -> None:
    """Write ``fig`` as a 256-colour palette PNG (keeps repository figures small)."""
    save_png(fig, path, dpi=dpi)


def plot_case(stats: dict[str, Any], path: str, name: str = "", dpi: int = 100) -> str:
    """Bar plot of π before/after one NG step, linear (top) and log (bottom) axes.

    Args:
      stats: one entry of :func:`ldjax.squeeze.toy.run_cases` (needs ``pi_before``,
        ``pi_after`` ``(V,)``, ``y_neg``, ``y_star``, ``lr``, ``eta_eff``, entropies,
        ``title``).
      path: PNG to write.
      name: case label for the title, e.g. ``"Case 3"``.

    Returns:
      ``path``.
    """
    for k in ("pi_before", "pi_after", "y_neg", "y_star", "lr", "eta_eff"):
        if k not in stats:
            raise ValueError(f"plot_case: stats lacks field '{k}' (pass an entry of run_cases())")
    p0 = np.asarray(stats["pi_before"], np.float64)
    p1 = np.asarray(stats["pi_after"], np.float64)
    if p0.ndim != 1 or p0.shape != p1.shape:
        raise ValueError(f"plot_case: pi_before {p0.shape} and pi_after {p1.shape} must be equal 1-D shapes")
    V = p0.size
    yn, ys = int(stats["y_neg"]), int(stats["y_star"])
    idx = np.arange(V)
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.6), sharex=True)
    for ax, log in zip(axes, (False, True)):
        if V <= 100:
            w = 0.42
            ax.bar(idx - w / 2, p0, width=w, color=_BEFORE, label="before")
            ax.bar(idx + w / 2, p1, width=w, color=_AFTER, label="after")
        else:  # too many classes for bars: one marker per class
            ax.plot(idx, p0, ".", ms=2.5, color=_BEFORE, label="before")
            ax.plot(idx, p1, ".", ms=2.5, color=_AFTER, label="after")
        ax.axvline(yn, color=_NEG, lw=0.8, ls="--", label=f"y⁻ = {yn}")
        ax.axvline(ys, color=_STAR, lw=0.8, ls=":", label=f"y* = {ys}")
        ax.plot([yn], [p1[yn]], "v", color=_NEG, ms=6)  # π'(y⁻)
        ax.plot([ys], [p1[ys]], "^", color=_STAR, ms=6)  # π'(y*)
        if log:
            _log(ax, "y")
            pos = np.concatenate([p0[p0 > 0], p1[p1 > 0]])
            ax.set_ylim(pos.min() / 5, pos.max() * 3)
            ax.set_ylabel("π (log scale)")
        else:
            ax.set_ylim(0, max(p0.max(), p1.max()) * 1.08)
            ax.set_ylabel("π (linear)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].set_xlabel("class index i")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    head = f"{name}: " if name else ""
    axes[0].set_title(
        f"{head}{stats.get('title', '')}\n"
        f"lr η = {stats['lr']:g}, η‖x‖² = {stats['eta_eff']:.2f}, y⁻ = {yn}; "
        f"H: {stats.get('entropy_before', float('nan')):.3f} → {stats.get('entropy_after', float('nan')):.3f}, "
        f"max π: {p0.max():.3f} → {p1.max():.3f}",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path, dpi)
    return path


_FACTORS = (
    ("max_prob", "peakiness: max π", False, "peakiness"),
    ("pi_neg", "π(y⁻)", True, "pi_neg"),
    ("eta_eff", "η' = η‖x‖²", True, "eta_eff"),
)


def plot_trends(
    measures: dict[str, np.ndarray],
    correlations: dict[str, Any],
    path: str,
    controlled: dict[str, Any] | None = None,
    max_points: int = 1500,
    n_curves: int = 12,
    seed: int = 0,
    dpi: int = 90,
) -> str:
    """Squeeze ``S`` against peakiness, ``π(y⁻)`` and ``η‖x‖²``.

    Top row: random draws (:func:`ldjax.squeeze.toy.squeeze_measures`, subsampled to
    ``max_points``) with the Spearman ρ of :func:`ldjax.squeeze.toy.trend_correlations`
    in the titles.  Bottom row (if ``controlled`` from
    :func:`ldjax.squeeze.toy.controlled_trends` with ``return_curves=True``):
    ``n_curves`` one-factor sweeps, each line one base instance.

    Returns:
      ``path``.
    """
    for k in ("squeeze", "max_prob", "pi_neg", "eta_eff"):
        if k not in measures:
            raise ValueError(f"plot_trends: measures lacks '{k}' (pass squeeze_measures(...))")
    rho = correlations["spearman"]["squeeze"]
    S = np.asarray(measures["squeeze"])
    n = S.size
    rng = np.random.default_rng(seed)
    sel = rng.choice(n, size=min(n, max_points), replace=False)
    rows = 2 if controlled is not None else 1
    fig, axes = plt.subplots(rows, 3, figsize=(11.5, 3.5 * rows), squeeze=False)
    floor = 1e-6
    for j, (key, label, logx, sweep) in enumerate(_FACTORS):
        ax = axes[0, j]
        f = np.asarray(measures[key])[sel]
        ax.scatter(f, np.maximum(S[sel], floor), s=3, color=_AFTER, edgecolors="none")
        _log(ax, "y")
        if logx:
            _log(ax, "x")
        ax.set_xlabel(label)
        ax.set_ylabel("squeeze S (log)")
        ax.set_title(f"random draws: Spearman ρ = {rho[key]:+.2f}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if controlled is not None:
            ax2 = axes[1, j]
            c = controlled[sweep]
            if "factor_values" not in c:
                raise ValueError("plot_trends: controlled needs controlled_trends(..., return_curves=True)")
            fv, sv = np.asarray(c["factor_values"]), np.asarray(c["squeeze_values"])
            for i in range(min(n_curves, fv.shape[0])):
                o = np.argsort(fv[i])
                ax2.plot(fv[i][o], np.maximum(sv[i][o], floor), "-o", ms=2.5, lw=1, alpha=0.8)
            _log(ax2, "y")
            if logx:
                _log(ax2, "x")
            ax2.set_xlabel(label + " (only this varies)")
            ax2.set_ylabel("squeeze S (log)")
            ax2.set_title(
                f"sweeps: expected sign in {round(c['frac_expected_sign'] * c['n_defined'])}/{c['n_defined']}",
                fontsize=10,
            )
            ax2.grid(True, alpha=0.3)
    fig.suptitle(
        f"Squeeze S = log q_B − log q'_B (bystanders' share of mass off y⁻ shrinks), n = {n} draws",
        fontsize=11,
    )
    fig.tight_layout()
    _save(fig, path, dpi)
    return path
