"""Structured Jacobians: Dense and Embedding parameters as ``J = x ⊗ δ`` (no per-parameter rows).

A parameter ``W`` used once, as one operand of a ``dot_general`` (Dense, DenseGeneral, attention
projections, any ``x @ W``) or as the table of an embedding ``gather``, has the Jacobian
``∂z_r/∂W = Σ_s x_s ⊗ δ_{r,s}`` where ``x_s`` is the other operand at site position ``s`` and
``δ_{r,s} = ∂z_r/∂y_s`` the cotangent of the layer's output. So
``K_W[r_o, r_u] = Σ_{s,s'} ⟨x_o,s, x_u,s'⟩ ⟨δ_o,r_o,s, δ_u,r_u,s'⟩`` needs only activations and
output cotangents — the idea of neural-tangents' structured derivatives. The sites are found by
reading the model's jaxpr, so nothing here knows which model it looks at; every other parameter
(biases, norms, convolutions, tied weights, parameters inside scans or custom rules) falls back
to its plain Jacobian rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "remat2")
"""Call primitives whose sub-jaxpr is followed (their arguments map 1-1 onto its inputs)."""


@dataclasses.dataclass(frozen=True)
class Site:
    """One structured use of a parameter leaf.

    Attributes:
      leaf: index of the parameter leaf (tree_leaves order).
      path: equation indices from the top jaxpr through inlined calls to the site.
      kind: ``"dot"`` or ``"gather"``.
      x_index: operand index of the activation (the non-parameter operand).
      x_perm: permutation of the activation's axes to ``(free..., contracting...)``.
      n_x_free: number of free (site-position) axes of the activation.
      out_perm: permutation of the output's axes to ``(activation-free..., parameter-free...)``.
      vocab: table size for ``"gather"`` sites (the one-hot width), else 0.
      bias: leaf index of a bias added right after the product (``y = x W + b``), else -1. Its
        Jacobian is ``Σ_s δ_s``, so it joins the site as one more activation column of ones.
      w_contract: the parameter's contracting axes (``"dot"`` sites).
    """

    leaf: int
    path: tuple
    kind: str
    x_index: int
    x_perm: tuple
    n_x_free: int
    out_perm: tuple
    vocab: int = 0
    bias: int = -1
    w_contract: tuple = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which parameter leaves are structured (one site each) and which fall back to rows."""

    sites: tuple
    fallback: tuple
    n_leaves: int

    @property
    def structured(self) -> tuple:
        return tuple(s.leaf for s in self.sites)


def _inner(eqn):
    j = eqn.params.get("jaxpr", None)
    if j is None:
        return None, ()
    if hasattr(j, "jaxpr"):  # ClosedJaxpr
        return j.jaxpr, tuple(j.consts)
    return j, ()


def is_var(v) -> bool:
    """A jaxpr variable, not a literal."""
    return not isinstance(v, jcore.Literal)


def _dot_site(eqn, k: int, leaf: int, path: tuple):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    x_index = 1 - k
    x_aval = eqn.invars[x_index].aval
    w_aval = eqn.invars[k].aval
    x_con = tuple(lc if x_index == 0 else rc)
    w_con = tuple(rc if x_index == 0 else lc)
    x_free = tuple(d for d in range(x_aval.ndim) if d not in x_con)
    w_free = tuple(d for d in range(w_aval.ndim) if d not in w_con)
    nx, nw = len(x_free), len(w_free)
    if x_index == 0:  # out = (x_free..., w_free...)
        out_perm = tuple(range(nx + nw))
    else:  # out = (w_free..., x_free...)
        out_perm = tuple(range(nw, nw + nx)) + tuple(range(nw))
    return Site(leaf, path, "dot", x_index, x_free + x_con, nx, out_perm, w_contract=w_con)


