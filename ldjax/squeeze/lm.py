"""The squeezing effect on the language model: one DPO step's decomposition on a probe prompt.

PAPER.md §4 and §6 on the LM (Ren & Sutherland, ICLR 2025): one DPO step on
(x, y⁺, y⁻) changes the logits of any observed sequence χ_o by two terms,

    Δz(χ_o) = −η K(χ_o, x⁺) G⁺  −η K(χ_o, x⁻) G⁻  =  Δz⁺ + Δz⁻,

with ``G⁻ = −β(1−a)(π⁻ − y⁻)`` (a = σ(β(r⁺ − r⁻))): the y⁻ term is a *negative gradient* on y⁻.
On χ_o = x⁻ = [x; y⁻] it lowers log π(y⁻) at every response position m, and where π_m is peaky
and y⁻_m is not its peak it sends the freed mass to the already-largest token — the argmax
token's share π_m(argmax) rises, and the peakier π_m the more of the other tokens fall (the
squeeze; the toy analysis is :mod:`ldjax.squeeze.toy`). Where y⁻_m is the peak the mass spreads.

:func:`lm_squeeze` runs :func:`ldjax.decompose` with ``ldjax.losses.dpo`` on x_o = (x⁻, x⁺),
isolates the two terms (``delta_logits_terms``, index 1 = y⁻) and, per response position m of each
observed sequence, measures π before, π after the y⁻ term alone (exact: ``softmax(z + Δz⁻)``),
after the y⁺ term alone, after both, and after a real SGD step (:func:`ldjax.actual_step`, also a
step through the y⁻ branch alone), so the prediction can be checked against what happens.

Teacher forcing (:func:`ldjax.data.preferences.encode_example`): logits at position t predict
``targets[t]``; the response positions are ``mask[t]`` (the last prompt position up to the one
that predicts EOS). Observed token of a position of x⁻: y⁻_m; of x⁺: y⁺_m.
``y*_m = argmax_{i ≠ target_m} π_m(i)`` (the toy's y*): the argmax when the target is not it, else
the runner-up.

A peaky model is needed for a visible squeeze: :func:`load_lm` reads a pipeline checkpoint
(orbax, from ``ldjax lm``) or an ``.npz`` (:func:`save_lm`); :func:`pretrain_tiny` trains a tiny
LM for a few hundred steps on prompt + chosen texts when none is given.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldjax import losses
from ldjax.data.preferences import SeqConfig, encode_example

__all__ = [
    "SQUEEZE_SEQ",
    "TINY_LM",
    "lm_squeeze",
    "auto_eta",
    "cached_apply_fn",
    "position_effect",
    "summarize",
    "pretrain_tiny",
    "save_lm",
    "load_lm",
    "plot_lm_squeeze",
    "format_table",
]

SQUEEZE_SEQ = SeqConfig(max_len=128, max_prompt_len=48)
"""Sequence lengths of the tiny LM: 128 tokens, the prompt's last 48, so up to 79 response positions."""


@functools.lru_cache(maxsize=16)
def cached_apply_fn(config) -> Callable:
    """:func:`ldjax.lm.model.make_apply_fn` memoised per (hashable) config: the engine's jitted
    programs are cached per ``apply_fn`` object, so reusing it avoids recompiling."""
    from ldjax.lm.model import make_apply_fn

    return make_apply_fn(config)


def _tiny_config():
    from ldjax.lm.model import LMConfig

    return LMConfig(vocab_size=259, d_model=64, n_heads=2, n_layers=2, d_ff=256, max_len=128)


TINY_LM = _tiny_config()
"""The model :func:`pretrain_tiny` trains: byte vocabulary, d_model 64, 2 heads, 2 layers, d_ff 256."""

TERMS = ("y_neg", "y_pos", "both", "actual", "y_neg_actual")
"""Keys of the per-term effects: the y⁻ term alone (predicted, exact softmax), the y⁺ term alone,
both terms (predicted), one real SGD step on the DPO loss, one real SGD step through the y⁻
branch only."""


# --------------------------------------------------------------------------------------------
# Losses of one branch (the other branch's logits enter the value only)
# --------------------------------------------------------------------------------------------


def _dpo_weighted(logits_pos, logits_neg, *, w_pos, **kw):
    """``losses.dpo`` with the y⁺ branch's gradient scaled by ``w_pos`` (its value untouched):
    ``w_pos = 1`` is DPO itself, ``w_pos = 0`` freezes the y⁺ branch, so the SGD step is the y⁻
    term's parameter update alone. One loss function for both real steps: one compilation."""
    w = jnp.asarray(w_pos, logits_pos.dtype)
    zp = w * logits_pos + (1 - w) * jax.lax.stop_gradient(logits_pos)
    return losses.dpo(zp, logits_neg, **kw)


# --------------------------------------------------------------------------------------------
# Per-position effect of a logit change
# --------------------------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


