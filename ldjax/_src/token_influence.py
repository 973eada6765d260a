"""Token-level influence maps: which positions of a training sequence move which tokens of a probe.

The decomposition is per token (Ren & Sutherland, arXiv 2407.10490, §3.1): for a probe x_o with
target tokens y_o and a step on x_u,

    Δ log π(y_{o,m} | x_o) = Σ_l −η [A_m K_{m,l}(x_o, x_u) G_l(x_u)]_{y_{o,m}} + O(η²).

:func:`token_influence` returns every term of that sum, ``C[o, u, m, l]``: the part of the linear
prediction at probe position m that position l of training sequence u causes. It never forms a
V × V block: with ``r_{o,m} = ∇θ log π(y_{o,m} | x_o)`` (the readout's gradient, one VJP per probe
position, which folds ``A_m`` in) and ``g_{u,l} = J_{u,l}ᵀ G_{u,l}`` (the gradient that position l
of u contributes to the step, one VJP per training position),

    C[o, u, m, l] = −η ⟨r_{o,m}, g_{u,l}⟩,

one matrix product of ``(N_o T_o, P)`` by ``(P, N_u T_u)``. Cost: ``N_o T_o + N_u T_u`` backward
passes and ``N_o T_o N_u T_u P`` multiply-adds; memory ``(N_o T_o + N_u T_u) P`` floats, bounded by
chunking over examples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ldjax._src import validate
from ldjax._src.logit_gradient import G as logit_gradient
from ldjax._src.trainable import branches, trainable_fn

__all__ = ["token_influence"]


def _readout_rows(f, theta, x1, y1, m1):
    """``(T, P)``: the gradient of ``mask_m log π(y_m)`` at every position m of one sequence."""

    def picked(th):
        lp = jax.nn.log_softmax(f(th, x1[None])[0], axis=-1)
        v = jnp.take_along_axis(lp, y1[:, None].astype(jnp.int32), axis=-1)[:, 0]
        return v * m1.astype(v.dtype)

    out, vjp = jax.vjp(picked, theta)
    basis = jnp.eye(out.shape[0], dtype=out.dtype)
    return jax.vmap(lambda c: ravel_pytree(vjp(c)[0])[0])(basis)


def _position_grads(f, theta, x1, g1):
    """``(T, P)``: the gradient ``J_lᵀ G_l`` that each position l of one training sequence adds."""
    _, vjp = jax.vjp(lambda th: f(th, x1[None])[0], theta)
    t = g1.shape[0]

    def one(l):
        ct = jnp.zeros_like(g1).at[l].set(g1[l])
        return ravel_pytree(vjp(ct.astype(g1.dtype))[0])[0]

    return jax.vmap(one)(jnp.arange(t))


@functools.partial(jax.jit, static_argnums=(0,))
def _rows_o(apply_fn, variables, x_o, y_o, m_o):
    f, theta = trainable_fn(apply_fn, variables)
    return jax.vmap(lambda x1, y1, m1: _readout_rows(f, theta, x1, y1, m1))(x_o, y_o, m_o)


@functools.partial(jax.jit, static_argnums=(0,))
def _rows_u(apply_fn, variables, x_u, g_u):
    f, theta = trainable_fn(apply_fn, variables)
    return jax.vmap(lambda x1, g1: _position_grads(f, theta, x1, g1))(x_u, g_u)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward_and_G(apply_fn, loss_fn, variables, xs, loss_kwargs):
    f, theta = trainable_fn(apply_fn, variables)
    logits = tuple(f(theta, x) for x in xs)
    g = logit_gradient(loss_fn, *logits, **loss_kwargs)
    return g if isinstance(g, tuple) else (g,)


def token_influence(
    apply_fn: Callable,
    params: Any,
    x_o: Any,
    x_u: Any,
    loss_fn: Callable,
    *,
    eta: float,
    targets_o: Any,
    mask_o: Any = None,
    loss_kwargs: dict | None = None,
    chunk_size: int = 8,
):
    """Every term ``C[o, u, m, l]`` of the per-token decomposition (module docstring).

    Args:
      apply_fn: ``apply_fn(params, tokens (N, T)) -> logits (N, T, V)``.
      params: parameters (flax variables: only ``params`` is differentiated).
      x_o: probe sequences ``(N_o, T_o)``; ``targets_o (N_o, T_o)`` the token each position
        predicts, ``mask_o`` where to read (default everywhere).
      x_u: training sequences ``(N_u, T_u)``, or the DPO family's pair ``(x⁺, x⁻)``.
      loss_fn, loss_kwargs: the training loss (``ldjax.losses``); its own mask zeroes G at positions
        it does not train.
      eta: the SGD step size η > 0.
      chunk_size: sequences per chunk of the row computations (memory).
    Returns:
      ``C (N_o, N_u, T_o, T_u)``; for the DPO family a tuple ``(C⁺, C⁻)``, one map per branch.
      Summed over u and l, ``C[o, :, m, :]`` is :func:`ldjax.decompose`'s ``delta_logp_linear`` at
      ``(o, m, targets_o[o, m])`` (zero where ``mask_o`` is False).

    Examples:
      >>> import jax.numpy as jnp, numpy as np, ldjax
      >>> from ldjax import zoo
      >>> p = zoo.transformer_init(jax.random.PRNGKey(0), vocab=11, d_model=8, n_heads=2,
      ...                          n_layers=1, max_len=5)
      >>> f = lambda q, x: zoo.transformer_apply(q, x, n_heads=2)
      >>> x = jnp.array([[1, 2, 3, 4, 5]]); y = jnp.array([[2, 3, 4, 5, 6]])
      >>> C = ldjax.token_influence(f, p, x, x, ldjax.losses.sft, eta=0.1, targets_o=y,
      ...                           loss_kwargs=dict(targets=y))
      >>> C.shape
      (1, 1, 5, 5)
      >>> d = ldjax.decompose(f, p, x, x, ldjax.losses.sft, eta=0.1, loss_kwargs=dict(targets=y))
      >>> lin = jnp.take_along_axis(d.delta_logp_linear, y[..., None], axis=-1)[..., 0]
      >>> bool(jnp.allclose(C.sum(axis=(1, 3)), lin, rtol=1e-4, atol=1e-3))  # Σ_{u,l} C = linear Δ
      True
    """
    eta = validate.check_eta(eta)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    xs = branches(x_u)
    shape_o = validate.logits_shape(apply_fn, params, x_o, "x_o")
    if len(shape_o) != 3:
        raise ValueError(f"token maps need sequence logits (N, T, V); x_o gives {shape_o}")
    for k, x in enumerate(xs):
        s = validate.logits_shape(apply_fn, params, x, f"x_u[{k}]")
        if len(s) != 3:
            raise ValueError(f"token maps need sequence logits (N, T, V); x_u[{k}] gives {s}")
    y_o = np.asarray(targets_o)
    if y_o.shape != shape_o[:2]:
        raise ValueError(f"targets_o has shape {y_o.shape}; expected {shape_o[:2]} (N_o, T_o)")
    m_o = (
        np.ones(y_o.shape, bool)
        if mask_o is None
        else validate.check_mask(mask_o, shape_o[:2], "mask_o")
    )
    kw = dict(loss_kwargs or {})
    gs = _forward_and_G(apply_fn, loss_fn, params, xs, kw)
    for k, g in enumerate(gs):
        validate.check_finite(g, f"G of x_u[{k}]")
    n_o = shape_o[0]
    rows_o = [
        _rows_o(
            apply_fn,
            params,
            x_o[a : a + chunk_size],
            jnp.asarray(y_o[a : a + chunk_size]),
            jnp.asarray(m_o[a : a + chunk_size]),
        )
        for a in range(0, n_o, chunk_size)
    ]
    maps = []
    for x, g in zip(xs, gs):
        n_u = g.shape[0]
        blocks = []
        for a in range(0, n_u, chunk_size):
            ru = _rows_u(apply_fn, params, x[a : a + chunk_size], g[a : a + chunk_size])
            blocks.append(
                jnp.concatenate(
                    [
                        -eta
                        * jnp.einsum("omp,ulp->ouml", ro, ru, precision=jax.lax.Precision.HIGHEST)
                        for ro in rows_o
                    ],
                    axis=0,
                )
            )
        maps.append(jnp.concatenate(blocks, axis=1))
    return maps[0] if len(maps) == 1 else tuple(maps)
