"""The squeezing effect on the language model: one DPO step's decomposition on a probe prompt.

The squeezing effect (Ren & Sutherland, ICLR 2025, arXiv 2407.10490, §3.3) on the LM: one DPO step
on (x, y⁺, y⁻) changes the logits of any observed sequence χ_o by two terms,

    Δz(χ_o) = −η K(χ_o, x⁺) G⁺  −η K(χ_o, x⁻) G⁻  =  Δz⁺ + Δz⁻,

with ``G⁻ = −β(1−a)(π⁻ − y⁻)`` (a = σ(β(r⁺ − r⁻))): the y⁻ term is a *negative gradient* on y⁻.
On χ_o = x⁻ = [x; y⁻] it lowers log π(y⁻) at every response position m, and where π_m is peaky
and y⁻_m is not its peak it sends the freed mass to the already-largest token — the argmax
token's share π_m(argmax) rises, and the peakier π_m the more of the other tokens fall (the
squeeze; the toy analysis is :mod:`ldjax.experiments.squeeze.toy`). Where y⁻_m is the peak the
mass spreads.

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

A peaky model is needed for a visible squeeze: :func:`ldjax.lm.checkpoint.load_lm` reads an LM
checkpoint (``ldjax lm`` runs, :func:`~ldjax.lm.checkpoint.save_lm`); :func:`pretrain_tiny` trains a
tiny LM for a few hundred steps on prompt + chosen texts when none is given.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldjax import ActualStep, Decomposition, actual_step, compare, decompose, losses
from ldjax.data.preferences import SeqConfig, encode_example
from ldjax.experiments.squeeze.plots import plot_lm_squeeze
from ldjax.lm.checkpoint import config_to_dict, load_lm, save_lm
from ldjax.lm.config import ModelConfig, PretrainConfig
from ldjax.lm.model import LMConfig, init_params, make_apply_fn
from ldjax.lm.tokenizer import ByteTokenizer
from ldjax.lm.train import pretrain
from ldjax.training.config import Config

__all__ = [
    "SqueezeLMConfig",
    "DEFAULT",
    "QUICK",
    "PRESETS",
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


@dataclasses.dataclass(frozen=True)
class SqueezeLMConfig(Config):
    """The LM squeeze experiment (``ldjax squeeze --lm``).

    Attributes:
      model: the tiny LM's shape when none is loaded (byte vocabulary).
      max_len, max_prompt_len: sequence lengths of the observed and updated sequences.
      pretrain_steps, pretrain_batch, pretrain_lr: the tiny LM's pretraining
        (:func:`pretrain_tiny`).
      beta: DPO's β.
      eta: the DPO step's size; None picks it so that the y⁻ term lowers log π(y⁻_m) by
        ``eta_target`` nats per response position (:func:`auto_eta`).
      eta_sweep: multiples of η also run, to show how the squeeze and the error grow.
    """

    model: ModelConfig = ModelConfig(d_model=64, n_heads=2, n_layers=2, d_ff=256)
    max_len: int = 128
    max_prompt_len: int = 48
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    beta: float = 0.1
    eta: float | None = None
    eta_target: float = 0.05
    eta_sweep: tuple = (1.0, 3.0, 10.0, 30.0)

    def __post_init__(self):
        for f in ("max_len", "max_prompt_len", "pretrain_steps", "pretrain_batch"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
        if self.max_len < self.max_prompt_len + 2:
            raise ValueError(f"max_len={self.max_len} must be >= max_prompt_len + 2")
        for f in ("pretrain_lr", "beta", "eta_target"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)!r}")
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"eta must be > 0 or None (auto), got {self.eta!r}")
        if any(not m > 0 for m in self.eta_sweep):
            raise ValueError(f"eta_sweep multiples must be > 0, got {self.eta_sweep}")

    @property
    def seq(self) -> SeqConfig:
        return SeqConfig(max_len=self.max_len, max_prompt_len=self.max_prompt_len)

    def lm_config(self) -> LMConfig:
        return self.model.lm_config(self.max_len)


DEFAULT = SqueezeLMConfig()
QUICK = SqueezeLMConfig(pretrain_steps=60, eta_sweep=(1.0, 10.0))
PRESETS = {"default": DEFAULT, "quick": QUICK}

SQUEEZE_SEQ = DEFAULT.seq
"""Sequence lengths of the tiny LM: 128 tokens, the prompt's last 48, so up to 79 response
positions."""


@functools.lru_cache(maxsize=16)
def cached_apply_fn(config) -> Callable:
    """:func:`ldjax.lm.model.make_apply_fn` memoised per (hashable) config: the engine's jitted
    programs are cached per ``apply_fn`` object, so reusing it avoids recompiling."""
    return make_apply_fn(config)


TINY_LM = DEFAULT.lm_config()
"""The model :func:`pretrain_tiny` trains: byte vocabulary, d_model 64, 2 heads, 2 layers,
d_ff 256."""

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
      pre-step argmax token), ``target_prob_before``/``_after``, ``y_star`` (argmax over tokens
      other than the target), ``y_star_share_before``/``_after``,
      ``bystander_mass_before``/``_after`` (mass off the target and y*), ``n_rise``/``n_fall``
      (vocabulary entries whose π rose / fell), ``top_gainer`` (token whose π gained most),
      ``y_star_gain_share`` (y*'s part of all the probability mass gained, Σ_i max(Δπ_i, 0): where
      the mass goes), ``entropy_before``/``_after`` (nats), ``new_argmax``/``max_prob_after``
      (argmax and max of π after), ``squeeze_regime`` (π(target) < ‖π‖²: where the toy's
      same-position update z + c(π − e_target) makes, to first order, every token below
      ‖π‖² − π(target) fall, i.e. squeezes rather than spreads the mass); and ``pi_before``,
      ``pi_after`` ``(M, V)``.
    """
    z0 = np.asarray(z_before, np.float64)
    z1 = np.asarray(z_after, np.float64)
    t = np.asarray(targets).astype(np.int64)
    if z0.ndim != 2 or z0.shape != z1.shape or t.shape != z0.shape[:1]:
        raise ValueError(
            f"position_effect: need z_before, z_after (M, V) and targets (M,); got "
            f"{z0.shape}, {z1.shape}, {t.shape}"
        )
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
        argmax=am,
        argmax_is_target=am == t,
        argmax_share_before=p0[rows, am],
        argmax_share_after=p1[rows, am],
        target_prob_before=p0[rows, t],
        target_prob_after=p1[rows, t],
        target_logp_before=lp0[rows, t],
        target_logp_after=lp1[rows, t],
        y_star=ys,
        y_star_share_before=p0[rows, ys],
        y_star_share_after=p1[rows, ys],
        bystander_mass_before=np.maximum(by0, 0.0),
        bystander_mass_after=np.maximum(by1, 0.0),
        n_rise=np.sum(dlp > 0, -1),
        n_fall=np.sum(dlp < 0, -1),
        top_gainer=np.argmax(p1 - p0, -1),
        y_star_gain_share=np.where(
            gained > 0, gain[rows, ys] / np.where(gained > 0, gained, 1.0), 0.0
        ),
        entropy_before=ent(p0, lp0),
        entropy_after=ent(p1, lp1),
        new_argmax=p1.argmax(-1),
        max_prob_after=p1.max(-1),
        squeeze_regime=p0[rows, t] < np.sum(p0 * p0, -1),
        pi_before=p0,
        pi_after=p1,
    )