def position_effect(z_before: np.ndarray, z_after: np.ndarray, targets: np.ndarray) -> dict:
    """How π moves at each position when the logits go from ``z_before`` to ``z_after``.

    Args:
      z_before, z_after: logits ``(M, V)`` of M positions.
      targets: ``(M,)`` the observed token of each position (y⁻_m on x⁻).
    Returns:
      Per-position ``(M,)`` numpy arrays (float64 / int / bool):
      ``argmax`` (of π before), ``argmax_is_target``, ``argmax_share_before``/``_after`` (π of the
      pre-step argmax token), ``target_prob_before``/``_after``, ``y_star`` (argmax over tokens other
      than the target), ``y_star_share_before``/``_after``, ``bystander_mass_before``/``_after``
      (mass off the target and y*), ``n_rise``/``n_fall`` (vocabulary entries whose π rose / fell),
      ``top_gainer`` (token whose π gained most), ``y_star_gain_share`` (y*'s part of all the
      probability mass gained, Σ_i max(Δπ_i, 0): where the mass goes), ``entropy_before``/
      ``_after`` (nats), ``new_argmax``/``max_prob_after`` (argmax and max of π after),
      ``squeeze_regime`` (π(target) < ‖π‖²: where the toy's same-position update
      z + c(π − e_target) makes, to first order, every token below ‖π‖² − π(target) fall, i.e.
      squeezes rather than spreads the mass); and ``pi_before``, ``pi_after`` ``(M, V)``.
    """
    z0 = np.asarray(z_before, np.float64)
    z1 = np.asarray(z_after, np.float64)
    t = np.asarray(targets).astype(np.int64)
    if z0.ndim != 2 or z0.shape != z1.shape or t.shape != z0.shape[:1]:
        raise ValueError(f"position_effect: need z_before, z_after (M, V) and targets (M,); got "
                         f"{z0.shape}, {z1.shape}, {t.shape}")
    lp0, lp1 = _log_softmax(z0), _log_softmax(z1)
    p0, p1 = np.exp(lp0), np.exp(lp1)
    rows = np.arange(z0.shape[0])
    am = p0.argmax(-1)
    off = np.where(np.arange(z0.shape[1])[None, :] == t[:, None], -np.inf, lp0)
    ys = off.argmax(-1)
    dlp = lp1 - lp0
    gain = np.maximum(p1 - p0, 0.0)
    gained = gain.sum(-1)
    by0 = 1.0 - p0[rows, t] - p0[rows, ys]
    by1 = 1.0 - p1[rows, t] - p1[rows, ys]
    ent = lambda p, lp: -np.sum(np.where(p > 0, p * lp, 0.0), -1)
    return dict(
        argmax=am, argmax_is_target=am == t,
        argmax_share_before=p0[rows, am], argmax_share_after=p1[rows, am],
        target_prob_before=p0[rows, t], target_prob_after=p1[rows, t],
        target_logp_before=lp0[rows, t], target_logp_after=lp1[rows, t],
        y_star=ys, y_star_share_before=p0[rows, ys], y_star_share_after=p1[rows, ys],
        bystander_mass_before=np.maximum(by0, 0.0), bystander_mass_after=np.maximum(by1, 0.0),
        n_rise=np.sum(dlp > 0, -1), n_fall=np.sum(dlp < 0, -1),
        top_gainer=np.argmax(p1 - p0, -1),
        y_star_gain_share=np.where(gained > 0, gain[rows, ys] / np.where(gained > 0, gained, 1.0), 0.0),
        entropy_before=ent(p0, lp0), entropy_after=ent(p1, lp1),
        new_argmax=p1.argmax(-1), max_prob_after=p1.max(-1),
        squeeze_regime=p0[rows, t] < np.sum(p0 * p0, -1),
        pi_before=p0, pi_after=p1,
    )


def _fraction(x: np.ndarray, where: Optional[np.ndarray] = None) -> Optional[float]:
    x = np.asarray(x, bool)
    if where is not None:
        x = x[np.asarray(where, bool)]
    return float(np.mean(x)) if x.size else None


def _effect_summary(e: dict) -> dict:
    """Scalars of one :func:`position_effect` (JSON-able). ``argmax_path_logp_*`` is the paper's
    teacher-forced argmax path Σ_m log max_v π_m(v) along the observed sequence (PAPER.md §6)."""
    rises = e["argmax_share_after"] > e["argmax_share_before"]
    peak_off = ~e["argmax_is_target"]
    reg = e["squeeze_regime"]
    V = e["pi_before"].shape[1]
    return dict(
        n_positions=int(rises.size),
        n_argmax_is_target=int(np.sum(e["argmax_is_target"])),
        frac_argmax_share_rises=_fraction(rises),
        frac_argmax_share_rises_peak_not_target=_fraction(rises, peak_off),
        frac_argmax_share_rises_peak_is_target=_fraction(rises, ~peak_off),
        n_squeeze_regime=int(np.sum(reg)),
        frac_argmax_share_rises_squeeze_regime=_fraction(rises, reg),
        mean_n_fall_squeeze_regime=float(np.mean(e["n_fall"][reg])) if reg.any() else None,
        mean_n_fall_spread_regime=float(np.mean(e["n_fall"][~reg])) if (~reg).any() else None,
        frac_y_star_share_rises=_fraction(e["y_star_share_after"] > e["y_star_share_before"]),
        frac_target_prob_falls=_fraction(e["target_prob_after"] < e["target_prob_before"]),
        frac_top_gainer_is_y_star=_fraction(e["top_gainer"] == e["y_star"]),
        mean_y_star_gain_share=float(np.mean(e["y_star_gain_share"])),
        mean_y_star_gain_share_peak_not_target=(float(np.mean(e["y_star_gain_share"][peak_off]))
                                                if peak_off.any() else None),
        frac_argmax_changes=_fraction(e["new_argmax"] != e["argmax"]),
        argmax_path_logp_before=float(np.sum(np.log(e["argmax_share_before"]))),
        argmax_path_logp_after=float(np.sum(np.log(e["max_prob_after"]))),
        mean_argmax_share_before=float(np.mean(e["argmax_share_before"])),
        mean_argmax_share_after=float(np.mean(e["argmax_share_after"])),
        mean_y_star_share_before=float(np.mean(e["y_star_share_before"])),
        mean_y_star_share_after=float(np.mean(e["y_star_share_after"])),
        mean_bystander_mass_before=float(np.mean(e["bystander_mass_before"])),
        mean_bystander_mass_after=float(np.mean(e["bystander_mass_after"])),
        target_logp_sum_before=float(np.sum(e["target_logp_before"])),
        target_logp_sum_after=float(np.sum(e["target_logp_after"])),
        mean_entropy_before=float(np.mean(e["entropy_before"])),
        mean_entropy_after=float(np.mean(e["entropy_after"])),
        mean_n_rise=float(np.mean(e["n_rise"])),
        mean_n_fall=float(np.mean(e["n_fall"])),
        median_n_rise=float(np.median(e["n_rise"])),
        frac_positions_at_most_3_rise=_fraction(e["n_rise"] <= 3),
        vocab_size=int(V),
    )


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


