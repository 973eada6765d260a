"""Input checks shared by every entry point of the engine: clear errors, never a silent wrong
answer.

The one validation module. ``entk``, ``entk_vp``, ``entk_cost``, ``decompose``, ``actual_step``,
``G`` and every loss call the checks here; each failure raises ``ValueError`` naming the argument,
and where it applies the index and the value.

Checks of shapes and dtypes work on traced arrays too (at trace time, so they cost nothing inside
a jitted training step); checks of values (target ranges, finiteness, β > 0) run only on concrete
values and are skipped for tracers. The entry points (``decompose``, ``actual_step``, ``G``) run
them on the concrete arguments before anything is traced.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import os
import shutil
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- the switch

_ENABLED = [True]


def enabled() -> bool:
    """True unless inside :func:`disabled`."""
    return _ENABLED[0]


@contextlib.contextmanager
def disabled():
    """Switches the checks of values off inside the block (shape inference still runs).

    For ``benchmarks/bench_validation.py`` only, which measures what the checks cost; never use
    it to get past an error.
    """
    old = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = old


# ----------------------------------------------------------------------------- small helpers


def is_traced(x: Any) -> bool:
    """True if any leaf of ``x`` is a JAX tracer (its values are unknown here)."""
    return any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves(x))


def _index(idx: tuple) -> str:
    return "[" + ", ".join(str(int(i)) for i in idx) + "]"


def _value(v: Any) -> str:
    """A value as printed in messages: ``4.7`` for a float32 4.7, ``10`` for an int."""
    a = np.asarray(v)
    if a.ndim == 0 and np.issubdtype(a.dtype, np.number):
        return str(a[()])
    return repr(v)


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``: a size in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


@functools.lru_cache(maxsize=256)
def _kind(dtype: np.dtype) -> str:
    """``"inexact"``, ``"integer"``, ``"bool"`` or ``"other"`` (bfloat16 and the other ml_dtypes
    floats are inexact: ``jnp.issubdtype`` knows them, ``np.issubdtype`` does not)."""
    if jnp.issubdtype(dtype, jnp.inexact):
        return "inexact"
    if jnp.issubdtype(dtype, jnp.integer):
        return "integer"
    return "bool" if dtype == np.bool_ else "other"


def _inexact(dtype: np.dtype) -> bool:
    return _kind(np.dtype(dtype)) == "inexact"


def _integer(dtype: np.dtype) -> bool:
    return _kind(np.dtype(dtype)) == "integer"


def _dtype(x: Any) -> np.dtype:
    if hasattr(x, "dtype"):
        return np.dtype(x.dtype)
    return np.asarray(x).dtype


# ----------------------------------------------------------------------------- scalars


def check_eta(eta: Any, name: str = "eta") -> float:
    """Returns ``eta`` as a float; raises unless it is a finite number > 0."""
    if type(eta) is float and 0 < eta < np.inf:
        return eta
    if isinstance(eta, (jax.Array, np.ndarray)) and np.ndim(eta) == 0:
        eta = float(eta)
    if not isinstance(eta, numbers.Real) or isinstance(eta, bool):
        raise ValueError(f"{name} must be a positive number, got {eta!r}")
    if not np.isfinite(eta) or eta <= 0:
        raise ValueError(f"{name} must be > 0 (the step size of one SGD step), got {eta!r}")
    return float(eta)


def check_memory_budget(budget: Any, name: str = "memory_budget") -> int:
    """Returns ``budget`` as an int of bytes; raises unless it is a finite number > 0."""
    if type(budget) is int and budget >= 1:
        return budget
    if isinstance(budget, (jax.Array, np.ndarray)) and np.ndim(budget) == 0:
        budget = budget.item()
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool):
        raise ValueError(
            f"{name} must be a number of bytes (e.g. 2**30 for 1 GiB), got {budget!r} "
            f"of type {type(budget).__name__}"
        )
    if not np.isfinite(budget) or budget < 1:
        raise ValueError(f"{name} must be a finite number of bytes >= 1, got {budget!r}")
    return int(budget)


def check_scalar(
    value: Any,
    name: str,
    owner: str,
    *,
    low: float | None = None,
    strict: bool = True,
) -> None:
    """A real, finite scalar hyper-parameter (``> low``, or ``>= low`` without ``strict``).

    Traced values only have their shape checked (a scalar).
    """
    if isinstance(value, jax.core.Tracer):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} of {owner} must be a scalar, got shape {np.shape(value)}")
        return
    if isinstance(value, (jax.Array, np.ndarray)):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} of {owner} must be a scalar, got shape {np.shape(value)}")
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} of {owner} must be a real number, got {value!r}")
    if not enabled():
        return
    if not np.isfinite(value):
        raise ValueError(f"{name} of {owner} must be finite, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        op = ">" if strict else ">="
        raise ValueError(f"{name} of {owner} must be {op} {low}, got {value!r}")


# ----------------------------------------------------------------------------- finiteness

# jax arrays are immutable: one found finite stays finite, so it is not checked again while it
# lives (keyed by id, with a weak reference that tells a reused id from the same array)
_KNOWN_FINITE: dict[int, weakref.ref] = {}


def _known_finite(a: Any) -> bool:
    ref = _KNOWN_FINITE.get(id(a))
    return ref is not None and ref() is a


def _remember_finite(a: Any) -> None:
    if not isinstance(a, jax.Array):
        return
    key = id(a)
    try:
        _KNOWN_FINITE[key] = weakref.ref(a, lambda _, key=key: _KNOWN_FINITE.pop(key, None))
    except TypeError:  # pragma: no cover - an array type without weak references
        pass


@jax.jit
def _device_all_finite(a):
    return jnp.all(jnp.isfinite(a))


def _all_finite(a: Any) -> bool:
    """One array: all finite? (on the device for accelerator arrays, on the host otherwise)."""
    if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
        if _known_finite(a):
            return True
        if a.size == 0 or all(d.platform == "cpu" for d in a.devices()):
            ok = _host_all_finite(np.asarray(a))
        else:
            ok = bool(_device_all_finite(a))
        if ok:
            _remember_finite(a)
        return ok
    return _host_all_finite(np.asarray(a))


def _host_all_finite(a: np.ndarray) -> bool:
    """All finite? For a large float32/float64 array first ``a·a`` by BLAS: NaN and ±Inf make it
    non-finite, and one BLAS pass is ~1.5x faster than ``isfinite(a).all()`` (measured on the K of
    benchmarks/bench_validation.py); an overflowing product of finite values (|a| ≳ 1e19 in
    float32) falls back to the exact test."""
    if a.size > 4096 and a.dtype in (np.float32, np.float64) and a.flags.c_contiguous:
        v = a.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(v, v)):
                return True
    return bool(np.isfinite(a).all())


def all_finite(tree: Any) -> bool:
    """True if every floating leaf of ``tree`` is finite (tracers count as finite: unknown)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        ref = _KNOWN_FINITE.get(id(leaf))
        if ref is not None and ref() is leaf:  # the fast path of repeated calls
            continue
        if isinstance(leaf, (jax.core.Tracer, jax.ShapeDtypeStruct)):
            continue
        if _inexact(_dtype(leaf)) and not _all_finite(leaf):
            return False
    return True


