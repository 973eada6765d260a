"""Only trainable parameters are differentiated: flax's ``params`` collection, the rest closed
over."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Params = Any
ApplyFn = Callable[[Params, Any], Any]


def split_trainable(variables: Params) -> tuple[Params, Callable[[Params], Params]]:
    """Splits ``variables`` into ``(trainable, merge)``.

    A mapping with a ``"params"`` key is read as flax variables: ``variables["params"]`` is
    trainable, and every other collection (``batch_stats``, ``cache``, ...) is closed over by
    ``merge(trainable) -> variables``. Any other pytree is trainable as a whole.
    """
    if isinstance(variables, Mapping) and "params" in variables:
        rest = {k: v for k, v in variables.items() if k != "params"}
        return variables["params"], lambda p: {**rest, "params": p}
    return variables, lambda p: p


def trainable_fn(apply_fn: ApplyFn, variables: Params) -> tuple[ApplyFn, Params]:
    """``(f, params)`` with ``f(params, x) == apply_fn(variables, x)`` over trainable params
    only."""
    params, merge = split_trainable(variables)
    return (lambda p, x: apply_fn(merge(p), x)), params


def from_nnx(model: Any) -> tuple[ApplyFn, Params]:
    """A flax NNX module as ``(apply_fn, params)``: ``nnx.Param`` state is trainable.

    Everything that is not an ``nnx.Param`` (batch statistics, RNG state, ...) is closed over.
    """
    from flax import nnx  # noqa: PLC0415  # local: flax is only needed for NNX models

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    return apply_fn, params


def branches(x_u: Any) -> tuple:
    """The inputs of each logits argument of a loss: ``x_u`` itself, or the items of a tuple/list
    (the DPO family's ``(x⁺, x⁻)``)."""
    return tuple(x_u) if isinstance(x_u, (tuple, list)) else (x_u,)
