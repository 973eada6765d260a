"""Finetuning losses as functions of logits (PAPER.md §3). Each returns a per-example loss ``(N,)``.

Conventions: sequence logits ``(N, T, V)`` with ``targets[n, t]`` the token that the logits at
position ``t`` predict (already shifted) and ``mask[n, t]`` True on response positions only;
classifier logits ``(N, V)`` with ``targets (N,)``. ``r± = log π(y±|x) − log π_ref(y±|x)``.
The residual G of each loss comes from ``jax.grad`` (see ``ldjax.G``); the closed forms of
PAPER.md §3 are what the tests check it against.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log π(y_t) per position: ``(N, T, V), (N, T) -> (N, T)`` (or ``(N, V), (N,) -> (N,)``)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_logprob(logits: jax.Array, targets: jax.Array,
                     mask: Optional[jax.Array] = None) -> jax.Array:
  """Sequence log-probability ``Σ_t mask_t log π(y_t)``: ``(N, T, V) -> (N,)``.

  Classifier logits ``(N, V)`` with targets ``(N,)`` give ``log π(y)`` per example.
  """
  lp = token_logprobs(logits, targets)
  if lp.ndim == 1:
    return lp if mask is None else lp * mask
  if mask is not None:
    lp = lp * mask.astype(lp.dtype)
  return jnp.sum(lp, axis=-1)


def sft(logits: jax.Array, targets: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """SFT / cross-entropy: ``−Σ_l log π(y⁺_l)``, per example ``(N,)``. G = π⁺ − y⁺."""
  return -sequence_logprob(logits, targets, mask)


def _margins(logits_pos, logits_neg, targets_pos, targets_neg, mask_pos, mask_neg,
             ref_logp_pos, ref_logp_neg):
  r_pos = sequence_logprob(logits_pos, targets_pos, mask_pos) - ref_logp_pos
  r_neg = sequence_logprob(logits_neg, targets_neg, mask_neg) - ref_logp_neg
  return r_pos, r_neg


def dpo(logits_pos, logits_neg, *, targets_pos, targets_neg, ref_logp_pos, ref_logp_neg,
        mask_pos=None, mask_neg=None, beta: float = 0.1) -> jax.Array:
  """DPO: ``−log σ(β(r⁺ − r⁻))``, ``(N,)``.

  G⁺ = β(1−a)(π⁺ − y⁺), G⁻ = −β(1−a)(π⁻ − y⁻), a = σ(β(r⁺ − r⁻)).
  """
  r_pos, r_neg = _margins(logits_pos, logits_neg, targets_pos, targets_neg, mask_pos, mask_neg,
                          ref_logp_pos, ref_logp_neg)
  return -jax.nn.log_sigmoid(beta * (r_pos - r_neg))


def ipo(logits_pos, logits_neg, *, targets_pos, targets_neg, ref_logp_pos, ref_logp_neg,
        mask_pos=None, mask_neg=None, beta: float = 0.1) -> jax.Array:
  """IPO: ``(r⁺ − r⁻ − 1/(2β))²``, ``(N,)``. G⁺ = 2(1/(2β) − h)(π⁺ − y⁺), h = r⁺ − r⁻."""
  r_pos, r_neg = _margins(logits_pos, logits_neg, targets_pos, targets_neg, mask_pos, mask_neg,
                          ref_logp_pos, ref_logp_neg)
  return (r_pos - r_neg - 1.0 / (2.0 * beta)) ** 2


def slic(logits_pos, logits_neg, *, targets_pos, targets_neg, mask_pos=None, mask_neg=None,
         delta: float = 1.0, lam: float = 0.0, **unused_ref) -> jax.Array:
  """SLiC-HF: ``max(0, δ − (log π(y⁺) − log π(y⁻))) + λ·SFT(y_ref)``, ``(N,)``.

  The regulariser's target y_ref is the chosen response y⁺ (SLiC-HF's SFT target), so
  G⁺ = (𝟙[active] + λ)(π⁺ − y⁺) and G⁻ = −𝟙[active](π⁻ − y⁻). No reference model enters
  (``ref_logp_*`` are accepted and ignored so every DPO-family loss takes the same arguments).
  """
  lp_pos = sequence_logprob(logits_pos, targets_pos, mask_pos)
  lp_neg = sequence_logprob(logits_neg, targets_neg, mask_neg)
  return jnp.maximum(0.0, delta - (lp_pos - lp_neg)) - lam * lp_pos


def sppo(logits_pos, logits_neg, *, targets_pos, targets_neg, ref_logp_pos, ref_logp_neg,
         mask_pos=None, mask_neg=None, beta: float = 0.1, c: Optional[float] = None) -> jax.Array:
  """SPPO (hard labels): ``(r⁺ − c/2)² + (r⁻ + c/2)²`` with ``c = 1/β`` by default, ``(N,)``.

  G⁺ = 2(c/2 − r⁺)(π⁺ − y⁺), G⁻ = −2(r⁻ + c/2)(π⁻ − y⁻) (PAPER.md §3).
  """
  c = 1.0 / beta if c is None else c
  r_pos, r_neg = _margins(logits_pos, logits_neg, targets_pos, targets_neg, mask_pos, mask_neg,
                          ref_logp_pos, ref_logp_neg)
  return (r_pos - c / 2.0) ** 2 + (r_neg + c / 2.0) ** 2


PAIRWISE = {"dpo": dpo, "ipo": ipo, "slic": slic, "sppo": sppo}
"""The DPO family: losses of a (y⁺, y⁻) pair, two logits arguments each."""