def finite_flags(arrays: tuple) -> jax.Array:
    """``(len(arrays),)`` bools, each array all finite; traceable: a program computes them with
    its outputs (a fused reduction, no extra dispatch), the host reads them with
    :func:`check_flags`."""
    return jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays])


def check_flags(flags: Any, checks: list) -> None:
    """Reads :func:`finite_flags` once; all True: the arrays are remembered as finite, else the
    first failing one gets :func:`check_finite` (which raises with its index and value).

    ``checks``: one ``(array, name, cause)`` per flag, as for :func:`check_finite`.
    """
    if not enabled():
        return
    ok = np.asarray(flags)
    if ok.all():
        for array, _, _ in checks:
            _remember_finite(array)
        return
    for good, (array, name, cause) in zip(ok, checks):
        if not good:
            check_finite(array, name, cause)


def forget_finite() -> None:
    """Forgets which arrays were found finite, and the ranges of targets (benchmarks time the
    checks from cold with it)."""
    _KNOWN_FINITE.clear()
    _RANGES.clear()


def _first_bad(a: Any) -> tuple[np.ndarray, int]:
    a = np.asarray(a)
    bad = ~np.isfinite(a)
    return np.argwhere(bad)[0], int(bad.sum())


def check_finite(array: Any, name: str, cause: Callable[[], str] | None = None) -> None:
    """Raises if ``array`` holds NaN or Inf (concrete arrays only; traced ones pass).

    ``cause``, called only on failure, returns text appended to the message (see
    :func:`non_finite_cause`).
    """
    if not enabled() or _known_finite(array):
        return
    if isinstance(array, (jax.core.Tracer, jax.ShapeDtypeStruct)):
        return
    dtype = _dtype(array)
    if not _inexact(dtype) or _all_finite(array):
        return
    where, count = _first_bad(array)
    value = np.asarray(array)[tuple(where)]
    raise ValueError(
        f"{name} contains {count} non-finite value(s) (NaN/Inf) out of {np.size(array)}; "
        f"first at index {tuple(int(i) for i in where)} of shape {np.shape(array)} "
        f"(value {_value(value)}){cause() if cause is not None else ''}"
    )


