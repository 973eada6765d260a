"""Figures of the squeezing effect (Ren & Sutherland, ICLR 2025, arXiv 2407.10490, §3.3 and App. C):
the toy's per-case before/after bars and trends, and one DPO step's y⁻ term on the LM.

Every function returns a ``matplotlib.figure.Figure`` (closed to pyplot, so a notebook shows it
once, where it is the value of a cell); :func:`ldjax.experiments.common.save_figure` writes it to a
file.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogLocator, NullLocator

__all__ = ["plot_case", "plot_trends", "plot_lm_squeeze"]

_BEFORE = "#9e9e9e"
_AFTER = "#1f77b4"
_NEG = "#d62728"
_STAR = "#2ca02c"


def _log(ax, which: str = "y", numticks: int = 7) -> None:
    """Log scale with few major ticks and no minor ticks (wide ranges otherwise cost seconds)."""
    getattr(ax, f"set_{which}scale")("log")
    a = ax.yaxis if which == "y" else ax.xaxis
    a.set_major_locator(LogLocator(base=10, numticks=numticks))
    a.set_minor_locator(NullLocator())


def _done(fig, dpi: int):
    """Detaches ``fig`` from pyplot (no second display in notebooks) and returns it."""
    fig.set_dpi(dpi)
    plt.close(fig)
    return fig


def plot_case(stats: dict[str, Any], name: str = "", dpi: int = 100):
    """Bar plot of π before/after one NG step, linear (top) and log (bottom) axes.

    Args:
      stats: one entry of :func:`ldjax.experiments.squeeze.toy.run_cases` (needs ``pi_before``,
        ``pi_after`` ``(V,)``, ``y_neg``, ``y_star``, ``lr``, ``eta_eff``, entropies,
        ``title``).
      name: case label for the title, e.g. ``"Case 3"``.

    Returns:
      The figure.
    """
    for k in ("pi_before", "pi_after", "y_neg", "y_star", "lr", "eta_eff"):
        if k not in stats:
            raise ValueError(f"plot_case: stats lacks field '{k}' (pass an entry of run_cases())")
    p0 = np.asarray(stats["pi_before"], np.float64)
    p1 = np.asarray(stats["pi_after"], np.float64)
    if p0.ndim != 1 or p0.shape != p1.shape:
        raise ValueError(
            f"plot_case: pi_before {p0.shape} and pi_after {p1.shape} must be equal 1-D shapes"
        )
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
        f"H: {stats.get('entropy_before', float('nan')):.3f} → "
        f"{stats.get('entropy_after', float('nan')):.3f}, "
        f"max π: {p0.max():.3f} → {p1.max():.3f}",
        fontsize=10,
    )
    fig.tight_layout()
    return _done(fig, dpi)


_FACTORS = (
    ("max_prob", "peakiness: max π", False, "peakiness"),
    ("pi_neg", "π(y⁻)", True, "pi_neg"),
    ("eta_eff", "η' = η‖x‖²", True, "eta_eff"),
)


def plot_trends(
    measures: dict[str, np.ndarray],
    correlations: dict[str, Any],
    controlled: dict[str, Any] | None = None,
    max_points: int = 1500,
    n_curves: int = 12,
    seed: int = 0,
    dpi: int = 90,
):
    """Squeeze ``S`` against peakiness, ``π(y⁻)`` and ``η‖x‖²``.

    Top row: random draws (:func:`ldjax.experiments.squeeze.toy.squeeze_measures`, subsampled to
    ``max_points``) with the Spearman ρ of :func:`ldjax.experiments.squeeze.toy.trend_correlations`
    in the titles.  Bottom row (if ``controlled`` from
    :func:`ldjax.experiments.squeeze.toy.controlled_trends` with ``return_curves=True``):
    ``n_curves`` one-factor sweeps, each line one base instance.

    Returns:
      The figure.
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
                raise ValueError(
                    "plot_trends: controlled needs controlled_trends(..., return_curves=True)"
                )
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
                "sweeps: expected sign in "
                f"{round(c['frac_expected_sign'] * c['n_defined'])}/{c['n_defined']}",
                fontsize=10,
            )
            ax2.grid(True, alpha=0.3)
    fig.suptitle(
        f"Squeeze S = log q_B − log q'_B (bystanders' share of mass off y⁻ shrinks), n = {n} draws",
        fontsize=11,
    )
    fig.tight_layout()
    return _done(fig, dpi)


