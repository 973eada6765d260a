"""K·v without K: one VJP on x_u and one JVP on x_o (PAPER.md §1, "cheap form")."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ldjax import _validate
from ldjax.trainable import trainable_fn


def _kv(apply_fn, variables, x_o, x_u, v):
  f, params = trainable_fn(apply_fn, variables)
  _, vjp_u = jax.vjp(lambda p: f(p, x_u), params)
  (direction,) = vjp_u(v.astype(jax.eval_shape(f, params, x_u).dtype))
  _, kv = jax.jvp(lambda p: f(p, x_o), (params,), (direction,))
  return kv


def _kv_shared(apply_fn, variables, x, v):
  """x_o is x_u: one linearisation serves both sides, so the forward pass runs once
  (the VJP is the transpose of the JVP), not once per side as in :func:`_kv`."""
  f, params = trainable_fn(apply_fn, variables)
  out, jvp = jax.linearize(lambda p: f(p, x), params)
  (direction,) = jax.linear_transpose(jvp, params)(v.astype(out.dtype))
  return jvp(direction)


_kv_jit = jax.jit(_kv, static_argnums=0)
_kv_shared_jit = jax.jit(_kv_shared, static_argnums=0)


def entk_vp(apply_fn: Callable, params: Any, x_o: Any, x_u: Any, v: jax.Array) -> jax.Array:
  """``Σ_u K(x_o, x_u) v_u = J_o (J_uᵀ v)``, never building K.

  Args:
    apply_fn: ``apply_fn(params, x) -> (N, V)`` or ``(N, T, V)`` logits.
    params: parameters (for flax variables only the ``params`` collection is differentiated).
    x_o: observed inputs, batch ``N_o``.
    x_u: updated inputs, batch ``N_u``.
    v: ``(N_u, V)`` or ``(N_u, T, V)``, e.g. the residual G (masked positions zero).
  Returns:
    ``(N_o, V)`` or ``(N_o, T, V)``: ``J_o J_uᵀ v`` summed over u and the positions of u.

  Cost: one forward and backward pass on x_u plus a JVP (≈ two forward passes) on x_o. When
  ``x_u is x_o`` the forward pass is shared (``jax.linearize`` once, its transpose for the VJP),
  which makes K·G about as cheap as the optax step it predicts (``benchmarks/RESULTS.md``).
  """
  f, p = trainable_fn(apply_fn, params)
  shape_u = _validate.logits_shape(apply_fn, params, x_u, "x_u")
  _validate.logits_shape(apply_fn, params, x_o, "x_o")
  if tuple(jnp.shape(v)) != shape_u:
    raise ValueError(f"v has shape {tuple(jnp.shape(v))}; expected {shape_u}, the logits of x_u")
  _validate.check_finite(v, "v")
  if x_u is x_o:
    return _kv_shared_jit(apply_fn, params, x_o, jnp.asarray(v))
  return _kv_jit(apply_fn, params, x_o, x_u, jnp.asarray(v))