def non_finite_cause(named: dict) -> str:
    """Why some output is non-finite: the first of ``named`` (name -> pytree: params, inputs)
    holding NaN/Inf, or, all being finite, the likely causes inside ``apply_fn``."""
    for name, tree in named.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, jax.core.Tracer) or not _inexact(_dtype(leaf)):
                continue
            if not _all_finite(leaf):
                where, count = _first_bad(leaf)
                value = np.asarray(leaf)[tuple(where)]
                return (
                    f"; the cause: {name}{jax.tree_util.keystr(path)} holds {count} non-finite "
                    f"value(s), first at {tuple(int(i) for i in where)} ({_value(value)})"
                )
    ints = []
    for name, tree in named.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not isinstance(leaf, jax.core.Tracer) and _integer(_dtype(leaf)):
                a = np.asarray(leaf)
                if a.size:
                    ints.append(f"{name}{jax.tree_util.keystr(path)} in [{a.min()}, {a.max()}]")
    hint = "an overflow in apply_fn"
    if ints:
        hint = (
            "an integer input out of range, e.g. a token id outside the vocabulary (JAX gathers "
            f"fill NaN; {', '.join(ints)}), or an overflow in apply_fn"
        )
    names = list(named)
    both = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return f"; {both} are finite, so the cause is inside apply_fn: {hint}"


def check_finite_tree(tree: Any, name: str) -> None:
    """:func:`check_finite` on every floating leaf of a pytree, named by its path."""
    if not enabled() or all_finite(tree):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        check_finite(leaf, name + jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- params and inputs


def check_params(params: Any, name: str = "params") -> None:
    """Trainable params: at least one leaf, every leaf floating point (finiteness apart:
    :func:`check_finite_tree`)."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(f"{name} has no trainable leaves (flax: the 'params' collection is empty)")
    if all(_kind(l.dtype) == "inexact" if hasattr(l, "dtype") else False for l in leaves):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = _dtype(leaf)
        if not _inexact(dtype):
            raise ValueError(
                f"params must be floating point; {name}{jax.tree_util.keystr(path)} has dtype "
                f"{dtype} (integer params have no gradient: cast them, e.g. to float32)"
            )


def check_batched(x: Any, name: str) -> int:
    """Returns the leading (batch) size of every leaf of ``x``; raises if they differ."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError(
            f"{name} is empty: expected an array (or pytree of arrays) with a batch axis"
        )
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