# --------------------------------------------------------------------------------------------
# The LM: one DPO step's y⁻ term
# --------------------------------------------------------------------------------------------


def _token_label(tokenizer, t: int) -> str:
    if t in (getattr(tokenizer, "eos_id", -1),):
        return "EOS"
    s = tokenizer.decode([int(t)])
    return {" ": "␣", "\n": "⏎", "": "·"}.get(s, s if s.isprintable() else "?")


def plot_lm_squeeze(
    result: dict, tokenizer=None, *, title: str = "", max_positions: int = 130, dpi: int = 100
):
    """Per response position m of x⁻, before and after the y⁻ term alone (exact softmax of z + Δz⁻):

    1. the argmax token's share π_m(argmax) (grey: before, blue: after);
    2. its change Δπ_m(argmax) (blue bars: y⁻_m is not the argmax; red: it is, shaded columns);
    3. π_m(y⁻_m) before/after (log scale);
    4. its change Δ log π_m(y⁻_m).

    Right: the prediction against a real SGD step through the y⁻ branch — Δπ(argmax) and
    Δ log π(y⁻_m) per position, predicted vs actual, with the diagonal.
    ``result`` from :func:`ldjax.experiments.squeeze.lm.lm_squeeze`; the first ``max_positions``
    positions are shown. Returns the figure.
    """
    o = result["observed"]["rejected"]
    e, ea = o["effects"]["y_neg"], o["effects"]["y_neg_actual"]
    s = o["summary"]["y_neg"]
    M = min(int(o["positions"].size), max_positions)
    x = np.arange(M)
    peak = np.asarray(e["argmax_is_target"][:M])
    width = float(np.clip(5.0 + 0.085 * M, 9.0, 17.0))
    fig = plt.figure(figsize=(width + 4.2, 9.6))
    gs = fig.add_gridspec(
        4,
        2,
        width_ratios=[width, 3.6],
        height_ratios=[1.25, 0.85, 1.25, 0.85],
        hspace=0.5,
        wspace=0.16,
    )
    axes = [fig.add_subplot(gs[0, 0])]
    axes += [fig.add_subplot(gs[k, 0], sharex=axes[0]) for k in (1, 2, 3)]
    sc1, sc2 = fig.add_subplot(gs[0:2, 1]), fig.add_subplot(gs[2:4, 1])
    for ax in axes:
        for k in np.nonzero(peak)[0]:
            ax.axvspan(k - 0.5, k + 0.5, color="#f6d5d5", lw=0, zorder=0)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_xlim(-0.8, M - 0.2)

    def dumbbell(ax, before, after):
        before, after = np.asarray(before[:M]), np.asarray(after[:M])
        ax.vlines(x, before, after, color="#555555", lw=1.0, zorder=2)
        ax.plot(x, before, "o", ms=3.4, color="#9e9e9e", label="before", zorder=3)
        ax.plot(x, after, "D", ms=2.6, color="#1f77b4", label="after the y⁻ term", zorder=4)

    def bars(ax, d):
        d = np.asarray(d[:M])
        ax.bar(x, d, width=0.8, color=np.where(peak, "#d62728", "#1f77b4"), zorder=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    dumbbell(axes[0], e["argmax_share_before"], e["argmax_share_after"])
    axes[0].set_ylim(0, 1.03)
    axes[0].set_ylabel("π_m(argmax)")
    axes[0].legend(loc="upper center", fontsize=8, ncol=2, framealpha=0.9)
    axes[0].set_title(
        f"the argmax token's share: mean {s['mean_argmax_share_before']:.3f} → "
        f"{s['mean_argmax_share_after']:.3f}  (shaded: y⁻_m is the argmax)",
        fontsize=9.5,
    )
    bars(axes[1], np.asarray(e["argmax_share_after"]) - np.asarray(e["argmax_share_before"]))
    axes[1].set_ylabel("Δπ_m(argmax)")
    axes[1].set_title(
        f"rises at {_pct(s['frac_argmax_share_rises'])} of positions — "
        f"{_pct(s['frac_argmax_share_rises_peak_not_target'])} "
        "where y⁻_m is not the argmax (blue), "
        f"{_pct(s['frac_argmax_share_rises_peak_is_target'])} where it is (red)",
        fontsize=9.5,
    )
    dumbbell(axes[2], e["target_prob_before"], e["target_prob_after"])
    _log(axes[2], "y", numticks=6)
    axes[2].set_ylabel("π_m(y⁻_m)")
    axes[2].set_title(
        f"π of the rejected token: Σ_m log π(y⁻_m) {s['target_logp_sum_before']:.2f} → "
        f"{s['target_logp_sum_after']:.2f}",
        fontsize=9.5,
    )
    dl = np.asarray(e["target_logp_after"]) - np.asarray(e["target_logp_before"])
    bars(axes[3], dl)
    axes[3].set_ylabel("Δ log π_m(y⁻_m)")
    axes[3].set_title(f"falls at {_pct(s['frac_target_prob_falls'])} of positions", fontsize=9.5)
    for ax in axes[:3]:
        plt.setp(ax.get_xticklabels(), visible=False)
    if tokenizer is not None:
        axes[3].set_xticks(x)
        axes[3].set_xticklabels(
            [_token_label(tokenizer, t) for t in o["targets"][:M]], fontsize=6.5, family="monospace"
        )
        axes[3].set_xlabel(
            "response position m of x⁻ (tick: the token y⁻_m that position predicts)"
        )
    else:
        axes[3].set_xlabel("response position m of x⁻")

    def check(ax, pred, act, label):
        pred, act = np.asarray(pred), np.asarray(act)
        pk = np.asarray(e["argmax_is_target"])
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.scatter(pred[~pk], act[~pk], s=11, color="#1f77b4", label="y⁻_m not the argmax")
        ax.scatter(pred[pk], act[pk], s=14, color="#d62728", marker="x", label="y⁻_m is the argmax")
        lim = max(np.abs(pred).max(), np.abs(act).max()) * 1.08 + 1e-300
        ax.plot([-lim, lim], [-lim, lim], "--", color="#888888", lw=0.8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel(f"predicted {label}", fontsize=9)
        ax.set_ylabel(f"actual {label}", fontsize=9)
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.grid(True, alpha=0.3)

    c = o["check"]["y_neg"]
    check(
        sc1,
        np.asarray(e["argmax_share_after"]) - e["argmax_share_before"],
        np.asarray(ea["argmax_share_after"]) - ea["argmax_share_before"],
        "Δπ_m(argmax)",
    )
    sc1.set_title(
        f"eNTK prediction vs a real SGD step\n(y⁻ branch only): same sign of Δπ(argmax)\n"
        f"at {_pct(c['argmax_verdict_agreement'])} of positions",
        fontsize=9.5,
    )
    sc1.legend(loc="upper left", fontsize=7.5)
    check(
        sc2, dl, np.asarray(ea["target_logp_after"]) - ea["target_logp_before"], "Δ log π_m(y⁻_m)"
    )
    sc2.set_title(
        f"rel. error of Δz⁻ {c['entk_step']:.1e};\nΣ_m Δ log π(y⁻_m): predicted (A·Δz) "
        f"{c['seq_delta_logp_linear']:.3f},\nactual {c['seq_delta_logp_actual']:.3f}",
        fontsize=9.5,
    )
    fig.suptitle(
        title
        or (
            f"One DPO step (SGD, η = {result['eta']:.3g}, β = {result['beta']:g}): the y⁻ term "
            f"Δz⁻ = −ηK(x⁻, x⁻)G⁻ on x⁻ = [x; y⁻], per response position"
        ),
        fontsize=11.5,
        y=0.995,
    )
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.08)
    return _done(fig, dpi)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"