def _fraction(x: np.ndarray, where: np.ndarray | None = None) -> float | None:
    x = np.asarray(x, bool)
    if where is not None:
        x = x[np.asarray(where, bool)]
    return float(np.mean(x)) if x.size else None


def _effect_summary(e: dict) -> dict:
    """Scalars of one :func:`position_effect` (JSON-able). ``argmax_path_logp_*`` is the paper's
    teacher-forced argmax path Σ_m log max_v π_m(v) along the observed sequence (arXiv 2407.10490,
    §4)."""
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
        mean_y_star_gain_share_peak_not_target=(
            float(np.mean(e["y_star_gain_share"][peak_off])) if peak_off.any() else None
        ),
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
    if not beta > 0:
        raise ValueError(f"lm_squeeze: beta must be > 0, got {beta}")
    cfg = getattr(apply_fn, "config", None)
    if cfg is not None and seq_cfg.max_len > cfg.max_len:
        raise ValueError(
            f"lm_squeeze: seq_cfg.max_len={seq_cfg.max_len} exceeds the model's "
            f"max_len={cfg.max_len}"
        )
    pos, neg = _encode_pair(tokenizer, record, seq_cfg)
    x_pos, x_neg = jnp.asarray(pos["tokens"][None]), jnp.asarray(neg["tokens"][None])
    obs = {"rejected": neg, "chosen": pos}
    x_o = jnp.asarray(np.stack([obs[k]["tokens"] for k in obs]))
    kw = dict(
        targets_pos=jnp.asarray(pos["targets"][None]),
        targets_neg=jnp.asarray(neg["targets"][None]),
        mask_pos=jnp.asarray(pos["mask"][None]),
        mask_neg=jnp.asarray(neg["mask"][None]),
        beta=float(beta),
    )
    x_u = (x_pos, x_neg)
    tg = np.stack([obs[k]["targets"] for k in obs])
    mk = np.stack([obs[k]["mask"] for k in obs])
    if ref_params is None:
        # π_ref = π_θ: its log-probs are those of the decomposition's own logits z(x_o),
        # x_o = (x⁻, x⁺)
        zero = jnp.zeros((1,), jax.eval_shape(apply_fn, params, x_o).dtype)
        z_ref = np.asarray(
            decompose(
                apply_fn,
                params,
                x_o,
                x_u,
                losses.dpo,
                eta=1.0,
                loss_kwargs=dict(kw, ref_logp_pos=zero, ref_logp_neg=zero),
            ).logits
        )
    else:
        z_ref = np.asarray(apply_fn(ref_params, x_o))
    lp_ref = _seq_logp(z_ref, tg, mk)  # (rejected, chosen)
    dtype = z_ref.dtype
    kw.update(
        ref_logp_pos=jnp.asarray(lp_ref[1:2], dtype), ref_logp_neg=jnp.asarray(lp_ref[:1], dtype)
    )
    return obs, x_o, x_u, kw, (float(lp_ref[1]), float(lp_ref[0]))