def _gather_site(eqn, leaf: int, path: tuple):
    dn = eqn.params["dimension_numbers"]
    op = eqn.invars[0].aval
    idx = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    if op.ndim != 2 or idx.shape[-1:] != (1,):
        return None
    if (
        tuple(dn.offset_dims) != (out.ndim - 1,)
        or tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(getattr(dn, "operand_batching_dims", ())) != ()
        or tuple(eqn.params["slice_sizes"]) != (1, op.shape[1])
    ):
        return None
    n_free = out.ndim - 1
    return Site(
        leaf,
        path,
        "gather",
        1,
        tuple(range(idx.ndim)),
        n_free,
        tuple(range(out.ndim)),
        vocab=int(op.shape[0]),
    )


_RESHAPES = ("reshape", "broadcast_in_dim", "convert_element_type", "expand_dims")


def _bias_fits(site: Site, y_aval, b_aval, leaf_shape) -> bool:
    """A 1-D bias of the product's output width, broadcast over the site positions only."""
    if site.kind != "dot" or site.x_index != 0 or len(leaf_shape) != 1:
        return False
    nx = site.n_x_free
    w_free = tuple(y_aval.shape[nx:])
    if int(np.prod(w_free, dtype=np.int64)) != leaf_shape[0] or len(w_free) != 1:
        return False
    shp = tuple(b_aval.shape)
    return shp[-1:] == w_free and all(d == 1 for d in shp[:-1])


def _walk(
    jaxpr, alias: dict, path: tuple, uses: list, cands: dict, leaf_shapes=None, bias: dict = None
) -> None:
    bias = {} if bias is None else bias
    consumers: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if is_var(v):
                consumers[v] = consumers.get(v, 0) + 1
    for v in jaxpr.outvars:
        if is_var(v):
            consumers[v] = consumers.get(v, 0) + 1
    bias_alias: dict = {}  # var -> leaf: a reshaped/broadcast 1-D parameter, use not yet counted
    site_out: dict = {}  # var -> site: output of a candidate dot site
    for i, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        ins = [(k, alias[v]) for k, v in enumerate(eqn.invars) if is_var(v) and v in alias]
        bins = [
            (k, bias_alias[v]) for k, v in enumerate(eqn.invars) if is_var(v) and v in bias_alias
        ]
        if not ins and not bins:
            continue
        if name in _RESHAPES and len(eqn.invars) == 1 and (ins or bins):
            leaf = (ins or bins)[0][1]
            if name == "convert_element_type" and ins:
                alias[eqn.outvars[0]] = leaf
            elif leaf_shapes is not None and len(leaf_shapes[leaf]) == 1:
                bias_alias[eqn.outvars[0]] = leaf
            else:
                uses[leaf] += 1
            continue
        if name == "add" and len(bins) == 1 and not ins and len(eqn.invars) == 2:
            k, leaf = bins[0]
            y = eqn.invars[1 - k]
            site = site_out.get(y) if is_var(y) else None
            if (
                site is not None
                and consumers.get(y, 0) == 1
                and leaf_shapes is not None
                and _bias_fits(site, y.aval, eqn.invars[k].aval, leaf_shapes[leaf])
            ):
                uses[leaf] += 1
                bias.setdefault(leaf, []).append(site.path)
                continue
        for _, leaf in bins:  # any other use of a reshaped parameter: no structure
            uses[leaf] += 1
        if not ins:
            continue
        inner, _ = _inner(eqn) if name in CALLS else (None, ())
        if inner is not None:
            inner_alias = {inner.invars[k]: leaf for k, leaf in ins}
            _walk(inner, inner_alias, path + (i,), uses, cands, leaf_shapes, bias)
            for ov in inner.outvars:
                if is_var(ov) and ov in inner_alias:  # a parameter leaves the call: no structure
                    uses[inner_alias[ov]] += 2
            continue
        site = None
        if name == "dot_general" and len(ins) == 1:
            site = _dot_site(eqn, ins[0][0], ins[0][1], path + (i,))
        elif name == "gather" and len(ins) == 1 and ins[0][0] == 0:
            site = _gather_site(eqn, ins[0][1], path + (i,))
        for _, leaf in ins:
            uses[leaf] += 1
        if site is not None:
            cands.setdefault(site.leaf, []).append(site)
            site_out[eqn.outvars[0]] = site
    for ov in jaxpr.outvars:
        if is_var(ov) and ov in alias:
            uses[alias[ov]] += 2
        if is_var(ov) and ov in bias_alias:
            uses[bias_alias[ov]] += 2


