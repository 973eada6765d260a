"""The follow-up claims (entanglement, displacement, GRPO) as rows of the claims table, decided
by the rule of :mod:`ldjax.experiments.stats` (95 % interval of a paired effect: PASS, FAIL or
INCONCLUSIVE) and rendered by :mod:`ldjax.experiments.reproduce.claims`.

Measurements (:func:`pair_measurements`, :func:`grpo_measurements`) are flat dicts whose values
are floats or ``(P,)`` arrays over pairs or tracked prompts (the "prompts" axis of the rule).
Correlations have no per-pair difference of their own: their effect is decided on the jackknife
pseudo-values over pairs (:func:`ldjax.experiments.followups.entanglement.jackknife`), whose mean
is the (bias-corrected) correlation and whose spread is its jackknife standard error, so the
interval is the jackknife t-interval. The DPO-pair analyses use one SFT model (one seed, P pairs);
the GRPO claims use ``grpo.seeds`` sampling seeds × the tracked prompts (the p-th tracked prompt
of each seed: the first prompts whose step-0 group was mixed, not the same prompt in every
seed).
"""

from __future__ import annotations

import numpy as np

from ldjax.experiments.followups import displacement, entanglement
from ldjax.experiments.reproduce.claims import Claim, finite_mean, measurement
from ldjax.experiments.stats import pearson, spearman

__all__ = [
    "PAIR_CLAIMS",
    "GRPO_CLAIMS",
    "pair_measurements",
    "grpo_measurements",
]


def pair_measurements(m: dict) -> dict:
    """Claims measurements from :func:`ldjax.experiments.followups.pairs.measure_pairs`."""
    e = entanglement.analyse(m)
    d = displacement.analyse(m)
    cos, k = np.asarray(m["cos"]), e["kappa_actual"]
    act, pred = np.asarray(m["act_pos"]), np.asarray(m["pred_pos"])
    neg_ches = -np.asarray(m["ches"])
    jk = entanglement.jackknife
    out = {
        "ent.pseudo_pearson": jk(pearson, cos, k),
        # agreement of "chosen falls" with the condition, beyond always guessing the majority
        "ent.agree_beyond_majority": (e["falls"] == e["condition"]).astype(np.float64)
        - (e["falls"] == (e["falls"].mean() > 0.5)).astype(np.float64),
        "dis.pseudo_spearman_ches": jk(spearman, neg_ches, act),
        "dis.pseudo_spearman_pred": jk(spearman, pred, act),
        "dis.pseudo_pred_minus_ches": jk(
            lambda a, b, c: spearman(a, c) - spearman(b, c), pred, neg_ches, act
        ),
    }
    for key, v in e.items():
        if np.ndim(v) == 0:
            out[f"ent.{key}"] = float(v)
    for key, v in d.items():
        out[f"dis.{key}"] = float(v)
    out["eta"] = float(m["eta"])
    out["pearson_pred_actual_pos"] = pearson(pred, act)
    return out


