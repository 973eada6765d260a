"""The dense layers of any ``apply_fn(params, x)``, found in its jaxpr, and a re-evaluation of it
that exposes each one's input activations and output cotangents (the factors of its per-example
weight gradient, as in ghost clipping and LoGra).

A parameter leaf ``W`` used exactly once, as one operand of a ``dot_general`` that contracts
some of its dims with no batch dims (``a @ W``, ``W @ a``, flax ``Dense`` / ``DenseGeneral``,
attention projections ``(d, heads, d_head)``, an einsum of that shape), has the per-example
gradient ``g_W = Σ_s a_s δ_sᵀ`` (in W's layout): ``s`` runs over the other operand's free
positions (``S`` of them; 1 for an MLP on one example, ``T`` for a sequence), ``a_s`` is the
operand at ``s`` over the contracted dims (``d_in`` numbers) and ``δ_s`` the cotangent of the
layer's output at ``s`` (``d_out``, W's free dims).
Two such gradients have ``⟨g_W, g'_W⟩ = Σ_{s,t} (a_s·a'_t)(δ_s·δ'_t)`` without forming either.

Everything is read from ``jax.make_jaxpr`` of ``apply_fn`` at one input's shape: ``jit``,
``pjit``, ``closed_call`` and ``checkpoint`` sub-jaxprs are followed (``jnp.matmul`` and friends
are ``jit`` calls), every other primitive is taken as it is. A leaf used anywhere else, or
twice (a tied or shared weight), or inside ``scan`` / ``while`` / ``cond`` / a custom-derivative
rule, or in a ``dot_general`` with batch dims, is *rest*: its per-example gradient has to be
formed in full.

:mod:`ldjax._src.structured` reads the same structure for the eNTK (with embedding tables and
folded biases as well); this module keeps the one job influence's ``"factored"`` method needs:
which leaves are dense weights, and the factors ``(a, δ)`` of their gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

# the jaxpr-reading pieces the eNTK's structured Jacobians already have: the calls followed
# (their arguments map 1-1 onto the sub-jaxpr's inputs; a call holding a tapped layer is
# evaluated inline), the variable test and the version-proof bind
from ldjax._src.structured import CALLS, bind_eqn, is_var


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """One factorable parameter leaf and the layout of its ``dot_general`` at one input shape.

    Attributes:
      leaf: its index in ``jax.tree_util.tree_leaves(params)``.
      path: its ``jax.tree_util.keystr`` path (for messages and tests).
      positions: ``S``, the number of positions the weight is applied at (the other operand's
        free size).
      d_in, d_out: the weight's contracted and free sizes (products over its dims).
      w_side: 0 when the weight is the ``dot_general``'s lhs, 1 when it is its rhs.
      w_shape: the weight's shape.
      w_contract: the weight's contracted dims (paired in order with ``a_perm``'s last ones):
        :func:`weight_grad` puts ``actsᵀ δ`` back in the weight's layout.
      a_perm: the activation operand's dims as ``(free..., contracted...)``.
      out_shape, dtype: the ``dot_general``'s output shape and dtype (the tap's dtype).
    """

    leaf: int
    path: str
    positions: int
    d_in: int
    d_out: int
    w_side: int
    w_shape: tuple
    w_contract: tuple
    a_perm: tuple
    out_shape: tuple
    dtype: Any


def _sub_jaxpr(eqn) -> ClosedJaxpr | None:
    """The sub-jaxpr of a followed call (its arguments are the sub-jaxpr's inputs), else None."""
    if eqn.primitive.name not in CALLS:
        return None
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(sub, Jaxpr):
        return ClosedJaxpr(sub, ())
    return sub if isinstance(sub, ClosedJaxpr) else None


def _trace(f, params, x) -> tuple[ClosedJaxpr, int]:
    """The jaxpr of ``f(params, x)`` at the shapes of ``params`` and ``x`` (values are not read)
    and the number of parameter leaves (its first invars)."""
    sds = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    p_s = jax.tree_util.tree_map(sds, params)
    x_s = jax.tree_util.tree_map(sds, x)
    return jax.make_jaxpr(f)(p_s, x_s), len(jax.tree_util.tree_leaves(params))


def _collect_uses(closed: ClosedJaxpr, alias: dict, uses: dict) -> None:
    """``uses[leaf]``: every ``(eqn, operand position)`` reading the leaf (``(None, None)`` when it
    is returned), through the followed sub-jaxprs."""
    jaxpr = closed.jaxpr
    for eqn in jaxpr.eqns:
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            inner = {
                iv: alias[ov]
                for ov, iv in zip(eqn.invars, sub.jaxpr.invars)
                if is_var(ov) and ov in alias
            }
            _collect_uses(sub, inner, uses)
            continue
        for pos, v in enumerate(eqn.invars):
            if is_var(v) and v in alias:
                uses.setdefault(alias[v], []).append((eqn, pos))
    for v in jaxpr.outvars:
        if is_var(v) and v in alias:
            uses.setdefault(alias[v], []).append((None, None))


def _layout(eqn, pos: int) -> dict | None:
    """The layout of ``dot_general`` ``eqn`` when its operand ``pos`` is a weight it can factor
    (some dims contracted, no batch dims); else None."""
    if eqn is None or eqn.primitive is not lax.dot_general_p or pos not in (0, 1):
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    w, a = eqn.invars[pos], eqn.invars[1 - pos]
    wc = tuple(int(d) for d in (lc, rc)[pos])
    ac = tuple(int(d) for d in (lc, rc)[1 - pos])
    if not wc:
        return None
    w_shape = tuple(int(n) for n in w.aval.shape)
    prod = lambda dims, shape: int(np.prod([shape[d] for d in dims], dtype=np.int64))  # noqa: E731
    a_free = tuple(d for d in range(len(a.aval.shape)) if d not in ac)
    return dict(
        positions=prod(a_free, a.aval.shape),
        d_in=prod(wc, w_shape),
        d_out=prod([d for d in range(len(w_shape)) if d not in wc], w_shape),
        w_side=pos,
        w_shape=w_shape,
        w_contract=wc,
        a_perm=a_free + ac,
        out_shape=tuple(eqn.outvars[0].aval.shape),
        dtype=np.dtype(eqn.outvars[0].aval.dtype),
    )


def dense_layers(f, params, x) -> tuple[DenseLayer, ...]:
    """The parameter leaves of ``f(params, x)`` used only as the weight of one dense
    ``dot_general``, with their layout at the shape of ``x`` (the other leaves are "rest").

    Args:
      f: ``f(params, x) -> output``.
      params: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
      x: one input at the shape it will be evaluated at (batch included).
    """
    closed, n_leaves = _trace(f, params, x)
    alias = {v: k for k, v in enumerate(closed.jaxpr.invars[:n_leaves])}
    uses: dict = {}
    _collect_uses(closed, alias, uses)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    out = []
    for k in range(n_leaves):
        found = uses.get(k, [])
        if len(found) != 1:
            continue
        lay = _layout(*found[0])
        if lay is not None:
            out.append(DenseLayer(leaf=k, path=paths[k], **lay))
    return tuple(out)


def split_leaves(f, params, xs) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(factored, rest)`` leaf indices: the leaves that are a dense layer's weight at the shape
    of every input in ``xs`` (a sequence of inputs), and the others."""
    n = len(jax.tree_util.tree_leaves(params))
    common = set(range(n))
    for x in xs:
        common &= {lay.leaf for lay in dense_layers(f, params, x)}
    factored = tuple(sorted(common))
    return factored, tuple(k for k in range(n) if k not in common)


def _layers_for(f, params, x, leaves) -> tuple[ClosedJaxpr, int, dict]:
    closed, n_leaves = _trace(f, params, x)
    alias = {v: k for k, v in enumerate(closed.jaxpr.invars[:n_leaves])}
    uses: dict = {}
    _collect_uses(closed, alias, uses)
    by_leaf = {}
    for k in leaves:
        found = uses.get(k, [])
        lay = _layout(*found[0]) if len(found) == 1 else None
        if lay is None:
            raise ValueError(f"parameter leaf {k} is not a dense layer's weight at this input")
        by_leaf[k] = lay
    return closed, n_leaves, by_leaf


def tap_shapes(f, params, x, leaves) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The shape ``(S, d_out)`` and dtype of each leaf's tap (the order of ``leaves``)."""
    by_leaf = _layers_for(f, params, x, leaves)[2]
    return tuple(
        jax.ShapeDtypeStruct((by_leaf[k]["positions"], by_leaf[k]["d_out"]), by_leaf[k]["dtype"])
        for k in leaves
    )


def zero_taps(f, params, x, leaves) -> tuple:
    """Zeros of :func:`tap_shapes`: the point at which the taps are differentiated."""
    return tuple(jnp.zeros(s.shape, s.dtype) for s in tap_shapes(f, params, x, leaves))


def apply_tapped(f, params, x, taps, leaves) -> tuple[Any, tuple]:
    """``f(params, x)`` with ``taps[i]`` ``(S, d_out)`` added to the output of the dense layer of
    ``leaves[i]``: ``(output, acts)``, ``acts[i]`` ``(S, d_in)`` that layer's input activations.

    At zero taps the output equals ``f(params, x)``, and the cotangent of ``taps[i]`` is the
    layer's ``δ`` ``(S, d_out)``: with ``acts[i]`` the factors of the weight's gradient,
    ``g = actsᵀ δ`` up to the weight's orientation."""
    closed, n_leaves, by_leaf = _layers_for(f, params, x, leaves)
    if len(taps) != len(leaves):
        raise ValueError(f"{len(taps)} taps for {len(leaves)} leaves")
    tap_of = dict(zip(leaves, taps))
    acts: dict = {}
    args = jax.tree_util.tree_leaves(params) + jax.tree_util.tree_leaves(x)
    alias = {v: k for k, v in enumerate(closed.jaxpr.invars[:n_leaves]) if k in tap_of}
    outs = _eval(closed, args, alias, tap_of, by_leaf, acts)
    tree = jax.tree_util.tree_structure(jax.eval_shape(f, params, x))
    return jax.tree_util.tree_unflatten(tree, outs), tuple(acts[k] for k in leaves)


def _eval(closed: ClosedJaxpr, args, alias, tap_of, by_leaf, acts) -> list:
    jaxpr = closed.jaxpr
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, val in zip(jaxpr.constvars, closed.consts):
        env[v] = val
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        inner = (
            {}
            if sub is None
            else {
                iv: alias[ov]
                for ov, iv in zip(eqn.invars, sub.jaxpr.invars)
                if is_var(ov) and ov in alias
            }
        )
        tapped = []
        if eqn.primitive is lax.dot_general_p:
            tapped = [alias[v] for v in eqn.invars if is_var(v) and v in alias]
        if inner:  # a call that holds a tapped layer: evaluated here, inline
            ans = _eval(sub, invals, inner, tap_of, by_leaf, acts)
        else:
            ans = bind_eqn(eqn, invals)
        if tapped:
            k = tapped[0]
            lay = by_leaf[k]
            a = invals[1 - lay["w_side"]]
            acts[k] = jnp.transpose(a, lay["a_perm"]).reshape(lay["positions"], lay["d_in"])
            tap = tap_of[k]
            tap = tap if lay["w_side"] == 1 else tap.T
            ans = ans + tap.reshape(lay["out_shape"]).astype(ans.dtype)
        if eqn.primitive.multiple_results:
            for v, val in zip(eqn.outvars, ans):
                env[v] = val
        else:
            env[eqn.outvars[0]] = ans
    return [read(v) for v in jaxpr.outvars]


def weight_grad(layer: DenseLayer, acts, deltas):
    """``Σ_s a_s δ_sᵀ`` from one example's factors ``acts (S, d_in)``, ``deltas (S, d_out)``, in
    the weight's own layout ``layer.w_shape`` (the weight's gradient)."""
    g = acts.T @ deltas
    free = tuple(d for d in range(len(layer.w_shape)) if d not in layer.w_contract)
    order = layer.w_contract + free
    g = g.reshape(tuple(layer.w_shape[d] for d in order))
    return jnp.transpose(g, tuple(int(i) for i in np.argsort(order)))
