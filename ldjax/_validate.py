"""Input checks shared by every public kernel: clear errors, never a silent wrong answer."""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import numpy as np


def check_eta(eta: Any, name: str = "eta") -> float:
  """Returns ``eta`` as a float; raises unless it is a finite number > 0."""
  if isinstance(eta, (jax.Array, np.ndarray)) and np.ndim(eta) == 0:
    eta = float(eta)
  if not isinstance(eta, numbers.Real) or isinstance(eta, bool):
    raise ValueError(f"{name} must be a positive number, got {eta!r}")
  if not np.isfinite(eta) or eta <= 0:
    raise ValueError(f"{name} must be > 0 (the step size of one SGD step), got {eta!r}")
  return float(eta)


def check_finite(array: Any, name: str) -> None:
  """Raises if ``array`` holds NaN or Inf (concrete arrays only; traced ones pass)."""
  try:
    a = np.asarray(array)
  except jax.errors.TracerArrayConversionError:
    return
  if not np.issubdtype(a.dtype, np.inexact):
    return
  bad = ~np.isfinite(a)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/Inf) out of {a.size}; "
        f"first at index {where} of shape {a.shape}")


def check_batched(x: Any, name: str) -> int:
  """Returns the leading (batch) size of every leaf of ``x``; raises if they differ."""
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves:
    raise ValueError(f"{name} is empty: expected an array (or pytree of arrays) with a batch axis")
  sizes = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise ValueError(f"{name} must have a leading batch axis, got a scalar")
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(f"{name}: leaves disagree on the batch size: {sorted(sizes)}")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"{name} has batch size 0")
  return n


def avals_key(tree: Any) -> tuple:
  """A hashable key of a pytree's structure, shapes and dtypes."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((np.shape(l), str(getattr(l, "dtype", type(l).__name__))) for l in leaves)


_SHAPES: dict = {}


def _eval_shape(f, params, x):
  try:
    key = (f, avals_key(params), avals_key(x))
    hash(key)
  except TypeError:
    return jax.eval_shape(f, params, x)
  if key not in _SHAPES:
    if len(_SHAPES) > 256:
      _SHAPES.clear()
    _SHAPES[key] = jax.eval_shape(f, params, x)
  return _SHAPES[key]


def logits_shape(f: Callable, params: Any, x: Any, name: str) -> tuple[int, ...]:
  """Shape of ``f(params, x)`` by abstract evaluation; a clear error if they do not fit."""
  n = check_batched(x, name)
  try:
    out = _eval_shape(f, params, x)
  except Exception as e:  # noqa: BLE001 - re-raised with context
    shapes = jax.tree_util.tree_map(np.shape, x)
    raise ValueError(
        f"params do not fit apply_fn on {name} (input shapes {shapes}): "
        f"{type(e).__name__}: {e}") from e
  if not hasattr(out, "shape"):
    raise ValueError(f"apply_fn must return one logits array, got {type(out).__name__} on {name}")
  if len(out.shape) not in (2, 3):
    raise ValueError(
        f"apply_fn on {name} returned logits of shape {out.shape}; expected (N, V) or (N, T, V)")
  if out.shape[0] != n:
    raise ValueError(
        f"apply_fn on {name} returned logits with batch {out.shape[0]} for an input batch of {n}")
  return tuple(out.shape)


def check_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
  """Boolean mask of ``shape`` ``(N, T)`` that selects >= 1 position per example."""
  m = np.asarray(mask)
  if m.shape != tuple(shape):
    raise ValueError(f"{name} has shape {m.shape}; expected {tuple(shape)} (N, T) to match the logits")
  if m.dtype != np.bool_:
    if not np.isin(m, (0, 1)).all():
      raise ValueError(f"{name} must be boolean (or 0/1), got values other than 0/1")
    m = m.astype(bool)
  empty = np.flatnonzero(~m.any(axis=1))
  if empty.size:
    raise ValueError(f"{name} selects no position in example(s) {empty.tolist()[:10]}")
  return m
