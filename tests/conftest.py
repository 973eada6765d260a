"""Shared test helpers: the jacrev J_o J_uᵀ baseline, small models, float64 switch."""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldjax import zoo

SHARED_DATA = os.environ.get("LDJAX_DATA")


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-300))


def jacrev_entk(apply_fn, params, x_o, x_u):
  """The definition: K = Σ_θ J_o J_uᵀ from full ``jax.jacrev`` Jacobians.

  ``(N_o, N_u, V, V)`` for ``(N, V)`` logits, ``(N_o, N_u, T, T, V, V)`` for ``(N, T, V)``.
  """
  jo = jax.jacrev(lambda p: apply_fn(p, x_o))(params)
  ju = jax.jacrev(lambda p: apply_fn(p, x_u))(params)
  out_o = jax.eval_shape(apply_fn, params, x_o).shape
  k = len(out_o)
  total = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(jo), jax.tree_util.tree_leaves(ju)):
    a = a.reshape(a.shape[:k] + (-1,))
    b = b.reshape(b.shape[:k] + (-1,))
    spec = "oip,ujp->ouij" if k == 2 else "omip,uljp->oumlij"
    total = total + jnp.einsum(spec, a, b)
  return total


@contextlib.contextmanager
def precision(dtype):
  """float64 switched on only inside the block."""
  with jax.enable_x64(dtype == "float64"):
    yield


def cast(tree, dtype):
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def small_model(name, dtype, key=0):
  """``(apply_fn, params, x_o, x_u)`` for "mlp", "lenet" or "transformer" (tiny sizes)."""
  k = jax.random.PRNGKey(key)
  k1, k2, k3 = jax.random.split(k, 3)
  if name == "mlp":
    p = zoo.mlp_init(k1, (12, 16, 16, 5), dtype=dtype)
    return zoo.mlp_apply, p, jax.random.normal(k2, (3, 12), dtype), jax.random.normal(k3, (2, 12), dtype)
  if name == "lenet":
    p = zoo.lenet_init(k1, dtype=dtype)
    return (zoo.lenet_apply, p, jax.random.uniform(k2, (2, 28, 28, 1), dtype),
            jax.random.uniform(k3, (2, 28, 28, 1), dtype))
  if name == "transformer":
    p = zoo.transformer_init(k1, vocab=13, d_model=8, n_heads=2, n_layers=2, max_len=7, dtype=dtype)
    f = functools.partial(zoo.transformer_apply, n_heads=2)
    return (f, p, jax.random.randint(k2, (2, 7), 0, 13), jax.random.randint(k3, (2, 7), 0, 13))
  raise ValueError(name)
