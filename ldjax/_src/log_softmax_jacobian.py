"""A(x_o) = I − 1πᵀ: the Jacobian of log-softmax with respect to the logits (arXiv 2407.10490,
§2, Proposition 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def A(logits: jax.Array) -> jax.Array:
    """The softmax Jacobian of log π, ``I − 1πᵀ``.

    Args:
      logits: ``(..., V)`` logits z.
    Returns:
      ``(..., V, V)`` with ``A[..., i, j] = δ_ij − π_j``.

    Examples:
      >>> import jax.numpy as jnp, ldjax
      >>> ldjax.A(jnp.zeros(2)).tolist()                 # π = (1/2, 1/2)
      [[0.5, -0.5], [-0.5, 0.5]]
    """
    pi = jax.nn.softmax(logits, axis=-1)
    eye = jnp.eye(logits.shape[-1], dtype=pi.dtype)
    return eye - pi[..., None, :]


def apply_A(logits: jax.Array, v: jax.Array) -> jax.Array:
    """``A v`` without building A: ``(A v)_i = v_i − πᵀv``. Shapes ``(..., V)`` -> ``(..., V)``.

    Examples:
      >>> import jax.numpy as jnp, ldjax
      >>> ldjax.apply_A(jnp.zeros(2), jnp.array([1.0, 3.0])).tolist()   # v − πᵀv
      [-1.0, 1.0]
    """
    pi = jax.nn.softmax(logits, axis=-1)
    return v - jnp.sum(pi * v, axis=-1, keepdims=True)


def A_norm(logits: jax.Array) -> jax.Array:
    """Peakiness ``‖A‖_F = sqrt(V − 2 + V‖π‖²)``, ``(..., V)`` -> ``(...)``.

    Examples:
      >>> import jax.numpy as jnp, ldjax
      >>> round(float(ldjax.A_norm(jnp.zeros(4))), 4)        # uniform: sqrt(V − 1)
      1.7321
      >>> round(float(ldjax.A_norm(jnp.array([50.0, 0, 0, 0]))), 4)   # one-hot: sqrt(2V − 2)
      2.4495
    """
    pi = jax.nn.softmax(logits, axis=-1)
    v = logits.shape[-1]
    return jnp.sqrt(v - 2 + v * jnp.sum(pi * pi, axis=-1))
