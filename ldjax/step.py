"""The actual one-step change, and how the prediction's two error sources compare to it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldjax import _validate
from ldjax.decompose import Decomposition, _branches
from ldjax.softmax_jacobian import apply_A
from ldjax.trainable import split_trainable


@dataclasses.dataclass(frozen=True)
class ActualStep:
  """One real optimizer step on x_u, observed on x_o.

  Attributes:
    params: the variables after the step (same structure as given).
    logits: ``(N_o, [T,] V)`` z(x_o) before. logits_after: after.
    loss_u: ``(N_u,)`` loss on x_u before the step.
  """
  params: Any
  logits: jax.Array
  logits_after: jax.Array
  loss_u: jax.Array

  @property
  def delta_logits(self) -> jax.Array:
    """Actual Δz(x_o), ``(N_o, [T,] V)``."""
    return self.logits_after - self.logits

  @property
  def delta_logp(self) -> jax.Array:
    """Actual Δlog π(x_o), ``(N_o, [T,] V)``."""
    return (jax.nn.log_softmax(self.logits_after, axis=-1)
            - jax.nn.log_softmax(self.logits, axis=-1))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step(apply_fn, loss_fn, optimizer, variables, x_o, xs, loss_kwargs, eta):
  params, merge = split_trainable(variables)
  if optimizer is None:   # plain SGD with a traced step size: one compilation for every η
    optimizer = optax.sgd(eta)

  def total(p):
    v = merge(p)
    losses = loss_fn(*(apply_fn(v, x) for x in xs), **loss_kwargs)
    return jnp.sum(losses), losses

  (_, losses), grads = jax.value_and_grad(total, has_aux=True)(params)
  state = optimizer.init(params)
  updates, _ = optimizer.update(grads, state, params)
  new = merge(optax.apply_updates(params, updates))
  return new, apply_fn(variables, x_o), apply_fn(new, x_o), losses


def actual_step(apply_fn: Callable, params: Any, x_o: Any, x_u: Any, loss_fn: Callable, *,
                eta: Optional[float] = None,
                optimizer: Optional[optax.GradientTransformation] = None,
                loss_kwargs: Optional[dict] = None) -> ActualStep:
  """Takes one optimizer step on ``Σ_n loss_fn(...)_n`` at x_u and re-evaluates x_o.

  ``optimizer`` defaults to ``optax.sgd(eta)`` (the step the decomposition predicts); any optax
  GradientTransformation is allowed (its state starts fresh: this is the first step).
  """
  if optimizer is None and eta is None:
    raise ValueError("actual_step needs eta (for optax.sgd) or an optimizer")
  eta = None if eta is None else _validate.check_eta(eta)
  xs = _branches(x_u)
  new, before, after, losses = _step(apply_fn, loss_fn, optimizer, params, x_o, xs,
                                     dict(loss_kwargs or {}), eta)
  _validate.check_finite(before, "logits of x_o")
  _validate.check_finite(after, "logits of x_o after the step")
  return ActualStep(new, before, after, losses)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Relative errors (‖·‖ over the selected entries) of the prediction against the actual step.

  Attributes:
    entk_step: ``‖Δz_actual − (−ηKG)‖ / ‖Δz_actual‖`` — the eNTK step's error, O(η²).
    linearisation: ``‖A·Δz_actual − Δlog π_actual‖ / ‖Δlog π_actual‖`` — the error of
      linearising log-softmax alone (it uses the actual Δz, so the two sources stay apart).
    linear: ``‖A·Δz_pred − Δlog π_actual‖ / ‖Δlog π_actual‖`` — both together.
    exact: ``‖(log_softmax(z+Δz_pred) − log_softmax(z)) − Δlog π_actual‖ / ‖Δlog π_actual‖``.
    sign_agreement: fraction of entries where predicted and actual Δlog π agree in sign.
  """
  entk_step: float
  linearisation: float
  linear: float
  exact: float
  sign_agreement: float


def _rel(a, b, w):
  num = np.sqrt(np.sum(w * (a - b) ** 2))
  den = np.sqrt(np.sum(w * b ** 2))
  return float(num / den) if den > 0 else float(num)


def compare(predicted: Decomposition, actual: ActualStep, mask: Optional[Any] = None) -> Comparison:
  """Splits the prediction's error into the eNTK step and the linearisation of A.

  ``mask`` (``(N_o,)`` or ``(N_o, T)``, optional) restricts the norms to selected examples or
  positions (e.g. response tokens).
  """
  if np.shape(predicted.logits) != np.shape(actual.logits):
    raise ValueError(f"predicted logits {np.shape(predicted.logits)} and actual logits "
                     f"{np.shape(actual.logits)} differ: not the same x_o")
  dz_a = np.asarray(actual.delta_logits, np.float64)
  dz_p = np.asarray(predicted.delta_logits, np.float64)
  dl_a = np.asarray(actual.delta_logp, np.float64)
  lin_a = np.asarray(apply_A(actual.logits, actual.delta_logits), np.float64)
  lin_p = np.asarray(predicted.delta_logp_linear, np.float64)
  ex_p = np.asarray(predicted.delta_logp_exact, np.float64)
  w = np.ones(dz_a.shape[:-1] + (1,))
  if mask is not None:
    m = np.asarray(mask, np.float64)
    if m.shape != dz_a.shape[:m.ndim] or m.ndim >= dz_a.ndim:
      raise ValueError(f"mask of shape {m.shape} does not fit logits of shape {dz_a.shape}")
    w = w * m.reshape(m.shape + (1,) * (dz_a.ndim - m.ndim))
  sel = np.broadcast_to(w, dz_a.shape) > 0
  agree = float(np.mean(np.sign(lin_p[sel]) == np.sign(dl_a[sel])))
  return Comparison(_rel(dz_p, dz_a, w), _rel(lin_a, dl_a, w), _rel(lin_p, dl_a, w),
                    _rel(ex_p, dl_a, w), agree)