def make_plan(closed_jaxpr, n_leaves: int, structured: bool = True, demote=()) -> Plan:
    """Reads a jaxpr whose first ``n_leaves`` inputs are the parameter leaves; the leaves in
    ``demote`` are kept as plain Jacobian rows (fallback) even where they could be sites or
    biases."""
    if not structured:
        return Plan((), tuple(range(n_leaves)), n_leaves)
    jaxpr = closed_jaxpr.jaxpr
    alias = {jaxpr.invars[i]: i for i in range(n_leaves)}
    leaf_shapes = [tuple(jaxpr.invars[i].aval.shape) for i in range(n_leaves)]
    uses = [0] * n_leaves
    cands: dict = {}
    bias: dict = {}
    _walk(jaxpr, alias, (), uses, cands, leaf_shapes, bias)
    sites = [
        cands[l][0]
        for l in range(n_leaves)
        if uses[l] == 1 and len(cands.get(l, ())) == 1 and l not in demote
    ]
    by_path = {s.path: k for k, s in enumerate(sites)}
    for leaf, paths in bias.items():
        if uses[leaf] == 1 and len(paths) == 1 and paths[0] in by_path and leaf not in demote:
            k = by_path[paths[0]]
            sites[k] = dataclasses.replace(sites[k], bias=leaf)
    done = {s.leaf for s in sites} | {s.bias for s in sites if s.bias >= 0}
    return Plan(tuple(sites), tuple(l for l in range(n_leaves) if l not in done), n_leaves)


def bind_eqn(eqn, invals):
    """``eqn``'s primitive on ``invals`` (jax 0.10: ``get_bind_params`` gives the params; older
    versions ``(subfuns, params)``)."""
    bp = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bp, tuple):  # older jax: (subfuns, params)
        subfuns, bp = bp
        return eqn.primitive.bind(*subfuns, *invals, **bp)
    return eqn.primitive.bind(*invals, **bp)


def _site_x(site: Site, invals) -> jax.Array:
    x = invals[site.x_index]
    if site.kind == "gather":
        idx = x[..., 0]
        oh = jax.nn.one_hot(idx, site.vocab, dtype=invals[0].dtype)
        return oh.reshape(-1, site.vocab)
    x = jnp.transpose(x, site.x_perm)
    s = int(np.prod(x.shape[: site.n_x_free], dtype=np.int64))
    x = x.reshape(s, -1)
    if site.bias >= 0:
        x = jnp.concatenate([x, jnp.ones((s, 1), x.dtype)], axis=1)
    return x


def evaluate(closed_jaxpr, args: Sequence[Any], plan: Plan, eps: Sequence[jax.Array]):
    """Evaluates the jaxpr adding ``eps[k]`` to site k's output; returns ``(outs, xs)``."""
    site_at = {s.path: k for k, s in enumerate(plan.sites)}
    inline = {s.path[:j] for s in plan.sites for j in range(1, len(s.path))}
    xs: list = [None] * len(plan.sites)

    def run(jaxpr, consts, vals, path):
        env = {}
        read = lambda v: v.val if not is_var(v) else env[v]
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a in zip(jaxpr.invars, vals):
            env[v] = a
        for i, eqn in enumerate(jaxpr.eqns):
            p = path + (i,)
            invals = [read(v) for v in eqn.invars]
            if p in site_at:
                k = site_at[p]
                xs[k] = _site_x(plan.sites[k], invals)
                outs = [bind_eqn(eqn, invals) + eps[k]]
            elif p in inline:
                inner, consts_i = _inner(eqn)
                outs = run(inner, consts_i, invals, p)
            else:
                outs = bind_eqn(eqn, invals)
                if not eqn.primitive.multiple_results:
                    outs = [outs]
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    outs = run(closed_jaxpr.jaxpr, closed_jaxpr.consts, list(args), ())
    return outs, xs