def logits_struct(f: Callable, params: Any, x: Any, name: str) -> jax.ShapeDtypeStruct:
    """``f(params, x)`` by abstract evaluation (shape and dtype); a clear error if they do not
    fit or the result is not ``(N, V)`` / ``(N, T, V)`` floating logits of x's batch."""
    n = check_batched(x, name)
    try:
        out = _eval_shape(f, params, x)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        shapes = jax.tree_util.tree_map(np.shape, x)
        raise ValueError(
            f"params do not fit apply_fn on {name} (input shapes {shapes}): {type(e).__name__}: {e}"
        ) from e
    if not hasattr(out, "shape"):
        raise ValueError(
            f"apply_fn must return one logits array, got {type(out).__name__} on {name}"
        )
    if len(out.shape) not in (2, 3):
        raise ValueError(
            f"apply_fn on {name} returned logits of shape {out.shape}; expected (N, V) or (N, T, V)"
        )
    if out.shape[0] != n:
        raise ValueError(
            f"apply_fn on {name} returned logits with batch {out.shape[0]} "
            f"for an input batch of {n}"
        )
    if not _inexact(out.dtype):
        raise ValueError(
            f"apply_fn on {name} returned logits of dtype {out.dtype}; expected floating point"
        )
    return out


def logits_shape(f: Callable, params: Any, x: Any, name: str) -> tuple[int, ...]:
    """Shape of ``f(params, x)`` (:func:`logits_struct`)."""
    return tuple(logits_struct(f, params, x, name).shape)


