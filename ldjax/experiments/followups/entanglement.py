"""Gradient entanglement (Yuan et al. 2024, arXiv 2410.13828) in ldjax's decomposition.

One DPO step on pair ``(x, y⁺, y⁻)`` alone (:mod:`ldjax.experiments.followups.pairs`) moves
log π(y⁺) by ``c(‖g⁺‖² − ⟨g⁺, g⁻⟩)`` and log π(y⁻) by ``c(⟨g⁺, g⁻⟩ − ‖g⁻‖²)`` at first order
(``c = ηβ/2``, ``g± = ∇θ log π(y±|x)``): the sequence-level eNTK entry ``⟨g⁺, g⁻⟩`` entangles
the two. Large normalised entries ``cos = ⟨g⁺, g⁻⟩/(‖g⁺‖‖g⁻‖)`` make both move the same way;
"the chosen also falls" needs ``⟨g⁺, g⁻⟩ > ‖g⁺‖²``.

Measured across pairs (:func:`analyse`):

* the co-movement of one step, ``κ = 2 Δ⁺ Δ⁻ / (Δ⁺² + Δ⁻²)`` ∈ [−1, 1] (+1: both move by the
  same amount in the same direction; −1: by the same amount in opposite directions; 0: one does
  not move), from the actual Δlog π(y±);
* its correlation with ``cos`` (Pearson and Spearman; the claims row's interval comes from the
  jackknife over pairs, :func:`jackknife`);
* whether the pairs whose chosen falls are those with ``⟨g⁺, g⁻⟩ > ‖g⁺‖²`` (agreement).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ldjax.experiments.stats import pearson, spearman

__all__ = ["comovement", "jackknife", "analyse"]


def comovement(d_pos, d_neg) -> np.ndarray:
    """``κ = 2 Δ⁺ Δ⁻ / (Δ⁺² + Δ⁻²)`` per pair (0 where neither moves)."""
    a, b = np.asarray(d_pos, np.float64), np.asarray(d_neg, np.float64)
    den = a * a + b * b
    return np.where(den > 0, 2 * a * b / np.where(den > 0, den, 1.0), 0.0)


def jackknife(stat: Callable, *arrays) -> np.ndarray:
    """Jackknife pseudo-values ``n·θ − (n−1)·θ_{−i}`` of ``stat(*arrays)`` over the pairs
    (axis 0), ``(n,)``: their mean is the bias-corrected estimate and their spread gives its
    standard error, so they can be decided like per-pair paired differences
    (:func:`ldjax.experiments.stats.decide`)."""
    arrays = [np.asarray(a, np.float64) for a in arrays]
    n = arrays[0].shape[0]
    if n < 3:
        raise ValueError(f"the jackknife needs at least 3 pairs, got {n}")
    full = stat(*arrays)
    keep = np.ones(n, bool)
    out = np.empty(n)
    for i in range(n):
        keep[i] = False
        out[i] = n * full - (n - 1) * stat(*(a[keep] for a in arrays))
        keep[i] = True
    return out


def analyse(m: dict) -> dict:
    """The entanglement numbers from :func:`ldjax.experiments.followups.pairs.measure_pairs`'s
    ``m``: correlations of ``cos`` with the actual and predicted co-movement, the share of pairs
    whose chosen falls, the agreement of "chosen falls" with ``⟨g⁺, g⁻⟩ > ‖g⁺‖²``, and per-pair
    arrays (``kappa_actual``, ``kappa_pred``, ``falls``, ``condition``)."""
    cos = np.asarray(m["cos"], np.float64)
    k_act = comovement(m["act_pos"], m["act_neg"])
    k_pred = comovement(m["pred_pos"], m["pred_neg"])
    falls = np.asarray(m["act_pos"]) < 0
    cond = np.asarray(m["dot"]) > np.asarray(m["norm_pos"]) ** 2
    out = {
        "pearson_cos_kappa": pearson(cos, k_act),
        "spearman_cos_kappa": spearman(cos, k_act),
        "pearson_cos_kappa_pred": pearson(cos, k_pred),
        "pearson_kappa_pred_actual": pearson(k_pred, k_act),
        "share_chosen_falls": float(falls.mean()),
        "share_both_fall": float((falls & (np.asarray(m["act_neg"]) < 0)).mean()),
        "share_condition": float(cond.mean()),
        "agreement_falls_condition": float((falls == cond).mean()),
        "cos_mean": float(cos.mean()),
        "cos_falls": float(cos[falls].mean()) if falls.any() else float("nan"),
        "cos_rises": float(cos[~falls].mean()) if (~falls).any() else float("nan"),
        "kappa_actual": k_act,
        "kappa_pred": k_pred,
        "falls": falls,
        "condition": cond,
    }
    return out