def site_shapes(closed_jaxpr, plan: Plan) -> list:
    """Output avals of each site (the shape of its ``eps``)."""
    out = []
    for s in plan.sites:
        jaxpr = closed_jaxpr.jaxpr
        for j in s.path[:-1]:
            jaxpr, _ = _inner(jaxpr.eqns[j])
        out.append(jaxpr.eqns[s.path[-1]].outvars[0].aval)
    return out


def site_dims(closed_jaxpr, plan: Plan) -> list:
    """``(S, C, F)`` per site: site positions, activation width, output width."""
    dims = []
    for s, aval in zip(plan.sites, site_shapes(closed_jaxpr, plan)):
        shp = [aval.shape[d] for d in s.out_perm]
        S = int(np.prod(shp[: s.n_x_free], dtype=np.int64))
        F = int(np.prod(shp[s.n_x_free :], dtype=np.int64))
        jaxpr = closed_jaxpr.jaxpr
        for j in s.path[:-1]:
            jaxpr, _ = _inner(jaxpr.eqns[j])
        xa = jaxpr.eqns[s.path[-1]].invars[s.x_index].aval
        if s.kind == "gather":
            C = s.vocab
        else:
            C = int(np.prod([xa.shape[d] for d in s.x_perm[s.n_x_free :]], dtype=np.int64))
            C += 1 if s.bias >= 0 else 0
        dims.append((S, C, F))
    return dims


_ORDER_KEEPING = ("reshape", "squeeze", "convert_element_type", "copy", "copy_p")


def head_site(closed_jaxpr, plan: Plan) -> int:
    """The site that computes the logits directly, else ``-1``.

    That is a ``dot`` site ``y = x W`` (``x (..., C)``, ``W (C, V)``, its bias folded in or none)
    whose output reaches the jaxpr's only output through order-keeping reshapes alone, so that
    ``z_p = W̃ᵀ x̃_p`` at every output position ``p``. Then every other parameter's Jacobian row
    for logit ``i`` is ``Σ_c W[c, i] ∂x_c/∂θ``: its K block is ``Wᵀ K_x W`` with ``K_x`` the
    ``C × C`` kernel of the head's input, the saving ``ntk`` makes when ``C < V``.
    """
    jaxpr = closed_jaxpr.jaxpr
    if len(jaxpr.outvars) != 1:
        return -1
    by_path = {s.path: k for k, s in enumerate(plan.sites)}
    v, path, cur = jaxpr.outvars[0], (), jaxpr
    bias_add = None
    while is_var(v):
        found = [(i, e) for i, e in enumerate(cur.eqns) if v in e.outvars]
        if not found:
            return -1
        i, eqn = found[0]
        name = eqn.primitive.name
        k = by_path.get(path + (i,))
        if k is not None:
            s = plan.sites[k]
            w = eqn.invars[1].aval
            x = eqn.invars[0].aval
            ok = (
                s.kind == "dot"
                and s.x_index == 0
                and w.ndim == 2
                and tuple(s.x_perm) == tuple(range(x.ndim))
                and (bias_add is None) == (s.bias < 0)
            )
            return k if ok else -1
        if name in _ORDER_KEEPING and len(eqn.invars) == 1:
            v = eqn.invars[0]
        elif name == "slice" and eqn.outvars[0].aval.size == eqn.invars[0].aval.size:
            v = eqn.invars[0]
        elif name == "add" and bias_add is None:
            prods = [
                a
                for a in eqn.invars
                if is_var(a)
                and any(path + (j,) in by_path and a in e.outvars for j, e in enumerate(cur.eqns))
            ]
            if len(prods) != 1:
                return -1
            bias_add, v = eqn, prods[0]
        elif name in CALLS:
            inner, _ = _inner(eqn)
            if inner is None:
                return -1
            v, path, cur = inner.outvars[eqn.outvars.index(v)], path + (i,), inner
        else:
            return -1
    return -1
