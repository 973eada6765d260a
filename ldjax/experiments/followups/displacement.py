"""Likelihood displacement (Razin et al., ICLR 2025, arXiv 2410.08847): which pairs make DPO lower
log π(y⁺)? CHES against ldjax's prediction.

Razin et al.'s centered hidden embedding similarity,

    CHES(x, y⁺, y⁻) = ⟨Σ_k h_{x,y⁺<k}, Σ_k' h_{x,y⁻<k'}⟩ − ‖Σ_k h_{x,y⁺<k}‖²,

uses the last hidden states ``h`` (the input of the unembedding) at the positions that predict
each response token; larger CHES, more displacement (log π(y⁺) falls more). It is a head-level
view of the kernel: for the unembedding ``W`` alone, ``⟨∇_W log π(y⁺), ∇_W log π(y⁻)⟩`` sums
``⟨h⁺_k, h⁻_k'⟩⟨e_{y⁺_k} − π⁺_k, e_{y⁻_k'} − π⁻_k'⟩``; CHES drops the second factor and the
layers below. ldjax's prediction of one DPO step on the pair, ``Δlog π(y⁺) = ηβ/2 (‖g⁺‖² −
⟨g⁺, g⁻⟩)``, keeps all of it.

:func:`analyse` ranks the pairs by ``−CHES`` (and ``−ln-CHES``, the length-normalised variant)
and by ldjax's predicted Δlog π(y⁺), and reports each one's Spearman correlation with the actual
Δlog π(y⁺) of the step; the claims row decides the difference with the jackknife over pairs.
"""

from __future__ import annotations

import numpy as np

from ldjax.experiments.stats import spearman

__all__ = ["analyse"]


def analyse(m: dict) -> dict:
    """Spearman correlations with the actual Δlog π(y⁺) (``act_pos`` of
    :func:`ldjax.experiments.followups.pairs.measure_pairs`): of ldjax's prediction
    (``spearman_pred``), of −CHES (``spearman_ches``), of −ln-CHES (``spearman_ln_ches``); the
    share of pairs whose chosen falls and, among the quarter of pairs with the largest CHES /
    the lowest prediction, the share that do (``precision_*``)."""
    act = np.asarray(m["act_pos"], np.float64)
    pred = np.asarray(m["pred_pos"], np.float64)
    ches = np.asarray(m["ches"], np.float64)
    ln = np.asarray(m["ln_ches"], np.float64)
    q = max(1, act.size // 4)
    falls = act < 0
    top_ches = np.argsort(-ches)[:q]
    top_pred = np.argsort(pred)[:q]
    return {
        "spearman_pred": spearman(pred, act),
        "spearman_ches": spearman(-ches, act),
        "spearman_ln_ches": spearman(-ln, act),
        "share_chosen_falls": float(falls.mean()),
        "precision_ches": float(falls[top_ches].mean()),
        "precision_pred": float(falls[top_pred].mean()),
        "act_mean": float(act.mean()),
        "pred_mean": float(pred.mean()),
    }
