"""K·v without K: one VJP on x_u and one JVP on x_o (Ren & Sutherland, arXiv 2407.10490, §2:
the "cheap form" of Proposition 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ldjax._src import validate
from ldjax._src.trainable import trainable_fn


def _scaled(direction, pre):
    if pre is None:
        return direction
    return jax.tree_util.tree_map(lambda d, q: d * q.astype(d.dtype), direction, pre)


def kernel_vector_product(apply_fn, variables, x_o, x_u, v, pre=None):
    """``J_o diag(pre) J_uᵀ v`` (``pre`` None: the identity), unvalidated and jit-able."""
    f, params = trainable_fn(apply_fn, variables)
    _, vjp_u = jax.vjp(lambda p: f(p, x_u), params)
    (direction,) = vjp_u(v.astype(jax.eval_shape(f, params, x_u).dtype))
    _, kv = jax.jvp(lambda p: f(p, x_o), (params,), (_scaled(direction, pre),))
    return kv


def kernel_vector_product_shared(apply_fn, variables, x, v, pre=None):
    """x_o is x_u: one linearisation serves both sides, so the forward pass runs once
    (the VJP is the transpose of the JVP), not once per side as in :func:`kernel_vector_product`."""
    f, params = trainable_fn(apply_fn, variables)
    out, jvp = jax.linearize(lambda p: f(p, x), params)
    (direction,) = jax.linear_transpose(jvp, params)(v.astype(out.dtype))
    return jvp(_scaled(direction, pre))


_kv_jit = jax.jit(kernel_vector_product, static_argnums=0)
_kv_shared_jit = jax.jit(kernel_vector_product_shared, static_argnums=0)


def entk_vp(
    apply_fn: Callable, params: Any, x_o: Any, x_u: Any, v: jax.Array, *, preconditioner: Any = None
) -> jax.Array:
    """``Σ_u K(x_o, x_u) v_u = J_o (J_uᵀ v)``, never building K (with ``preconditioner`` p:
    ``J_o diag(p) J_uᵀ v``, the K_P·v of an optimizer's elementwise preconditioner).

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, V)`` or ``(N, T, V)`` logits.
      params: parameters (for flax variables only the ``params`` collection is differentiated).
      x_o: observed inputs, batch ``N_o``.
      x_u: updated inputs, batch ``N_u``.
      v: ``(N_u, V)`` or ``(N_u, T, V)``, e.g. the residual G (masked positions zero).
    Returns:
      ``(N_o, V)`` or ``(N_o, T, V)``: ``J_o J_uᵀ v`` summed over u and the positions of u.
    Raises:
      ValueError: ``v`` not shaped like the logits of x_u; integer or non-finite params;
        non-finite inputs, ``v`` or result (naming the cause where it can).

    Cost: one forward and backward pass on x_u plus a JVP (≈ two forward passes) on x_o. When
    ``x_u is x_o`` the forward pass is shared (``jax.linearize`` once, its transpose for the VJP),
    which makes K·G about as cheap as the optax step it predicts (``benchmarks/RESULTS.md``).

    Examples:
      >>> import jax.numpy as jnp, ldjax
      >>> apply_fn = lambda p, x: x @ p["w"]             # K = ⟨x_o, x_u⟩ I
      >>> params = {"w": jnp.ones((2, 3))}
      >>> x_o, x_u = jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 0.0]])
      >>> v = jnp.array([[1.0, -1.0, 0.5]])
      >>> ldjax.entk_vp(apply_fn, params, x_o, x_u, v).tolist()   # 2 · v
      [[2.0, -2.0, 1.0]]
    """
    f, p = trainable_fn(apply_fn, params)
    validate.check_params(p)
    shape_u = validate.logits_shape(apply_fn, params, x_u, "x_u")
    validate.logits_shape(apply_fn, params, x_o, "x_o")
    if tuple(jnp.shape(v)) != shape_u:
        raise ValueError(
            f"v has shape {tuple(jnp.shape(v))}; expected {shape_u}, the logits of x_u"
        )
    validate.check_finite(v, "v")
    pre = None if preconditioner is None else validate.check_preconditioner(preconditioner, p)[0]
    validate.check_finite_tree(p, "params")
    validate.check_finite_tree(x_o, "x_o")
    if x_u is not x_o:
        validate.check_finite_tree(x_u, "x_u")
    if x_u is x_o:
        kv = _kv_shared_jit(apply_fn, params, x_o, jnp.asarray(v), pre)
    else:
        kv = _kv_jit(apply_fn, params, x_o, x_u, jnp.asarray(v), pre)
    validate.check_finite(
        kv, "K·v", lambda: validate.non_finite_cause({"params": p, "x_o": x_o, "x_u": x_u})
    )
    return kv
