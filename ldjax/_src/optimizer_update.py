"""The update an optax optimizer makes from a gradient, split into its causes.

A step of ``tx`` (any optax ``GradientTransformation``) at parameters θ and state s moves θ by
``Δθ = U(g) = tx.update(g, s, θ)`` for the batch's gradient ``g = Σ_b g_b`` (one part per branch of
the loss: y⁺ and y⁻ for the DPO family). Three parts make it up:

* the carry-over ``U(0)``: what the state moves whatever the batch — momentum from earlier
  gradients, decoupled weight decay, Adam's first moment; not the batch's doing;
* the preconditioned gradient ``L g_b`` per branch, with ``L = ∂U/∂g`` at ``g = 0``, the optimizer
  linearised at its state: for an elementwise optimizer ``L = −diag(p)`` and the step's effect on
  the logits is ``−K_P G`` with the eNTK ``K_P = J_o diag(p) J_uᵀ`` that the optimizer induces;
* the remainder ``U(g) − U(0) − L g``: zero for optimizers linear in the current gradient.

**Which optimizers are linear in the current gradient** (remainder exactly zero): SGD with any
schedule, heavy-ball and Nesterov momentum (``optax.sgd(..., momentum, nesterov)``), coupled weight
decay (``optax.add_decayed_weights`` before the gradient transform), decoupled weight decay with
SGD, and chains of these. **Not linear:** Adam, AdamW, RMSprop (their second moment includes g²),
gradient clipping (``clip_by_global_norm`` once it clips), sign and normalising optimizers (Lion,
LAMB's trust ratio). For those the exact update is still predicted (``J_o U(g)``, first order in
the update), and the remainder says how far the linearised-at-state kernel prediction is from it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["update_parts", "preconditioner"]


def _zeros_like(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def _update(optimizer, opt_state, params):
    return lambda g: optimizer.update(g, opt_state, params)[0]


def update_parts(
    optimizer: optax.GradientTransformation, opt_state: Any, params: Any, grads: tuple
) -> tuple:
    """The optimizer's update split into its causes (module docstring).

    Args:
      optimizer: any optax ``GradientTransformation``.
      opt_state: its state before the step.
      params: the trainable parameters θ before the step.
      grads: one gradient pytree per branch of the loss, ``g = Σ_b g_b``.
    Returns:
      ``(terms, carry, exact)``: ``terms`` one pytree ``L g_b`` per branch, ``carry = U(0)``,
      ``exact = U(g)`` (the real update). ``exact − carry − Σ terms`` is the remainder.
    """
    u = _update(optimizer, opt_state, params)
    zeros = _zeros_like(params)
    total = jax.tree_util.tree_map(lambda *g: sum(g[1:], g[0]), *grads)
    carry, lin = jax.linearize(u, zeros)
    terms = tuple(_finite(lin(g)) for g in grads)
    return terms, carry, u(total)


def _finite(tree):
    """Zero where the linearisation is not defined: an update not differentiable at ``g = 0``
    (RMSprop's and Adam's ``√v`` at a coordinate whose second moment is still 0) has no linear part
    there; the remainder then carries that coordinate's whole update."""
    return jax.tree_util.tree_map(lambda a: jnp.where(jnp.isfinite(a), a, jnp.zeros_like(a)), tree)


def preconditioner(
    optimizer: optax.GradientTransformation,
    opt_state: Any,
    params: Any,
    *,
    check: bool = True,
    seed: int = 0,
) -> Any:
    """The elementwise preconditioner p of the optimizer linearised at its state: ``L g = −p ⊙ g``.

    ``p = −L(1)`` (a JVP of the update at ``g = 0`` along a vector of ones). For SGD at rate η,
    ``p = η``; for Adam, ``p = η (1 − β₁)/(1 − β₁ᵗ) / (√v̂ + ε)`` with ``v̂`` from the state.

    Args:
      check: verify that ``L`` is elementwise (``L r = −p ⊙ r`` for a random r); a ValueError
        otherwise (e.g. a trust-ratio or normalising optimizer): use the exact update instead.
        Coordinates where the update is not differentiable at ``g = 0`` (a second moment still 0)
        get ``p = 0``.
    Returns:
      A pytree like ``params``.
    """
    _, lin = jax.linearize(_update(optimizer, opt_state, params), _zeros_like(params))
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    p = jax.tree_util.tree_map(jnp.negative, _finite(lin(ones)))
    if check:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        rng = np.random.default_rng(seed)
        r = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(rng.normal(size=np.shape(x)), jnp.result_type(x)) for x in leaves]
        )
        got = _finite(lin(r))
        want = jax.tree_util.tree_map(lambda a, b: -a * b, p, r)
        for k, (a, b) in enumerate(
            zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
        ):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            scale = max(np.abs(b).max(), 1e-30)
            if np.abs(a - b).max() > 1e-4 * scale:
                raise ValueError(
                    f"the optimizer is not elementwise at this state (parameter leaf {k}: its "
                    "linearised update mixes coordinates); it has no diagonal preconditioner: use "
                    "decompose(..., optimizer=...) with the exact update instead"
                )
    return p
