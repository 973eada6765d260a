"""G = ∇_z L: the loss's gradient on the logits (the paper's "residual"), by autodiff only."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ldjax import _validate


def G(loss_fn: Callable[..., jax.Array], *logits: jax.Array, **loss_kwargs):
  """The residual ``G = ∂(Σ_n L_n)/∂z`` at the given logits.

  Args:
    loss_fn: ``loss_fn(*logits, **loss_kwargs) -> (N,)`` per-example losses (``ldjax.losses``).
    *logits: one ``(N, [T,] V)`` logits array per branch (SFT: one; DPO family: z⁺, z⁻).
    **loss_kwargs: targets, masks, reference log-probs, β, ...
  Returns:
    An array shaped like ``logits[0]`` for one branch, else a tuple with one G per branch
    (for the DPO family ``(G⁺, G⁻)``, G⁻ carrying the negative gradient's sign).
  """
  if not logits:
    raise ValueError("G needs at least one logits array")
  for k, z in enumerate(logits):
    _validate.check_finite(z, f"logits[{k}]")
  total = lambda *z: jnp.sum(loss_fn(*z, **loss_kwargs))
  grads = jax.grad(total, argnums=tuple(range(len(logits))))(*logits)
  return grads[0] if len(logits) == 1 else tuple(grads)