def check_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Boolean mask of ``shape`` ``(N, T)`` that selects >= 1 position per example."""
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {m.shape}; expected {tuple(shape)} (N, T) to match the logits"
        )
    if m.dtype != np.bool_:
        if not np.isin(m, (0, 1)).all():
            bad = np.argwhere(~np.isin(m, (0, 1)))[0]
            raise ValueError(
                f"{name} must be boolean (or 0/1); {name}{_index(bad)} = {_value(m[tuple(bad)])}"
            )
        m = m.astype(bool)
    empty = np.flatnonzero(~m.any(axis=1))
    if empty.size:
        raise ValueError(f"{name} selects no position in example(s) {empty.tolist()[:10]}")
    return m


def check_preconditioner(pre: Any, params: Any) -> tuple:
    """An elementwise preconditioner ``pre`` as a pytree of arrays shaped like the trainable
    ``params`` (scalar leaves broadcast), and each leaf's constant value (None where the leaf is not
    constant). Raises a ValueError naming the leaf for a wrong structure, shape or a non-finite
    value."""
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    try:
        leaves = p_def.flatten_up_to(pre)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"preconditioner must have the structure of the trainable params: {e}"
        ) from e
    out, consts = [], []
    for k, (leaf, ref) in enumerate(zip(leaves, p_leaves)):
        a = np.asarray(leaf)
        if a.shape not in ((), np.shape(ref)):
            raise ValueError(
                f"preconditioner leaf {k} has shape {a.shape}; expected {np.shape(ref)} "
                "(the parameter's) or a scalar"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"preconditioner leaf {k} holds non-finite values")
        a = np.broadcast_to(a, np.shape(ref)).astype(jnp.result_type(ref))
        flat = a.reshape(-1)
        consts.append(float(flat[0]) if flat.size and np.all(flat == flat[0]) else None)
        out.append(jnp.asarray(a))
    return jax.tree_util.tree_unflatten(p_def, out), consts


# ----------------------------------------------------------------------------- loss arguments


def check_logits(z: Any, name: str) -> tuple[int, ...]:
    """Logits ``(N, V)`` or ``(N, T, V)`` of a floating dtype, finite when concrete."""
    shape = _shape(z)
    if len(shape) not in (2, 3):
        raise ValueError(f"{name} has shape {shape}; expected logits (N, V) or (N, T, V)")
    if shape[-1] < 1:
        raise ValueError(f"{name} has shape {shape}: no classes (V = 0)")
    dtype = _dtype(z)
    if not _inexact(dtype):
        raise ValueError(f"{name} must be floating point logits, got dtype {dtype}")
    check_finite(z, name)
    return shape


def check_targets(targets: Any, logits_shape: tuple, name: str, logits_name: str) -> None:
    """Integer class indices shaped like the logits without V, each in ``[0, V)``."""
    if targets is None:
        raise ValueError(f"{name} is required (integer class indices for {logits_name})")
    shape, want, v = _shape(targets), tuple(logits_shape[:-1]), logits_shape[-1]
    per = "position" if len(logits_shape) == 3 else "example"
    if shape != want:
        raise ValueError(
            f"{name} has shape {shape}; expected {want}, one target per {per} of {logits_name} "
            f"{tuple(logits_shape)}"
        )
    dtype = _dtype(targets)
    if not _integer(dtype):
        hint = ""
        if not is_traced(targets) and _kind(dtype) in ("inexact", "integer"):
            t = np.asarray(targets)
            frac = np.argwhere(t != np.round(t)) if _inexact(dtype) else []
            if len(frac):
                i = tuple(frac[0])
                hint = f" ({name}{_index(i)} = {_value(t[i])} would be truncated)"
        raise ValueError(
            f"{name} must hold integer class indices in [0, {v}); got dtype {dtype}{hint}"
        )
    if not enabled() or is_traced(targets):
        return
    lo_hi = _RANGES.get(id(targets))
    if lo_hi is not None and lo_hi[0]() is targets:
        if lo_hi[1] >= 0 and lo_hi[2] < v:
            return
    t = np.asarray(targets)
    if t.size == 0:
        return
    lo, hi = t.min(), t.max()
    if isinstance(targets, jax.Array):  # immutable: its range is remembered while it lives
        key = id(targets)
        _RANGES[key] = (weakref.ref(targets, lambda _, key=key: _RANGES.pop(key, None)), lo, hi)
    if lo >= 0 and hi < v:
        return
    bad = (t < 0) | (t >= v)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise ValueError(
            f"{name}{_index(i)} = {_value(t[i])} is out of range [0, {v}) for {logits_name} "
            f"with V = {v} ({int(bad.sum())} of {t.size} out of range)"
        )


_RANGES: dict[int, tuple] = {}  # id -> (weak reference, min, max) of integer jax arrays


def check_loss_mask(mask: Any, logits_shape: tuple, name: str, logits_name: str) -> None:
    """A loss mask shaped like the targets; numeric masks must be finite."""
    if mask is None:
        return
    shape, want = _shape(mask), tuple(logits_shape[:-1])
    if shape != want:
        raise ValueError(
            f"{name} has shape {shape}; expected {want} to match {logits_name} "
            f"{tuple(logits_shape)}"
        )
    dtype = _dtype(mask)
    if _kind(dtype) == "other":
        raise ValueError(f"{name} must be boolean (or numeric weights), got dtype {dtype}")
    if _inexact(dtype):
        check_finite(mask, name)


def check_ref_logp(ref: Any, n: int, name: str) -> None:
    """One finite reference log-probability per pair: ``(N,)``."""
    if ref is None:
        raise ValueError(f"{name} is required: the reference model's log π_ref(y|x), shape ({n},)")
    shape = _shape(ref)
    if shape != (n,):
        raise ValueError(
            f"{name} has shape {shape}; expected ({n},), one reference log-probability per pair"
        )
    dtype = _dtype(ref)
    if _kind(dtype) not in ("inexact", "integer") or np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {dtype}")
    check_finite(ref, name)


SINGLE_LOSSES = ("sft", "sequence_logprob", "token_logprobs")
PAIR_LOSSES = ("dpo", "ipo", "slic", "sppo")
GROUP_LOSSES = ("grpo", "grpo_nthr")
_LOSS_FNS: dict = {}  # loss function -> its name, filled by ldjax._src.losses


def register_loss(name: str) -> Callable:
    """Decorator: marks a function as the ldjax loss ``name`` (its arguments are then checked at
    the engine's entry points, before anything is traced)."""

    def deco(fn):
        _LOSS_FNS[fn] = name
        return fn

    return deco


def loss_inputs(loss: str, logits: tuple, kwargs: dict, names: tuple | None = None) -> None:
    """Checks every argument of the ldjax loss ``loss``.

    Args:
      loss: ``"sft"``, ``"sequence_logprob"``, ``"token_logprobs"``, ``"dpo"``, ``"ipo"``,
        ``"slic"``, ``"sppo"``, ``"grpo"`` or ``"grpo_nthr"``.
      logits: the logits arguments (arrays, tracers or ``jax.ShapeDtypeStruct``).
      kwargs: every other argument by name (targets, masks, reference log-probs, β, ...).
      names: how to call the logits arguments in errors (default their parameter names).
    Raises:
      ValueError: naming the argument, and for values the index and the value.
    """
    pair = loss in PAIR_LOSSES
    params = ("logits_pos", "logits_neg") if pair else ("logits",)
    names = names or params
    if len(logits) != len(params):
        raise ValueError(
            f"loss {loss} takes {len(params)} logits argument(s) ({', '.join(params)}), "
            f"got {len(logits)}"
        )
    shapes = [check_logits(z, nm) for z, nm in zip(logits, names)]
    if pair:
        (sp, sn), (np_, nn) = shapes, names
        if sp[0] != sn[0]:
            raise ValueError(
                f"{nn} has batch size {sn[0]} but {np_} has {sp[0]}: loss {loss} pairs y⁺ "
                f"with y⁻ one to one"
            )
        if len(sp) != len(sn) or sp[-1] != sn[-1]:
            raise ValueError(f"{np_} {sp} and {nn} {sn} disagree on the layout (N, [T,] V)")
    sides = (("_pos", 0), ("_neg", 1)) if pair else (("", 0),)
    for suffix, k in sides:
        check_targets(kwargs.get("targets" + suffix), shapes[k], "targets" + suffix, names[k])
        if "mask" + suffix in kwargs:
            check_loss_mask(kwargs["mask" + suffix], shapes[k], "mask" + suffix, names[k])
        ref = "ref_logp" + suffix
        if pair and (loss != "slic" or kwargs.get(ref) is not None):
            check_ref_logp(kwargs.get(ref), shapes[k][0], ref)
    if loss in ("dpo", "ipo", "sppo"):
        check_scalar(kwargs.get("beta", 0.1), "beta", loss, low=0.0)
    if loss == "sppo" and kwargs.get("c") is not None:
        check_scalar(kwargs["c"], "c", loss, low=0.0)
    if loss == "slic":
        check_scalar(kwargs.get("delta", 1.0), "delta", loss)
        check_scalar(kwargs.get("lam", 0.0), "lam", loss, low=0.0, strict=False)
    if loss in GROUP_LOSSES:
        _group_loss_inputs(loss, shapes[0], names[0], kwargs)


def check_real_array(x: Any, shape: tuple, name: str, what: str) -> None:
    """A real (integer or floating) array of exactly ``shape``, finite when concrete; ``what``
    says what one entry is (in the error)."""
    if x is None:
        raise ValueError(f"{name} is required: {what}, shape {tuple(shape)}")
    got = _shape(x)
    if got != tuple(shape):
        raise ValueError(f"{name} has shape {got}; expected {tuple(shape)} ({what})")
    dtype = _dtype(x)
    if _kind(dtype) not in ("inexact", "integer") or np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {dtype}")
    check_finite(x, name)


def _group_loss_inputs(loss: str, shape: tuple, logits_name: str, kwargs: dict) -> None:
    """GRPO family: per-sequence advantages, optional old per-token log-probs, the clip range
    and (NTHR) the per-token influence and its threshold and weight."""
    if len(shape) != 3:
        raise ValueError(
            f"loss {loss} takes sequence logits (N, T, V) (a group of sampled responses); "
            f"{logits_name} has shape {tuple(shape)}"
        )
    n, t = shape[0], shape[1]
    check_real_array(
        kwargs.get("advantages"), (n,), "advantages", "one advantage per sampled response"
    )
    if kwargs.get("old_logp") is not None:
        check_real_array(kwargs["old_logp"], (n, t), "old_logp", "log π_old of each target token")
    check_scalar(kwargs.get("clip_eps", 0.2), "clip_eps", loss, low=0.0)
    if loss == "grpo_nthr":
        check_real_array(
            kwargs.get("influence"),
            (n, t),
            "influence",
            "each token's influence on the correct responses (nthr_influence)",
        )
        check_scalar(kwargs.get("tau", 1.0), "tau", loss)
        w = kwargs.get("down_weight", 0.5)
        check_scalar(w, "down_weight", loss, low=0.0, strict=False)
        if not is_traced(w) and enabled() and float(np.asarray(w)) > 1:
            raise ValueError(f"down_weight of {loss} must be in [0, 1], got {w!r}")


@functools.lru_cache(maxsize=64)
def _loss_keywords(fn: Callable) -> tuple[str, ...]:
    """The arguments of an ldjax loss other than its logits."""
    return tuple(k for k in inspect.signature(fn).parameters if not k.startswith("logits"))


def _resolve_loss(loss_fn: Callable, kwargs: dict) -> tuple[str | None, dict]:
    """``(name, kwargs)`` of an ldjax loss behind ``loss_fn`` (a ``functools.partial`` of one, or
    a ``functools.wraps`` wrapper), or ``(None, kwargs)``. Keywords the loss does not take raise.
    """
    fn, kw = loss_fn, dict(kwargs)
    for _ in range(8):
        try:
            name = _LOSS_FNS.get(fn)
        except TypeError:  # an unhashable callable
            name = None
        if name is not None:
            takes = _loss_keywords(fn)
            extra = sorted(set(kw) - set(takes))
            if extra:
                raise ValueError(
                    f"loss_kwargs has {', '.join(extra)}, which loss {name} does not take "
                    f"(it takes {', '.join(takes)})"
                )
            return name, kw
        if isinstance(fn, functools.partial) and not fn.args:
            kw = {**fn.keywords, **kw}
            fn = fn.func
        elif hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        else:
            break
    return None, kwargs


def loss_name(loss_fn: Callable) -> str:
    name, _ = _resolve_loss(loss_fn, {})
    return name or getattr(loss_fn, "__name__", type(loss_fn).__name__)


def loss_arity(loss_fn: Callable, kwargs: dict) -> int | None:
    """How many logits arguments ``loss_fn`` takes given ``kwargs`` (None if it cannot tell)."""
    name, _ = _resolve_loss(loss_fn, kwargs)
    if name is not None:
        return 2 if name in PAIR_LOSSES else 1
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return None
        if (
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is p.empty
            and p.name not in kwargs
        ):
            n += 1
    return n


def check_branches(loss_fn: Callable, kwargs: dict, n: int, name: str = "x_u") -> None:
    """``x_u`` has one batch per logits argument of ``loss_fn`` (DPO family: the pair)."""
    want = loss_arity(loss_fn, kwargs)
    if want is None or want == n:
        return
    loss = loss_name(loss_fn)
    if want == 2:
        what = "(x⁺, x⁻)" if name.startswith("x") else "(z⁺, z⁻)"
        got = f"{n} batch(es)" if name.startswith("x") else f"{n} array(s)"
        raise ValueError(
            f"{name} must be a pair {what} for loss {loss}, which takes two logits arguments "
            f"(y⁺ and y⁻); got {got}"
        )
    raise ValueError(
        f"{name} gives {n} batch(es) but loss {loss} takes {want} logits argument(s); "
        f"pass {'one batch (not a tuple)' if want == 1 else f'a tuple of {want} batches'}"
    )


def check_loss_call(
    loss_fn: Callable, logits: tuple, kwargs: dict, names: tuple | None = None
) -> None:
    """The entry points' check of a loss call with concrete arguments.

    An ldjax loss (or a ``functools.partial`` of one) gets :func:`loss_inputs`. Any other
    function gets what holds for every loss of logits: each logits array finite, every floating
    array among ``kwargs`` finite, and integer ``targets*`` arrays shaped like a branch's logits
    within ``[0, V)``.
    """
    name, kw = _resolve_loss(loss_fn, kwargs)
    if name is not None:
        pair = name in PAIR_LOSSES
        if len(logits) != (2 if pair else 1):  # G's logits (decompose checked x_u already)
            check_branches(loss_fn, kwargs, len(logits), "logits")
        loss_inputs(name, logits, kw, names)
        return
    names = names or tuple(f"logits[{k}]" for k in range(len(logits)))
    for z, nm in zip(logits, names):
        check_finite(z, nm)
    for key, value in kwargs.items():
        if not callable(value):
            check_finite_tree(value, key)
        if key.startswith("targets") and hasattr(value, "shape"):
            dtype = _dtype(value)
            k = 1 if key.endswith("_neg") and len(logits) > 1 else 0
            shape = _shape(logits[k])
            if _integer(dtype) and tuple(value.shape) == shape[:-1]:
                check_targets(value, shape, key, names[k])


# ----------------------------------------------------------------------------- memory


MEMORY_CHECKED_FROM = 64 * 2**20
"""Requests smaller than this (bytes) are not compared with the memory available: reading it
(``/proc/meminfo``) costs ~40 µs, more than the checks of a small call."""


def available_memory() -> dict:
    """Bytes free now: ``{"host": MemAvailable or None, "device": free accelerator memory}``.

    The host figure is ``/proc/meminfo``'s MemAvailable (Linux); elsewhere None (not checked).
    The device figure is ``bytes_limit − bytes_in_use`` of the default device's memory stats
    (None on CPU, where arrays live in host memory).
    """
    host = None
    try:
        with open("/proc/meminfo", "rb") as fh:
            data = fh.read()
        i = data.find(b"MemAvailable:")
        if i >= 0:
            host = int(data[i + 13 : data.index(b"kB", i)]) * 1024
    except (OSError, ValueError):
        host = None
    if host is None and hasattr(os, "sysconf"):
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            host = None
    device = None
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        try:
            stats = dev.memory_stats() or {}
            if "bytes_limit" in stats:
                device = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        except Exception:  # noqa: BLE001 - a backend without memory stats: not checked
            device = None
    return {"host": host, "device": device}


def check_memory(
    what: Callable[[], str],
    host: int,
    device: int,
    host_copy: int,
    out: Any,
    out_bytes: int,
    fits: Callable[[], str],
) -> None:
    """Fails before allocating when a request does not fit the memory available.

    Args:
      what: returns the request in words, ending before its size (``"K (…) float32 (1 GiB)
        with its work needs"``; called only on failure).
      host, device: bytes it needs in host memory (CPU backend: all of it) and on the
        accelerator (other backends).
      host_copy: bytes it also holds in host memory on an accelerator backend.
      out: the path of an output written to disk (None: in memory); ``out_bytes`` its size,
        compared with the free space of its folder.
      fits: returns what would fit, in words (called only on failure).
    Raises:
      ValueError: ``"entk: … needs about 16.0 GiB, more than the 8.0 GiB of memory available
        (MemAvailable). What would fit: …"``.
    """
    if not enabled():
        return
    fmt = format_bytes
    problems = []
    if out is not None:
        folder = os.path.dirname(os.path.abspath(os.fspath(out)))
        if not os.path.isdir(folder):
            raise ValueError(f"out: the folder {folder} does not exist")
        free = shutil.disk_usage(folder).free
        if out_bytes > free:
            problems.append(
                f"out={os.fspath(out)!r} needs {fmt(out_bytes)} of disk, more than the "
                f"{fmt(free)} free in {folder}"
            )
    elif max(host, device, host_copy) < MEMORY_CHECKED_FROM:
        return
    on_cpu = jax.devices()[0].platform == "cpu"
    avail = available_memory()
    if on_cpu and avail["host"] is not None and host > avail["host"]:
        problems.append(
            f"{what()} about {fmt(host)}, more than the {fmt(avail['host'])} of memory available "
            "(MemAvailable)"
        )
    if not on_cpu and avail["device"] is not None and device > avail["device"]:
        problems.append(
            f"{what()} about {fmt(device)} of accelerator memory, more than the "
            f"{fmt(avail['device'])} free"
        )
    if not on_cpu and avail["host"] is not None and host_copy > avail["host"]:
        problems.append(
            f"it is assembled in host memory ({fmt(host_copy)}), more than the "
            f"{fmt(avail['host'])} available"
        )
    if problems:
        raise ValueError("entk: " + "; ".join(problems) + ". " + fits())