def auto_eta(
    apply_fn: Callable,
    params: Any,
    tokenizer,
    record: dict,
    *,
    target: float = 0.05,
    beta: float = 0.1,
    seq_cfg: SeqConfig = SQUEEZE_SEQ,
    ref_params: Any = None,
) -> float:
    """The step size η at which the y⁻ term's linear prediction lowers log π(y⁻_m) on x⁻ by
    ``target`` nats per response position on average (Σ_m [A·Δz⁻]_{y⁻_m} = −target·M).

    The prediction is linear in η (Δz⁻ = −η K G⁻), so one :func:`ldjax.decompose` at η = 1 fixes it.
    A small ``target`` keeps the step in the regime where the one-step prediction holds; the
    scale of η differs by orders of magnitude between models, hence this normalisation.
    """
    if not target > 0:
        raise ValueError(f"auto_eta: target must be > 0, got {target}")
    obs, x_o, x_u, loss_kwargs, _ = _setup(
        apply_fn, params, tokenizer, record, beta, seq_cfg, ref_params
    )
    dec = decompose(apply_fn, params, x_o, x_u, losses.dpo, eta=1.0, loss_kwargs=loss_kwargs)
    lin = np.asarray(dec.delta_logp_linear_terms[1][0], np.float64)
    m = np.nonzero(obs["rejected"]["mask"])[0]
    per = float(np.sum(lin[m, obs["rejected"]["targets"][m]])) / m.size
    if not per < 0:
        raise ValueError(
            f"auto_eta: the y⁻ term does not lower log π(y⁻) (linear change {per:.3g} per "
            "position at η = 1); the gradient of log π(y⁻) is zero?"
        )
    return float(target / -per)


