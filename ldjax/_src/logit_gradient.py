"""G = ∇_z L: the loss's gradient on the logits (the paper's "residual"), by autodiff only."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldjax._src import validate


def G(loss_fn: Callable[..., jax.Array], *logits: jax.Array, **loss_kwargs):
    """The residual ``G = ∂(Σ_n L_n)/∂z`` at the given logits.

    Args:
      loss_fn: ``loss_fn(*logits, **loss_kwargs) -> (N,)`` per-example losses (``ldjax.losses``).
      *logits: one ``(N, [T,] V)`` logits array per branch (SFT: one; DPO family: z⁺, z⁻).
      **loss_kwargs: targets, masks, reference log-probs, β, ...
    Returns:
      An array shaped like ``logits[0]`` for one branch, else a tuple with one G per branch
      (for the DPO family ``(G⁺, G⁻)``, G⁻ carrying the negative gradient's sign).
    Raises:
      ValueError: non-finite logits, or loss arguments that do not fit the logits
        (``ldjax._src.validate.check_loss_call``: targets, masks, reference log-probs, β, ...).

    Examples:
      >>> import jax.numpy as jnp, ldjax
      >>> z = jnp.zeros((1, 3))
      >>> [round(g, 4) for g in ldjax.G(ldjax.losses.sft, z, targets=jnp.array([0]))[0].tolist()]
      [-0.6667, 0.3333, 0.3333]
    """
    if not logits:
        raise ValueError("G needs at least one logits array")
    names = tuple(f"logits[{k}]" for k in range(len(logits)))
    for z, name in zip(logits, names):
        validate.check_finite(z, name)
    validate.check_loss_call(loss_fn, logits, loss_kwargs, names)
    total = lambda *z: jnp.sum(loss_fn(*z, **loss_kwargs))
    grads = jax.grad(total, argnums=tuple(range(len(logits))))(*logits)
    return grads[0] if len(logits) == 1 else tuple(grads)