def _encode_pair(tokenizer, record: dict, seq_cfg: SeqConfig):
    for f in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(f), str):
            raise ValueError(f"lm_squeeze: record field {f!r} is missing or not a string")
    kw = dict(max_len=seq_cfg.max_len, max_prompt_len=seq_cfg.max_prompt_len)
    pos = encode_example(tokenizer, record["prompt"], record["chosen"], **kw)
    neg = encode_example(tokenizer, record["prompt"], record["rejected"], **kw)
    # right padding after the last scored position changes no logit there (causal model): cut it.
    T = 1 + max(int(np.nonzero(d["mask"])[0].max()) for d in (pos, neg))
    return ({k: v[:T] for k, v in pos.items()}, {k: v[:T] for k, v in neg.items()})


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / den) if den > 0 else float(np.linalg.norm(a))


def _seq_logp(z: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Σ_t mask_t log π_t(targets_t) in float64: ``(N, T, V), (N, T), (N, T) -> (N,)``."""
    lp = _log_softmax(z)
    picked = np.take_along_axis(lp, np.asarray(targets)[..., None].astype(np.int64), -1)[..., 0]
    return np.sum(picked * np.asarray(mask, np.float64), -1)


def _setup(apply_fn, params, tokenizer, record, beta, seq_cfg, ref_params):
    """Encodings, x_o = (x⁻, x⁺), x_u = (x⁺, x⁻), the DPO keyword arguments (reference log-probs
    included) and the decomposition of the step at η = 1 (K·G is linear in η)."""
    from ldjax.decompose import decompose

    if not beta > 0:
        raise ValueError(f"lm_squeeze: beta must be > 0, got {beta}")
    cfg = getattr(apply_fn, "config", None)
    if cfg is not None and seq_cfg.max_len > cfg.max_len:
        raise ValueError(f"lm_squeeze: seq_cfg.max_len={seq_cfg.max_len} exceeds the model's "
                         f"max_len={cfg.max_len}")
    pos, neg = _encode_pair(tokenizer, record, seq_cfg)
    x_pos, x_neg = jnp.asarray(pos["tokens"][None]), jnp.asarray(neg["tokens"][None])
    obs = {"rejected": neg, "chosen": pos}
    x_o = jnp.asarray(np.stack([obs[k]["tokens"] for k in obs]))
    kw = dict(targets_pos=jnp.asarray(pos["targets"][None]), targets_neg=jnp.asarray(neg["targets"][None]),
              mask_pos=jnp.asarray(pos["mask"][None]), mask_neg=jnp.asarray(neg["mask"][None]),
              beta=float(beta))
    x_u = (x_pos, x_neg)
    tg = np.stack([obs[k]["targets"] for k in obs])
    mk = np.stack([obs[k]["mask"] for k in obs])
    if ref_params is None:
        # π_ref = π_θ: its log-probs are those of the decomposition's own logits z(x_o), x_o = (x⁻, x⁺)
        zero = jnp.zeros((1,), jax.eval_shape(apply_fn, params, x_o).dtype)
        z_ref = np.asarray(decompose(apply_fn, params, x_o, x_u, losses.dpo, eta=1.0,
                                     loss_kwargs=dict(kw, ref_logp_pos=zero, ref_logp_neg=zero)).logits)
    else:
        z_ref = np.asarray(apply_fn(ref_params, x_o))
    lp_ref = _seq_logp(z_ref, tg, mk)           # (rejected, chosen)
    dtype = z_ref.dtype
    kw.update(ref_logp_pos=jnp.asarray(lp_ref[1:2], dtype), ref_logp_neg=jnp.asarray(lp_ref[:1], dtype))
    return obs, x_o, x_u, kw, (float(lp_ref[1]), float(lp_ref[0]))


def auto_eta(apply_fn: Callable, params: Any, tokenizer, record: dict, *, target: float = 0.05,
             beta: float = 0.1, seq_cfg: SeqConfig = SQUEEZE_SEQ, ref_params: Any = None) -> float:
    """The step size η at which the y⁻ term's linear prediction lowers log π(y⁻_m) on x⁻ by
    ``target`` nats per response position on average (Σ_m [A·Δz⁻]_{y⁻_m} = −target·M).

    The prediction is linear in η (Δz⁻ = −η K G⁻), so one :func:`ldjax.decompose` at η = 1 fixes it.
    A small ``target`` keeps the step in the regime where the one-step prediction holds; the
    scale of η differs by orders of magnitude between models, hence this normalisation.
    """
    from ldjax.decompose import decompose

    if not target > 0:
        raise ValueError(f"auto_eta: target must be > 0, got {target}")
    obs, x_o, x_u, loss_kwargs, _ = _setup(apply_fn, params, tokenizer, record, beta, seq_cfg, ref_params)
    dec = decompose(apply_fn, params, x_o, x_u, losses.dpo, eta=1.0, loss_kwargs=loss_kwargs)
    lin = _apply_A(np.asarray(dec.logits[0], np.float64), np.asarray(dec.delta_logits_terms[1][0], np.float64))
    m = np.nonzero(obs["rejected"]["mask"])[0]
    per = float(np.sum(lin[m, obs["rejected"]["targets"][m]])) / m.size
    if not per < 0:
        raise ValueError(f"auto_eta: the y⁻ term does not lower log π(y⁻) (linear change {per:.3g} per "
                         "position at η = 1); the gradient of log π(y⁻) is zero?")
    return float(target / -per)


def _apply_A(z: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """A·Δz = Δz − ⟨π, Δz⟩ per position (the linearised Δ log π), ``(..., V)``."""
    p = np.exp(_log_softmax(z))
    return dz - np.sum(p * dz, -1, keepdims=True)


def _check(z: np.ndarray, z_pred: np.ndarray, z_real: np.ndarray) -> dict:
    """:func:`ldjax.compare`'s relative errors for logits ``(M, V)``: predicted ``z_pred`` vs the
    real step's ``z_real`` (``entk_step`` on Δz, ``linear`` A·Δz_pred vs Δ log π, ``exact``,
    ``linearisation`` A·Δz_real vs Δ log π, ``sign_agreement`` of A·Δz_pred and Δ log π)."""
    dz_p, dz_a = z_pred - z, z_real - z
    dl_a = _log_softmax(z_real) - _log_softmax(z)
    lin_p = _apply_A(z, dz_p)
    return dict(entk_step=_rel(dz_p, dz_a), linearisation=_rel(_apply_A(z, dz_a), dl_a),
                linear=_rel(lin_p, dl_a), exact=_rel(_log_softmax(z_pred) - _log_softmax(z), dl_a),
                sign_agreement=float(np.mean(np.sign(lin_p) == np.sign(dl_a))))


def lm_squeeze(apply_fn: Callable, params: Any, tokenizer, record: dict, *, eta: float,
               beta: float = 0.1, seq_cfg: SeqConfig = SQUEEZE_SEQ,
               ref_params: Any = None) -> dict:
    """One DPO step on (x, y⁺, y⁻): where the y⁻ term sends the probability mass, per position.

    Args:
      apply_fn: ``apply_fn(params, tokens (N, T)) -> logits (N, T, V)``, e.g.
        :func:`ldjax.lm.model.make_apply_fn`.
      params: the policy θ (a peaky, pretrained or SFT'd model shows the squeeze).
      tokenizer: encodes the record (e.g. :class:`ldjax.lm.tokenizer.ByteTokenizer`).
      record: ``prompt``, ``chosen`` (y⁺), ``rejected`` (y⁻) strings.
      eta: SGD step size η of the DPO step (``Δθ = −η ∇θ L_DPO``).
      beta: DPO's β.
      seq_cfg: lengths for :func:`ldjax.data.preferences.encode_example`.
      ref_params: reference model of DPO (default ``params``: r⁺ = r⁻ = 0, the first DPO step).
    Returns:
      A dict with ``eta``, ``beta``, ``T``, ``loss`` (DPO loss before the step), ``a`` = σ(β(r⁺ − r⁻)),
      ``logp``/``ref_logp`` (log π(y±|x) under θ / the reference), and ``observed``: for
      ``"rejected"`` (x_o = x⁻) and ``"chosen"`` (x_o = x⁺) a dict with ``positions`` ``(M,)`` (the
      response positions t), ``targets`` ``(M,)`` (y⁻_m / y⁺_m), ``effects`` — one
      :func:`position_effect` per term of :data:`TERMS` — ``summary`` (scalars per term),
      ``delta_logp_linear`` (Σ_m of the linear prediction A·Δz of log π(target_m), per term
      ``y_neg``/``y_pos``/``both``, and ``actual``/``y_neg_actual``), and ``check``: errors of the
      prediction against the real step (:func:`ldjax.compare` fields for both terms, and the same
      relative errors for the y⁻ term against the y⁻-branch step), with the agreement of the
      per-position verdict "the argmax share rises". ``param_step``: inner products of the real
      parameter steps Δθ⁺ = Δθ − Δθ⁻ and Δθ⁻ (``pos_pos``, ``neg_neg``, ``pos_neg``); to first order
      Σ_m [A·Δz⁻]_{y⁻_m} on x⁻ = −‖Δθ⁻‖² / (ηβ(1−a)), since Δθ⁻ = −ηβ(1−a) ∇θ log π(y⁻|x).
    """
    from ldjax.decompose import decompose
    from ldjax.step import actual_step, compare

    obs, x_o, x_u, loss_kwargs, (ref_pos, ref_neg) = _setup(apply_fn, params, tokenizer, record, beta,
                                                             seq_cfg, ref_params)
    names = list(obs)
    mask_o = np.stack([obs[k]["mask"] for k in names])

    dec = decompose(apply_fn, params, x_o, x_u, losses.dpo, eta=eta, loss_kwargs=loss_kwargs)
    act = actual_step(apply_fn, params, x_o, x_u, _dpo_weighted, eta=eta, loss_kwargs=dict(loss_kwargs, w_pos=1.0))
    act_neg = actual_step(apply_fn, params, x_o, x_u, _dpo_weighted, eta=eta, loss_kwargs=dict(loss_kwargs, w_pos=0.0))
    cmp_both = compare(dec, act, mask=mask_o)
    # the parameter steps: Δθ (both terms), Δθ⁻ (y⁻ branch), Δθ⁺ = Δθ − Δθ⁻; float64 inner products
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree_util.tree_leaves(tree)])
    th0 = flat(params)
    d_all, d_neg = flat(act.params) - th0, flat(act_neg.params) - th0
    d_pos = d_all - d_neg
    param_step = dict(pos_pos=float(d_pos @ d_pos), neg_neg=float(d_neg @ d_neg), pos_neg=float(d_pos @ d_neg))

    # everything below in float64 numpy
    z = np.asarray(dec.logits, np.float64)
    dz_pos, dz_neg = (np.asarray(t, np.float64) for t in dec.delta_logits_terms)
    after = dict(y_neg=z + dz_neg, y_pos=z + dz_pos, both=z + dz_pos + dz_neg,
                 actual=np.asarray(act.logits_after, np.float64),
                 y_neg_actual=np.asarray(act_neg.logits_after, np.float64))
    lin_pos, lin_neg = (np.asarray(t, np.float64) for t in dec.delta_logp_linear_terms)   # A·Δz±
    lin = dict(y_neg=lin_neg, y_pos=lin_pos, both=lin_neg + lin_pos)
    lp_o = _seq_logp(z, np.stack([obs[k]["targets"] for k in names]), mask_o)
    verdict = lambda e: e["argmax_share_after"] > e["argmax_share_before"]

    observed = {}
    for i, name in enumerate(names):
        m = np.nonzero(mask_o[i])[0]
        tg = obs[name]["targets"][m]
        effects = {k: position_effect(z[i, m], after[k][i, m], tg) for k in TERMS}
        dlin = {k: float(np.sum(v[i, m, tg])) for k, v in lin.items()}
        for k in ("actual", "y_neg_actual"):
            dlin[k] = float(np.sum(effects[k]["target_logp_after"] - effects[k]["target_logp_before"]))
        check = {}
        for term, pred, real in (("both", "both", "actual"), ("y_neg", "y_neg", "y_neg_actual")):
            c = _check(z[i, m], after[pred][i, m], after[real][i, m])
            c.update(seq_delta_logp_linear=dlin[pred], seq_delta_logp_actual=dlin[real],
                     seq_rel_error=abs(dlin[pred] - dlin[real]) / max(abs(dlin[real]), 1e-300),
                     argmax_verdict_agreement=_fraction(verdict(effects[pred]) == verdict(effects[real])))
            check[term] = c
        observed[name] = dict(
            positions=m, targets=tg, tokens=obs[name]["tokens"], logp=float(lp_o[i]),
            effects=effects, summary={k: _effect_summary(e) for k, e in effects.items()},
            delta_logp_linear=dlin, check=check)

    r_pos, r_neg = observed["chosen"]["logp"] - ref_pos, observed["rejected"]["logp"] - ref_neg
    return dict(
        eta=float(eta), beta=float(beta), T=int(x_o.shape[1]), dtype=np.dtype(dec.logits.dtype).name,
        seq_cfg=dataclasses.asdict(seq_cfg),
        loss=float(np.asarray(dec.loss_u)[0]),
        a=float(1.0 / (1.0 + np.exp(-beta * (r_pos - r_neg)))),
        logp=dict(chosen=observed["chosen"]["logp"], rejected=observed["rejected"]["logp"]),
        ref_logp=dict(chosen=ref_pos, rejected=ref_neg),
        check_all=dataclasses.asdict(cmp_both),
        param_step=param_step,
        observed=observed,
    )


_PER_POSITION = ("argmax", "argmax_is_target", "argmax_share_before", "argmax_share_after",
                 "target_prob_before", "target_prob_after", "y_star", "y_star_share_before",
                 "y_star_share_after", "y_star_gain_share", "n_rise", "n_fall", "squeeze_regime")


def summarize(result: dict, per_position: bool = True) -> dict:
    """JSON-able digest of :func:`lm_squeeze`: scalars, checks and (optionally) the per-position
    vectors of the y⁻ term, both terms and the real step — without the ``(M, V)`` π matrices."""
    out = {k: v for k, v in result.items() if k != "observed"}
    out["observed"] = {}
    for name, o in result["observed"].items():
        d = dict(logp=o["logp"], n_positions=int(o["positions"].size), summary=o["summary"],
                 delta_logp_linear=o["delta_logp_linear"], check=o["check"])
        if per_position:
            d["positions"] = o["positions"].tolist()
            d["targets"] = o["targets"].tolist()
            d["per_position"] = {t: {k: np.asarray(o["effects"][t][k]).tolist() for k in _PER_POSITION}
                                 for t in ("y_neg", "both", "actual", "y_neg_actual")}
        out["observed"][name] = d
    return out


def format_table(result: dict) -> str:
    """A plain-text table of :func:`lm_squeeze` (or :func:`summarize`) results."""
    lines = [f"one DPO step, eta = {result['eta']:g}, beta = {result['beta']:g}, a = {result['a']:.3f}, "
             f"loss = {result['loss']:.4f}, dtype {result['dtype']}"]
    head = (f"{'x_o':<9}{'term':<13}{'M':>4}{'argmax↑':>9}{'(peak≠y)':>9}{'(peak=y)':>9}{'y*↑':>6}"
            f"{'π(y)↓':>7}{'share before→after':>21}{'n rise/fall':>13}{'Σlogπ(y) Δ':>12}{'argmax path Δ':>15}")
    lines.append(head)
    for name, o in result["observed"].items():
        for t in TERMS:
            s = o["summary"][t]
            f = lambda v: "  -  " if v is None else f"{v:.2f}"
            d = s["target_logp_sum_after"] - s["target_logp_sum_before"]
            lines.append(
                f"{name:<9}{t:<13}{s['n_positions']:>4}{f(s['frac_argmax_share_rises']):>9}"
                f"{f(s['frac_argmax_share_rises_peak_not_target']):>9}{f(s['frac_argmax_share_rises_peak_is_target']):>9}"
                f"{f(s['frac_y_star_share_rises']):>6}{f(s['frac_target_prob_falls']):>7}"
                f"{s['mean_argmax_share_before']:>10.3f} → {s['mean_argmax_share_after']:<6.3f}"
                f"{s['mean_n_rise']:>6.1f}/{s['mean_n_fall']:<6.1f}{d:>12.3f}"
                f"{s['argmax_path_logp_after'] - s['argmax_path_logp_before']:>+15.3f}")
    for name, o in result["observed"].items():
        for t in ("both", "y_neg"):
            c = o["check"][t]
            lines.append(f"check {name:<9}{t:<7} rel.err Δz {c['entk_step']:.2e}, A·Δz {c['linear']:.2e}, "
                         f"exact {c['exact']:.2e}; Σ Δlogπ(y) pred {c['seq_delta_logp_linear']:+.4f} vs "
                         f"actual {c['seq_delta_logp_actual']:+.4f}; argmax-verdict agreement "
                         f"{c['argmax_verdict_agreement']:.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# A peaky model: pretrain a tiny LM, or load one
# --------------------------------------------------------------------------------------------


def pretrain_tiny(records: Sequence[dict], *, config=None, steps: int = 300, batch_size: int = 16,
                  lr: float = 3e-3, seed: int = 0, seq_cfg: SeqConfig = SQUEEZE_SEQ,
                  fields: Sequence[str] = ("chosen",), progress: bool = False) -> tuple:
    """Next-token training of a small LM on ``prompt + <field>`` texts (default: prompt + chosen,
    i.e. dialogues ending with the preferred answer — an SFT-like, peaky starting point for DPO).

    Loss: mean next-token cross-entropy over every real token (prompt and response), Adam with
    10 % linear warm-up and cosine decay, global-norm clip 1. Deterministic in ``seed``.

    Returns:
      ``(params, info)``: ``info`` has ``steps``, ``seconds``, ``final_loss`` (mean of the last 20
      steps, nats per token), ``n_sequences``, ``config`` (a dict of the LMConfig).
    """
    import optax

    from ldjax.lm.model import init_params
    from ldjax.lm.tokenizer import ByteTokenizer

    config = TINY_LM if config is None else config
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"pretrain_tiny: need steps >= 1, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}")
    if seq_cfg.max_len > config.max_len:
        raise ValueError(f"pretrain_tiny: seq_cfg.max_len={seq_cfg.max_len} > model max_len={config.max_len}")
    tok = ByteTokenizer()
    rows = [encode_example(tok, r["prompt"], r[f], max_len=seq_cfg.max_len, max_prompt_len=seq_cfg.max_prompt_len)
            for r in records for f in fields]
    if not rows:
        raise ValueError("pretrain_tiny: no records")
    X = np.stack([r["tokens"] for r in rows])
    Y = np.stack([r["targets"] for r in rows])
    M = Y != tok.pad_id
    apply_fn = cached_apply_fn(config)
    params = init_params(config, jax.random.PRNGKey(seed))
    warm = max(1, steps // 10)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    opt = tx.init(params)

    @jax.jit
    def step(p, s, x, y, m):
        def loss(p):
            return jnp.sum(losses.sft(apply_fn(p, x), y, m)) / jnp.sum(m)

        v, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, v

    rng = np.random.default_rng(seed)
    t0, hist = time.time(), []
    bs = min(batch_size, X.shape[0])
    for k in range(steps):
        idx = rng.choice(X.shape[0], size=bs, replace=False)
        params, opt, v = step(params, opt, X[idx], Y[idx], M[idx])
        hist.append(v)
        if progress and (k + 1) % 50 == 0:
            print(f"  pretrain step {k + 1}/{steps}: loss {float(v):.3f} ({time.time() - t0:.0f} s)", flush=True)
    hist = np.asarray(jax.device_get(hist), np.float64)
    info = dict(steps=int(steps), batch_size=int(bs), lr=float(lr), seed=int(seed),
                seconds=round(time.time() - t0, 2), final_loss=float(np.mean(hist[-20:])),
                first_loss=float(hist[0]), n_sequences=int(X.shape[0]), texts=f"prompt + {'/'.join(fields)}",
                config=_config_dict(config))
    return params, info


def _config_dict(config) -> dict:
    d = dataclasses.asdict(config)
    d["dtype"] = np.dtype(config.dtype).name
    return d


def _config_from_dict(d: dict):
    from ldjax.lm.model import LMConfig

    d = dict(d)
    if "dtype" in d:
        d["dtype"] = getattr(jnp, str(d["dtype"]))
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"LM config has unknown field(s) {unknown}")
    return LMConfig(**d)


def save_lm(path, params, config, info: Optional[dict] = None) -> str:
    """Write ``params`` and their LMConfig (as JSON, array ``lm_config``) to one ``.npz``
    (:func:`ldjax.zoo.save_npz` layout); :func:`load_lm` reads it back."""
    from ldjax import zoo

    zoo.save_npz(path, jax.device_get(params), lm_config=json.dumps(_config_dict(config)),
                 info=json.dumps(info or {}, default=str))
    return os.fspath(path)


def _infer_config(params: dict, n_heads: Optional[int], where: str, dtype=None):
    from ldjax.lm.model import LMConfig

    try:
        V, d = np.shape(params["tok_embed"]["embedding"])
        max_len = np.shape(params["pos_embed"]["embedding"])[0]
        n_layers = sum(1 for k in params if k.startswith("block_"))
        d_ff = np.shape(params["block_0"]["mlp"]["fc_in"]["kernel"])[1]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not the parameters of ldjax.lm.model.TransformerLM "
                         f"(missing or malformed {e})") from e
    if n_heads is None:
        raise ValueError(f"{where}: the number of attention heads cannot be read from parameter "
                         "shapes and no config.json was found next to it; pass n_heads (--lm-heads)")
    dtype = dtype or jnp.asarray(params["tok_embed"]["embedding"]).dtype
    return LMConfig(vocab_size=int(V), d_model=int(d), n_heads=int(n_heads), n_layers=int(n_layers),
                    d_ff=int(d_ff), max_len=int(max_len), dtype=dtype)


def _find_pipeline_config(path: Path) -> Optional[Path]:
    for p in [path] + list(path.parents)[:4]:
        if (p / "config.json").is_file():
            return p / "config.json"
    return None


def _orbax_state_dir(path: Path) -> tuple[Path, str]:
    """The ``state`` item folder of a pipeline checkpoint at ``path`` (several layouts)."""
    def latest_step(d: Path) -> Optional[Path]:
        steps = [c for c in d.iterdir() if c.is_dir() and c.name.isdigit() and (c / "state").is_dir()]
        return max(steps, key=lambda c: int(c.name)) if steps else None

    if (path / "state").is_dir():                       # one step folder: <ckpt>/<step>
        return path / "state", str(path)
    s = latest_step(path)                                # a CheckpointManager folder (ckpt/, save_params)
    if s is not None:
        return s / "state", str(s)
    for phase in ("sft", "sft_extend", "pretrain"):    # a run folder of `ldjax lm`: the SFT model first
        if (path / phase / "ckpt").is_dir():
            s = latest_step(path / phase / "ckpt")
            if s is not None:
                return s / "state", str(s)
    raise FileNotFoundError(f"{path}: no orbax checkpoint found (expected <step>/state, a checkpoint "
                            "folder of numbered steps, or an `ldjax lm` run folder with sft/ckpt or pretrain/ckpt)")


def load_lm(path, n_heads: Optional[int] = None) -> tuple:
    """Parameters and :class:`~ldjax.lm.model.LMConfig` of a saved LM: ``(params, config, info)``.

    ``path`` may be an ``.npz`` written by :func:`save_lm` (or any :func:`ldjax.zoo.save_npz` of
    TransformerLM params: then the shape is read from the arrays and ``n_heads`` must be given), or
    an orbax checkpoint of the ``ldjax lm`` pipeline (:func:`ldjax.lm.train.save_params` folder, a
    phase's ``ckpt`` folder, one step of it, or a run folder — its SFT model, else the pretrained
    one). For orbax checkpoints the model shape comes from the run's ``config.json`` (searched in
    ``path`` and up to four parents) when there is one, else from the arrays plus ``n_heads``.
    """
    from ldjax.lm.model import init_params

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"load_lm: no such file or folder: {p}")
    info: dict = {"path": str(p)}
    if p.is_file():
        if p.suffix != ".npz":
            raise ValueError(f"load_lm: {p} is a file but not an .npz (give an .npz or an orbax folder)")
        from ldjax import zoo

        params, arrays = zoo.load_npz(p)
        if "lm_config" in arrays:
            config = _config_from_dict(json.loads(str(arrays["lm_config"])))
        else:
            config = _infer_config(params, n_heads, str(p))
        if "info" in arrays:
            info["saved_info"] = json.loads(str(arrays["info"]))
        info["format"] = "npz"
    else:
        import orbax.checkpoint as ocp

        state_dir, step_dir = _orbax_state_dir(p)
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(state_dir.absolute())
        if not isinstance(state, dict) or "params" not in state:
            raise ValueError(f"load_lm: {state_dir} holds no 'params' item")
        params = state["params"]
        cfg_path = _find_pipeline_config(p)
        if cfg_path is not None:
            from ldjax.lm.config import load_config

            pc = load_config(cfg_path)
            V = int(np.shape(params["tok_embed"]["embedding"])[0])
            config = pc.model.lm_config(pc.data.max_len, vocab_size=V)
            info["config_json"] = str(cfg_path)
            info["pipeline_seq"] = dict(max_len=pc.data.max_len, max_prompt_len=pc.data.max_prompt_len)
        else:
            config = _infer_config(params, n_heads, str(p))
        info.update(format="orbax", checkpoint=step_dir)
    like = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
    got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
    want = jax.tree_util.tree_map(lambda s: tuple(s.shape), like)
    if jax.tree_util.tree_structure(got, is_leaf=lambda x: isinstance(x, tuple)) != \
            jax.tree_util.tree_structure(want, is_leaf=lambda x: isinstance(x, tuple)) or \
            jax.tree_util.tree_leaves(got, is_leaf=lambda x: isinstance(x, tuple)) != \
            jax.tree_util.tree_leaves(want, is_leaf=lambda x: isinstance(x, tuple)):
        raise ValueError(f"load_lm: the parameters in {p} do not match the model {config} "
                         "(different tree or shapes)")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, config.dtype), params)
    info["config"] = _config_dict(config)
    return params, config, info


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------


def _token_label(tokenizer, t: int) -> str:
    if t in (getattr(tokenizer, "eos_id", -1),):
        return "EOS"
    s = tokenizer.decode([int(t)])
    return {" ": "␣", "\n": "⏎", "": "·"}.get(s, s if s.isprintable() else "?")


def plot_lm_squeeze(result: dict, path: str, tokenizer=None, *, title: str = "", max_positions: int = 130,
                    dpi: int = 100) -> str:
    """Per response position m of x⁻, before and after the y⁻ term alone (exact softmax of z + Δz⁻):

    1. the argmax token's share π_m(argmax) (grey: before, blue: after);
    2. its change Δπ_m(argmax) (blue bars: y⁻_m is not the argmax; red: it is, shaded columns);
    3. π_m(y⁻_m) before/after (log scale);
    4. its change Δ log π_m(y⁻_m).

    Right: the prediction against a real SGD step through the y⁻ branch — Δπ(argmax) and
    Δ log π(y⁻_m) per position, predicted vs actual, with the diagonal.
    ``result`` from :func:`lm_squeeze`; the first ``max_positions`` positions are shown. Returns ``path``.
    """
    from ldjax.squeeze import plots

    plt = plots.plt
    o = result["observed"]["rejected"]
    e, ea = o["effects"]["y_neg"], o["effects"]["y_neg_actual"]
    s = o["summary"]["y_neg"]
    M = min(int(o["positions"].size), max_positions)
    x = np.arange(M)
    peak = np.asarray(e["argmax_is_target"][:M])
    width = float(np.clip(5.0 + 0.085 * M, 9.0, 17.0))
    fig = plt.figure(figsize=(width + 4.2, 9.6))
    gs = fig.add_gridspec(4, 2, width_ratios=[width, 3.6], height_ratios=[1.25, 0.85, 1.25, 0.85],
                          hspace=0.5, wspace=0.16)
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
    axes[0].set_title(f"the argmax token's share: mean {s['mean_argmax_share_before']:.3f} → "
                      f"{s['mean_argmax_share_after']:.3f}  (shaded: y⁻_m is the argmax)", fontsize=9.5)
    bars(axes[1], np.asarray(e["argmax_share_after"]) - np.asarray(e["argmax_share_before"]))
    axes[1].set_ylabel("Δπ_m(argmax)")
    axes[1].set_title(f"rises at {_pct(s['frac_argmax_share_rises'])} of positions — "
                      f"{_pct(s['frac_argmax_share_rises_peak_not_target'])} where y⁻_m is not the argmax (blue), "
                      f"{_pct(s['frac_argmax_share_rises_peak_is_target'])} where it is (red)", fontsize=9.5)
    dumbbell(axes[2], e["target_prob_before"], e["target_prob_after"])
    plots._log(axes[2], "y", numticks=6)
    axes[2].set_ylabel("π_m(y⁻_m)")
    axes[2].set_title(f"π of the rejected token: Σ_m log π(y⁻_m) {s['target_logp_sum_before']:.2f} → "
                      f"{s['target_logp_sum_after']:.2f}", fontsize=9.5)
    dl = np.asarray(e["target_logp_after"]) - np.asarray(e["target_logp_before"])
    bars(axes[3], dl)
    axes[3].set_ylabel("Δ log π_m(y⁻_m)")
    axes[3].set_title(f"falls at {_pct(s['frac_target_prob_falls'])} of positions", fontsize=9.5)
    for ax in axes[:3]:
        plt.setp(ax.get_xticklabels(), visible=False)
    if tokenizer is not None:
        axes[3].set_xticks(x)
        axes[3].set_xticklabels([_token_label(tokenizer, t) for t in o["targets"][:M]], fontsize=6.5,
                                family="monospace")
        axes[3].set_xlabel("response position m of x⁻ (tick: the token y⁻_m that position predicts)")
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
    check(sc1, np.asarray(e["argmax_share_after"]) - e["argmax_share_before"],
          np.asarray(ea["argmax_share_after"]) - ea["argmax_share_before"], "Δπ_m(argmax)")
    sc1.set_title(f"eNTK prediction vs a real SGD step\n(y⁻ branch only): same sign of Δπ(argmax)\n"
                  f"at {_pct(c['argmax_verdict_agreement'])} of positions", fontsize=9.5)
    sc1.legend(loc="upper left", fontsize=7.5)
    check(sc2, dl, np.asarray(ea["target_logp_after"]) - ea["target_logp_before"], "Δ log π_m(y⁻_m)")
    sc2.set_title(f"rel. error of Δz⁻ {c['entk_step']:.1e};\nΣ_m Δ log π(y⁻_m): predicted (A·Δz) "
                  f"{c['seq_delta_logp_linear']:.3f},\nactual {c['seq_delta_logp_actual']:.3f}", fontsize=9.5)
    fig.suptitle(title or (f"One DPO step (SGD, η = {result['eta']:.3g}, β = {result['beta']:g}): the y⁻ term "
                           f"Δz⁻ = −ηK(x⁻, x⁻)G⁻ on x⁻ = [x; y⁻], per response position"), fontsize=11.5)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.92, bottom=0.08)
    plots._save(fig, path, dpi)
    return path


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"