def grpo_measurements(res: dict) -> dict:
    """Claims measurements of one seed's :func:`ldjax.experiments.followups.grpo.run_grpo`."""
    out = {"accuracy0": float(res["accuracy0"]), "anchored0": float(res["anchored0"])}
    for v, dec in res["decomposition"].items():
        for key, arr in dec.items():
            out[f"{v}.{key}"] = np.asarray(arr, np.float64)
    for v, c in res["curves"].items():
        out[f"{v}.correct.change"] = np.asarray(c["correct"][-1] - c["correct"][0], np.float64)
        out[f"{v}.incorrect.change"] = np.asarray(
            c["incorrect"][-1] - c["incorrect"][0], np.float64
        )
        r = np.asarray(res["reward"][v], np.float64)
        w = max(1, r.size // 3)
        out[f"{v}.reward.first"] = float(r[:w].mean())
        out[f"{v}.reward.last"] = float(r[-w:].mean())
    f = np.asarray(res["flagged"], np.float64)
    out["nthr.flagged_share"] = float(f.mean()) if f.size else float("nan")
    return out


def _c(id, section, text, effects, context):
    return Claim(id, section, text, effects, context)


PAIR_CLAIMS: tuple = (
    _c(
        "entanglement_predicts_comovement",
        "Entanglement",
        "across pairs, the normalised eNTK entry cos(∇log π(y⁺), ∇log π(y⁻)) correlates "
        "positively with the co-movement κ = 2Δ⁺Δ⁻/(Δ⁺²+Δ⁻²) of log π(y⁺), log π(y⁻) in one "
        "DPO step on the pair (Pearson, jackknife interval)",
        lambda m: {"Pearson(cos, κ)": (measurement(m, "ent.pseudo_pearson"), +1)},
        lambda m: {
            "Pearson(cos, κ)": m["ent.pearson_cos_kappa"],
            "Spearman(cos, κ)": m["ent.spearman_cos_kappa"],
            "mean cos": m["ent.cos_mean"],
            "Pearson(κ predicted, κ actual)": m["ent.pearson_kappa_pred_actual"],
        },
    ),
    _c(
        "chosen_falls_explained",
        "Entanglement",
        "'the chosen also falls' is explained by the entry: log π(y⁺) falls in the step exactly "
        "for the pairs with ⟨∇log π(y⁺), ∇log π(y⁻)⟩ > ‖∇log π(y⁺)‖², better than always "
        "guessing the majority outcome (agreement − majority rate > 0)",
        lambda m: {"agreement − majority rate": (measurement(m, "ent.agree_beyond_majority"), +1)},
        lambda m: {
            "share of pairs whose chosen falls": m["ent.share_chosen_falls"],
            "share with ⟨g⁺,g⁻⟩ > ‖g⁺‖²": m["ent.share_condition"],
            "agreement": m["ent.agreement_falls_condition"],
            "share where both fall": m["ent.share_both_fall"],
            "mean cos, chosen falls": m["ent.cos_falls"],
            "mean cos, chosen rises": m["ent.cos_rises"],
        },
    ),
    _c(
        "ches_ranks_displacement",
        "Displacement",
        "−CHES (Razin et al.) ranks the pairs by the actual Δlog π(y⁺) of a DPO step on the "
        "pair (Spearman > 0, jackknife interval)",
        lambda m: {"Spearman(−CHES, Δ⁺)": (measurement(m, "dis.pseudo_spearman_ches"), +1)},
        lambda m: {
            "Spearman(−CHES, Δ⁺)": m["dis.spearman_ches"],
            "Spearman(−ln-CHES, Δ⁺)": m["dis.spearman_ln_ches"],
            "share of pairs whose chosen falls": m["dis.share_chosen_falls"],
            "top-quarter CHES: share that fall": m["dis.precision_ches"],
        },
    ),
    _c(
        "prediction_beats_ches",
        "Displacement",
        "ldjax's predicted Δlog π(y⁺) (the eNTK decomposition) ranks the displacing pairs "
        "better than CHES: Spearman(pred, Δ⁺) − Spearman(−CHES, Δ⁺) > 0",
        lambda m: {"ρ(pred) − ρ(−CHES)": (measurement(m, "dis.pseudo_pred_minus_ches"), +1)},
        lambda m: {
            "Spearman(pred, Δ⁺)": m["dis.spearman_pred"],
            "Spearman(−CHES, Δ⁺)": m["dis.spearman_ches"],
            "Pearson(pred, Δ⁺)": m["pearson_pred_actual_pos"],
            "top-quarter lowest prediction: share that fall": m["dis.precision_pred"],
            "η": m["eta"],
        },
    ),
)
"""The DPO-pair claims (one SFT model; prompts = pairs)."""


GRPO_CLAIMS: tuple = (
    _c(
        "lld_incorrect_terms_pull_down",
        "GRPO",
        "lazy likelihood displacement: in one GRPO step, the incorrect-response terms lower "
        "log π of the correct responses (⟨g_c, Δθ_incorrect⟩ < 0)",
        lambda m: {"incorrect terms on correct": (measurement(m, "grpo.incorrect_term"), -1)},
        lambda m: {
            "correct terms on correct": finite_mean(measurement(m, "grpo.correct_term")),
            "incorrect terms on correct": finite_mean(measurement(m, "grpo.incorrect_term")),
            "predicted Δ correct": finite_mean(measurement(m, "grpo.predicted")),
            "actual Δ correct": finite_mean(measurement(m, "grpo.actual")),
            "step-0 accuracy of samples": m["accuracy0"],
            "share of groups anchored": m["anchored0"],
        },
    ),
    _c(
        "grpo_correct_rise",
        "GRPO",
        "over the GRPO run, log π of the tracked correct responses rises",
        lambda m: {"Δ log π(correct), GRPO": (measurement(m, "grpo.correct.change"), +1)},
        lambda m: {
            "Δ correct": finite_mean(measurement(m, "grpo.correct.change")),
            "Δ incorrect": finite_mean(measurement(m, "grpo.incorrect.change")),
            "sample accuracy first": m["grpo.reward.first"],
            "sample accuracy last": m["grpo.reward.last"],
        },
    ),
    _c(
        "nthr_one_step",
        "GRPO + NTHR",
        "NTHR-style reweighting: in one step, log π of the correct responses is predicted to "
        "rise more than with GRPO (same group)",
        lambda m: {
            "predicted Δ correct, NTHR − GRPO": (
                measurement(m, "nthr.predicted") - measurement(m, "grpo.predicted"),
                +1,
            )
        },
        lambda m: {
            "incorrect terms, GRPO": finite_mean(measurement(m, "grpo.incorrect_term")),
            "incorrect terms, NTHR": finite_mean(measurement(m, "nthr.incorrect_term")),
            "actual Δ correct, GRPO": finite_mean(measurement(m, "grpo.actual")),
            "actual Δ correct, NTHR": finite_mean(measurement(m, "nthr.actual")),
            "share of incorrect tokens down-weighted": m["nthr.flagged_share"],
        },
    ),
    _c(
        "nthr_run_correct_rise_more",
        "GRPO + NTHR",
        "NTHR-style reweighting: over the run (same seeds), log π of the tracked correct "
        "responses rises more than with GRPO",
        lambda m: {
            "Δ correct, NTHR − GRPO": (
                measurement(m, "nthr.correct.change") - measurement(m, "grpo.correct.change"),
                +1,
            )
        },
        lambda m: {
            "Δ correct, GRPO": finite_mean(measurement(m, "grpo.correct.change")),
            "Δ correct, NTHR": finite_mean(measurement(m, "nthr.correct.change")),
            "Δ incorrect, GRPO": finite_mean(measurement(m, "grpo.incorrect.change")),
            "Δ incorrect, NTHR": finite_mean(measurement(m, "nthr.incorrect.change")),
            "sample accuracy last, GRPO": m["grpo.reward.last"],
            "sample accuracy last, NTHR": m["nthr.reward.last"],
        },
    ),
)
"""The GRPO claims (seeds × tracked prompts)."""
