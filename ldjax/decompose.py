"""The one-step decomposition Δlog π(x_o) = −η A(x_o) Σ_b K(x_o, x_b) G_b (PAPER.md §1–3)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ldjax import _validate
from ldjax.ntk import entk
from ldjax.residual import G as residual
from ldjax.softmax_jacobian import A as softmax_jacobian
from ldjax.softmax_jacobian import apply_A
from ldjax.trainable import trainable_fn
from ldjax.vector_products import _kv


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["logits", "G", "delta_logits_terms", "loss_u"],
                   meta_fields=["eta"])
@dataclasses.dataclass(frozen=True)
class Decomposition:
  """Predicted one-step change on x_o.

  Attributes:
    logits: ``(N_o, [T,] V)`` z(x_o) before the step.
    G: one residual ``(N_u, [T,] V)`` per branch of the loss (DPO family: ``(G⁺, G⁻)``).
    delta_logits_terms: ``−η K(x_o, x_b) G_b`` per branch, ``(N_o, [T,] V)`` each.
    loss_u: ``(N_u,)`` the loss on x_u before the step.
    eta: the step size η.
  """
  logits: jax.Array
  G: tuple
  delta_logits_terms: tuple
  loss_u: jax.Array
  eta: float

  @property
  def delta_logits(self) -> jax.Array:
    """Predicted Δz(x_o) = −η Σ_b K G_b, ``(N_o, [T,] V)``."""
    return sum(self.delta_logits_terms[1:], self.delta_logits_terms[0])

  @property
  def A(self) -> jax.Array:
    """A(x_o) = I − 1πᵀ, ``(N_o, [T,] V, V)``."""
    return softmax_jacobian(self.logits)

  @property
  def delta_logp_linear_terms(self) -> tuple:
    """Per branch ``A·(−η K G_b)``; for DPO the y⁺ and y⁻ terms apart."""
    return tuple(apply_A(self.logits, t) for t in self.delta_logits_terms)

  @property
  def delta_logp_linear(self) -> jax.Array:
    """Linear prediction ``A·Δz``, ``(N_o, [T,] V)``."""
    return apply_A(self.logits, self.delta_logits)

  @property
  def delta_logp_exact(self) -> jax.Array:
    """``log_softmax(z + Δz) − log_softmax(z)``: no linearisation of A."""
    return (jax.nn.log_softmax(self.logits + self.delta_logits, axis=-1)
            - jax.nn.log_softmax(self.logits, axis=-1))


def _branches(x_u):
  return tuple(x_u) if isinstance(x_u, (tuple, list)) else (x_u,)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(apply_fn, n_branches, variables, x_o, xs):
  f, p = trainable_fn(apply_fn, variables)
  return f(p, x_o), tuple(f(p, x) for x in xs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predict_vp(apply_fn, loss_fn, variables, x_o, xs, logits_u, eta, loss_kwargs):
  g = residual(loss_fn, *logits_u, **loss_kwargs)
  g = g if isinstance(g, tuple) else (g,)
  terms = tuple(-eta * _kv(apply_fn, variables, x_o, x, gb) for x, gb in zip(xs, g))
  return g, terms, loss_fn(*logits_u, **loss_kwargs)


def decompose(apply_fn: Callable, params: Any, x_o: Any, x_u: Any, loss_fn: Callable, *,
              eta: float, loss_kwargs: Optional[dict] = None, method: str = "vp",
              implementation: str = "auto") -> Decomposition:
  """Predicts the change of z(x_o) and log π(x_o) after one SGD step on the loss at x_u.

  Args:
    apply_fn: ``apply_fn(params, x) -> (N, V)`` or ``(N, T, V)`` logits.
    params: parameters (flax variables: only ``params`` is trained).
    x_o: observed inputs, batch ``N_o``.
    x_u: the updated inputs: one batch, or a tuple of batches, one per logits argument of
      ``loss_fn`` (DPO family: ``(x⁺, x⁻)``, the prompt joined with y⁺ and with y⁻).
    loss_fn: ``loss_fn(*logits, **loss_kwargs) -> (N_u,)``, e.g. ``ldjax.losses.dpo``. The step
      is on the summed loss, ``Δθ = −η ∇θ Σ_n L_n``.
    eta: learning rate η > 0.
    loss_kwargs: targets, masks, reference log-probs, β ... for ``loss_fn``.
    method: ``"vp"`` (one VJP + one JVP per branch, no K) or ``"blocks"`` (exact K blocks from
      :func:`ldjax.entk` contracted with G; same numbers, for analysis).
    implementation: the ``entk`` implementation for ``method="blocks"``.
  Returns:
    A :class:`Decomposition`.
  """
  eta = _validate.check_eta(eta)
  if method not in ("vp", "blocks"):
    raise ValueError(f"method must be 'vp' or 'blocks', got {method!r}")
  xs = _branches(x_u)
  f, p = trainable_fn(apply_fn, params)
  _validate.logits_shape(apply_fn, params, x_o, "x_o")
  shapes = [_validate.logits_shape(apply_fn, params, x, f"x_u[{k}]") for k, x in enumerate(xs)]
  kw = dict(loss_kwargs or {})
  logits_o, logits_u = _forward(apply_fn, len(xs), params, x_o, xs)
  _validate.check_finite(logits_o, "logits of x_o")
  for k, z in enumerate(logits_u):
    _validate.check_finite(z, f"logits of x_u[{k}]")
  if method == "vp":
    g, terms, loss = _predict_vp(apply_fn, loss_fn, params, x_o, xs, logits_u, eta, kw)
  else:
    g = residual(loss_fn, *logits_u, **kw)
    g = g if isinstance(g, tuple) else (g,)
    terms = []
    for x, gb, shape in zip(xs, g, shapes):
      K = entk(apply_fn, params, x_o, x, implementation=implementation)
      spec = "oumlij,ulj->omi" if len(shape) == 3 else "ouij,uj->oi"
      terms.append(-eta * jnp.einsum(spec, K, gb))
    terms = tuple(terms)
    loss = loss_fn(*logits_u, **kw)
  return Decomposition(logits_o, tuple(g), tuple(terms), loss, eta)
