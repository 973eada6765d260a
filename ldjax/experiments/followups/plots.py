"""Figures of the follow-up analyses. Each function returns a ``matplotlib`` figure and writes
nothing (:func:`ldjax.experiments.common.save_figure` writes them)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_entanglement", "plot_displacement", "plot_grpo"]


def _figure(width: float) -> Figure:
    fig = Figure(figsize=(width, 4.4), layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))  # room for a footer line
    return fig


def plot_entanglement(m: dict, e: dict, *, title: str = "Gradient entanglement") -> Figure:
    """Left: co-movement κ of one DPO step against cos(g⁺, g⁻), per pair (red: log π(y⁺) fell).
    Right: predicted against actual Δlog π(y⁺) and Δlog π(y⁻)."""
    fig = _figure(10)
    a, b = fig.subplots(1, 2)
    falls = e["falls"]
    a.scatter(m["cos"][~falls], e["kappa_actual"][~falls], s=14, c="tab:blue", label="y⁺ rises")
    a.scatter(m["cos"][falls], e["kappa_actual"][falls], s=14, c="tab:red", label="y⁺ falls")
    a.axhline(0, c="0.7", lw=0.8)
    a.set_xlabel("cos(∇log π(y⁺), ∇log π(y⁻))  (normalised eNTK entry)")
    a.set_ylabel("co-movement κ = 2Δ⁺Δ⁻/(Δ⁺²+Δ⁻²)")
    a.set_title(
        f"Pearson {e['pearson_cos_kappa']:.2f}, Spearman {e['spearman_cos_kappa']:.2f} "
        f"({len(falls)} pairs)",
        fontsize=9,
    )
    a.legend(fontsize=8)
    for key, lab, c in (("pos", "y⁺", "tab:green"), ("neg", "y⁻", "tab:purple")):
        b.scatter(m[f"pred_{key}"], m[f"act_{key}"], s=12, c=c, label=f"Δlog π({lab})")
    lim = np.concatenate([m["pred_pos"], m["pred_neg"], m["act_pos"], m["act_neg"]])
    lo, hi = float(lim.min()), float(lim.max())
    b.plot([lo, hi], [lo, hi], c="0.5", lw=0.8, ls="--", label="y = x")
    b.axhline(0, c="0.8", lw=0.6)
    b.axvline(0, c="0.8", lw=0.6)
    b.set_xlabel("predicted (ηβ/2 eNTK terms)")
    b.set_ylabel("actual after the step")
    b.set_title(f"one SGD step of DPO per pair, η = {m['eta']:.3g}", fontsize=9)
    b.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_displacement(m: dict, d: dict, *, title: str = "Likelihood displacement") -> Figure:
    """Actual Δlog π(y⁺) of one DPO step per pair against −CHES (left) and against ldjax's
    prediction (right), with each one's Spearman correlation."""
    fig = _figure(10)
    a, b = fig.subplots(1, 2)
    act = m["act_pos"]
    for ax, x, lab, rho in (
        (a, -np.asarray(m["ches"]), "−CHES (last hidden states)", d["spearman_ches"]),
        (b, m["pred_pos"], "ldjax predicted Δlog π(y⁺)", d["spearman_pred"]),
    ):
        ax.scatter(x, act, s=14, c=np.where(act < 0, "tab:red", "tab:blue"))
        ax.axhline(0, c="0.7", lw=0.8)
        ax.set_xlabel(lab)
        ax.set_ylabel("actual Δlog π(y⁺)")
        ax.set_title(f"Spearman {rho:.2f}", fontsize=9)
    fig.suptitle(f"{title} (red: log π(y⁺) fell; {len(act)} pairs)")
    return fig


def plot_grpo(per_seed: list, *, title: str = "GRPO on arithmetic") -> Figure:
    """Left: mean change of log π of the tracked correct and incorrect responses over the run,
    GRPO and NTHR (mean over seeds and tracked prompts). Middle: the one-step decomposition of
    the correct responses' Δlog π into correct- and incorrect-response terms. Right: the
    accuracy of the sampled responses per step."""
    fig = _figure(14)
    a, b, c = fig.subplots(1, 3)
    styles = {"grpo": "-", "nthr": "--"}
    for v, ls in styles.items():
        for kind, col in (("correct", "tab:green"), ("incorrect", "tab:red")):
            curves = [r["curves"][v][kind] - r["curves"][v][kind][:1] for r in per_seed]
            steps = per_seed[0]["curves"][v]["steps"]
            mean = np.nanmean(np.stack([np.nanmean(x, 1) for x in curves]), 0)
            a.plot(steps, mean, ls=ls, c=col, label=f"{kind}, {v.upper()}")
    a.axhline(0, c="0.7", lw=0.8)
    a.set_xlabel("GRPO step")
    a.set_ylabel("Δ log π of tracked step-0 responses")
    a.legend(fontsize=8)
    names = ("correct_term", "incorrect_term", "predicted", "actual")
    labels = ("correct\nterms", "incorrect\nterms", "predicted\n(sum)", "actual")
    x = np.arange(len(names))
    for j, v in enumerate(styles):
        vals = []
        for n in names:
            per = [np.nanmean(r["decomposition"][v].get(n, [np.nan])) for r in per_seed]
            vals.append((np.nanmean(per), np.nanstd(per)))
        b.bar(
            x + (j - 0.5) * 0.38,
            [v_[0] for v_ in vals],
            0.38,
            yerr=[v_[1] for v_ in vals],
            label=v.upper(),
        )
    b.axhline(0, c="0.5", lw=0.8)
    b.set_xticks(x, labels, fontsize=8)
    b.set_ylabel("Δ log π(correct), one step")
    b.set_title("one step on a tracked group (mean ± std over seeds)", fontsize=9)
    b.legend(fontsize=8)
    for v, ls in styles.items():
        r = np.stack([np.asarray(s["reward"][v]) for s in per_seed])
        c.plot(np.arange(r.shape[1]), r.mean(0), ls=ls, label=v.upper())
    c.set_xlabel("GRPO step")
    c.set_ylabel("accuracy of sampled responses")
    c.legend(fontsize=8)
    fig.suptitle(f"{title} ({len(per_seed)} seeds)")
    return fig