def _check(z: np.ndarray, dz_pred: np.ndarray, z_real: np.ndarray, eta: float) -> dict:
    """:func:`ldjax.compare` of one observed sequence's response positions: logits ``(M, V)``
    before, the predicted change ``dz_pred`` and the real step's logits ``z_real``."""
    pred = Decomposition(z[None], (), (dz_pred[None],), None, eta)
    real = ActualStep(None, z[None], z_real[None], None)
    return dataclasses.asdict(compare(pred, real))


def lm_squeeze(
    apply_fn: Callable,
    params: Any,
    tokenizer,
    record: dict,
    *,
    eta: float,
    beta: float = 0.1,
    seq_cfg: SeqConfig = SQUEEZE_SEQ,
    ref_params: Any = None,
) -> dict:
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
      A dict with ``eta``, ``beta``, ``T``, ``loss`` (DPO loss before the step),
      ``a`` = σ(β(r⁺ − r⁻)), ``logp``/``ref_logp`` (log π(y±|x) under θ / the reference), and
      ``observed``: for ``"rejected"`` (x_o = x⁻) and ``"chosen"`` (x_o = x⁺) a dict with
      ``positions`` ``(M,)`` (the response positions t), ``targets`` ``(M,)`` (y⁻_m / y⁺_m),
      ``effects`` — one :func:`position_effect` per term of :data:`TERMS` — ``summary`` (scalars per
      term), ``delta_logp_linear`` (Σ_m of the linear prediction A·Δz of log π(target_m), per term
      ``y_neg``/``y_pos``/``both``, and ``actual``/``y_neg_actual``), and ``check``: errors of the
      prediction against the real step (:func:`ldjax.compare` fields for both terms, and the same
      relative errors for the y⁻ term against the y⁻-branch step), with the agreement of the
      per-position verdict "the argmax share rises". ``param_step``: inner products of the real
      parameter steps Δθ⁺ = Δθ − Δθ⁻ and Δθ⁻ (``pos_pos``, ``neg_neg``, ``pos_neg``); to first order
      Σ_m [A·Δz⁻]_{y⁻_m} on x⁻ = −‖Δθ⁻‖² / (ηβ(1−a)), since Δθ⁻ = −ηβ(1−a) ∇θ log π(y⁻|x).
    """
    obs, x_o, x_u, loss_kwargs, (ref_pos, ref_neg) = _setup(
        apply_fn, params, tokenizer, record, beta, seq_cfg, ref_params
    )
    names = list(obs)
    mask_o = np.stack([obs[k]["mask"] for k in names])

    dec = decompose(apply_fn, params, x_o, x_u, losses.dpo, eta=eta, loss_kwargs=loss_kwargs)
    act = actual_step(
        apply_fn, params, x_o, x_u, _dpo_weighted, eta=eta, loss_kwargs=dict(loss_kwargs, w_pos=1.0)
    )
    act_neg = actual_step(
        apply_fn, params, x_o, x_u, _dpo_weighted, eta=eta, loss_kwargs=dict(loss_kwargs, w_pos=0.0)
    )
    cmp_both = compare(dec, act, mask=mask_o)
    # the parameter steps: Δθ (both terms), Δθ⁻ (y⁻ branch), Δθ⁺ = Δθ − Δθ⁻; float64 inner products
    flat = lambda tree: np.concatenate(
        [np.ravel(np.asarray(a, np.float64)) for a in jax.tree_util.tree_leaves(tree)]
    )
    th0 = flat(params)
    d_all, d_neg = flat(act.params) - th0, flat(act_neg.params) - th0
    d_pos = d_all - d_neg
    param_step = dict(
        pos_pos=float(d_pos @ d_pos), neg_neg=float(d_neg @ d_neg), pos_neg=float(d_pos @ d_neg)
    )

    # everything below in float64 numpy
    z = np.asarray(dec.logits, np.float64)
    dz_pos, dz_neg = (np.asarray(t, np.float64) for t in dec.delta_logits_terms)
    after = dict(
        y_neg=z + dz_neg,
        y_pos=z + dz_pos,
        both=z + dz_pos + dz_neg,
        actual=np.asarray(act.logits_after, np.float64),
        y_neg_actual=np.asarray(act_neg.logits_after, np.float64),
    )
    lin_pos, lin_neg = (np.asarray(t, np.float64) for t in dec.delta_logp_linear_terms)  # A·Δz±
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
            dlin[k] = float(
                np.sum(effects[k]["target_logp_after"] - effects[k]["target_logp_before"])
            )
        check = {}
        for term, pred, real in (("both", "both", "actual"), ("y_neg", "y_neg", "y_neg_actual")):
            c = _check(z[i, m], after[pred][i, m] - z[i, m], after[real][i, m], float(eta))
            c.update(
                seq_delta_logp_linear=dlin[pred],
                seq_delta_logp_actual=dlin[real],
                seq_rel_error=abs(dlin[pred] - dlin[real]) / max(abs(dlin[real]), 1e-300),
                argmax_verdict_agreement=_fraction(
                    verdict(effects[pred]) == verdict(effects[real])
                ),
            )
            check[term] = c
        observed[name] = dict(
            positions=m,
            targets=tg,
            tokens=obs[name]["tokens"],
            logp=float(lp_o[i]),
            effects=effects,
            summary={k: _effect_summary(e) for k, e in effects.items()},
            delta_logp_linear=dlin,
            check=check,
        )

    r_pos, r_neg = observed["chosen"]["logp"] - ref_pos, observed["rejected"]["logp"] - ref_neg
    return dict(
        eta=float(eta),
        beta=float(beta),
        T=int(x_o.shape[1]),
        dtype=np.dtype(dec.logits.dtype).name,
        seq_cfg=dataclasses.asdict(seq_cfg),
        loss=float(np.asarray(dec.loss_u)[0]),
        a=float(1.0 / (1.0 + np.exp(-beta * (r_pos - r_neg)))),
        logp=dict(chosen=observed["chosen"]["logp"], rejected=observed["rejected"]["logp"]),
        ref_logp=dict(chosen=ref_pos, rejected=ref_neg),
        check_all=dataclasses.asdict(cmp_both),
        param_step=param_step,
        observed=observed,
    )


_PER_POSITION = (
    "argmax",
    "argmax_is_target",
    "argmax_share_before",
    "argmax_share_after",
    "target_prob_before",
    "target_prob_after",
    "y_star",
    "y_star_share_before",
    "y_star_share_after",
    "y_star_gain_share",
    "n_rise",
    "n_fall",
    "squeeze_regime",
)


def summarize(result: dict, per_position: bool = True) -> dict:
    """JSON-able digest of :func:`lm_squeeze`: scalars, checks and (optionally) the per-position
    vectors of the y⁻ term, both terms and the real step — without the ``(M, V)`` π matrices."""
    out = {k: v for k, v in result.items() if k != "observed"}
    out["observed"] = {}
    for name, o in result["observed"].items():
        d = dict(
            logp=o["logp"],
            n_positions=int(o["positions"].size),
            summary=o["summary"],
            delta_logp_linear=o["delta_logp_linear"],
            check=o["check"],
        )
        if per_position:
            d["positions"] = o["positions"].tolist()
            d["targets"] = o["targets"].tolist()
            d["per_position"] = {
                t: {k: np.asarray(o["effects"][t][k]).tolist() for k in _PER_POSITION}
                for t in ("y_neg", "both", "actual", "y_neg_actual")
            }
        out["observed"][name] = d
    return out


def format_table(result: dict) -> str:
    """A plain-text table of :func:`lm_squeeze` (or :func:`summarize`) results."""
    lines = [
        f"one DPO step, eta = {result['eta']:g}, beta = {result['beta']:g}, a = {result['a']:.3f}, "
        f"loss = {result['loss']:.4f}, dtype {result['dtype']}"
    ]
    head = (
        f"{'x_o':<9}{'term':<13}{'M':>4}{'argmax↑':>9}{'(peak≠y)':>9}{'(peak=y)':>9}{'y*↑':>6}"
        f"{'π(y)↓':>7}{'share before→after':>21}{'n rise/fall':>13}{'Σlogπ(y) Δ':>12}"
        f"{'argmax path Δ':>15}"
    )
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
                f"{s['argmax_path_logp_after'] - s['argmax_path_logp_before']:>+15.3f}"
            )
    for name, o in result["observed"].items():
        for t in ("both", "y_neg"):
            c = o["check"][t]
            lines.append(
                f"check {name:<9}{t:<7} rel.err Δz {c['entk_step']:.2e}, A·Δz {c['linear']:.2e}, "
                f"exact {c['exact']:.2e}; Σ Δlogπ(y) pred {c['seq_delta_logp_linear']:+.4f} vs "
                f"actual {c['seq_delta_logp_actual']:+.4f}; argmax-verdict agreement "
                f"{c['argmax_verdict_agreement']:.2f}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# A peaky model: pretrain a tiny LM on the one training loop
# --------------------------------------------------------------------------------------------


def pretrain_tiny(
    records: Sequence[dict],
    *,
    config=None,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    seq_cfg: SeqConfig = SQUEEZE_SEQ,
    fields: Sequence[str] = ("chosen",),
    progress: bool = False,
) -> tuple:
    """Next-token training of a small LM on ``prompt + <field>`` texts (default: prompt + chosen,
    i.e. dialogues ending with the preferred answer — an SFT-like, peaky starting point for DPO).

    The LM's pretraining phase (:func:`ldjax.lm.train.pretrain`, on the one training loop): mean
    next-token cross-entropy over every real token (prompt and response), Adam with 10 % linear
    warm-up and cosine decay, global-norm clip 1. Deterministic in ``seed``.

    Returns:
      ``(params, info)``: ``info`` has ``steps``, ``seconds``, ``first_loss``, ``final_loss`` (mean
      of the last 20 steps, nats per token), ``n_sequences``, ``config`` (a dict of the LMConfig).
    """
    config = TINY_LM if config is None else config
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(
            "pretrain_tiny: need steps >= 1, batch_size >= 1, lr > 0; "
            f"got {steps}, {batch_size}, {lr}"
        )
    if seq_cfg.max_len > config.max_len:
        raise ValueError(
            f"pretrain_tiny: seq_cfg.max_len={seq_cfg.max_len} > model max_len={config.max_len}"
        )
    tok = ByteTokenizer()
    rows = [
        encode_example(
            tok, r["prompt"], r[f], max_len=seq_cfg.max_len, max_prompt_len=seq_cfg.max_prompt_len
        )
        for r in records
        for f in fields
    ]
    data = {
        "tokens": np.stack([r["tokens"] for r in rows]),
        "targets": np.stack([r["targets"] for r in rows]),
    }
    data["mask"] = data["targets"] != tok.pad_id
    bs = min(batch_size, data["tokens"].shape[0])
    phase = PretrainConfig(
        optimizer="adam",
        lr=lr,
        warmup=max(1, steps // 10),
        schedule="cosine",
        grad_clip=1.0,
        batch_size=bs,
        steps=steps,
        eval_every=steps,
        ckpt_every=steps,
        seed=seed,
    )
    params = init_params(config, jax.random.PRNGKey(seed))
    res = pretrain(params, config, data, phase, progress=progress)
    hist = np.asarray(res.history["loss"], np.float64)
    info = dict(
        steps=int(steps),
        batch_size=int(bs),
        lr=float(lr),
        seed=int(seed),
        seconds=round(res.seconds, 2),
        final_loss=float(np.mean(hist[-20:])),
        first_loss=float(hist[0]),
        n_sequences=int(data["tokens"].shape[0]),
        texts=f"prompt + {'/'.join(fields)}",
        config=config_to_dict(config),
    )
    return res.params, info
