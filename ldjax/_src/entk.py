"""K(x_o, x_u) = ∇θz(x_o) ∇θz(x_u)ᵀ: exact empirical-NTK blocks of the logit network
(Ren & Sutherland, arXiv 2407.10490, §2–3.1).

Three implementations compute the same unnormalised ``J_o J_uᵀ``:

* ``"jacobian"``: Jacobian rows by ``jax.jacrev``, contracted over every parameter.
* ``"vp"``: NTK-vector products — one VJP per row of ``x_u`` and a JVP through ``x_o``.
* ``"structured"``: Dense/Embedding parameters as ``x ⊗ δ`` (see ``ldjax._src.structured``); the
  rest falls back to Jacobian rows.
* ``"auto"``: the cheapest of the three by a FLOP model (:func:`cost`).

Reductions (none divides by V; neural-tangents' default ``trace_axes=(-1,)`` does):

* ``"full"``: ``(N_o, N_u, V, V)``; sequences ``(N_o, N_u, M, L, V, V)``.
* ``"diagonal"``: ``K[..., i, i]``, ``(N_o, N_u, V)`` / ``(N_o, N_u, M, L, V)``.
* ``"trace"``: ``Σ_i K[..., i, i]``, ``(N_o, N_u)`` / ``(N_o, N_u, M, L)`` (the traced map).
* ``"sum_logits"``: the pNTK ``(Σ_i ∇z_i)(Σ_j ∇z_j)ᵀ``, ``(N_o, N_u)`` / ``(N_o, N_u, M, L)``.

Sequence models return ``(N, T, V)`` logits; ``mask_o (N_o, T)`` / ``mask_u (N_u, T)`` select the
positions (response tokens): ``m`` indexes the m-th selected position of each example, ``M`` is
the largest count, and entries past an example's count are zero.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ldjax._src import validate
from ldjax._src.structured import evaluate as evaluate_sites
from ldjax._src.structured import head_site, make_plan, site_dims, site_shapes
from ldjax._src.trainable import trainable_fn

IMPLEMENTATIONS = ("jacobian", "vp", "structured")
REDUCTIONS = ("full", "diagonal", "trace", "sum_logits")
DEFAULT_MEMORY_BUDGET = 4 * 2**30


# ----------------------------------------------------------------------------- per-example pieces


def _example_fn(f, treedef):
    """``f1(leaves, x1) -> (P, V)`` for one example ``x1`` (no batch axis)."""

    def f1(leaves, x1):
        out = f(
            jax.tree_util.tree_unflatten(treedef, leaves),
            jax.tree_util.tree_map(lambda a: a[None], x1),
        )[0]
        return out.reshape(-1, out.shape[-1])

    return f1


def logit_rows(out, pos, valid, reduction):
    """Selected output rows ``(M, V')`` of one example's ``(P, V)`` logits."""
    r = out[pos] * valid[:, None].astype(out.dtype)
    if reduction == "sum_logits":
        r = jnp.sum(r, axis=-1, keepdims=True)
    return r


def trace_example(apply_fn, variables, x, structured, demote=()):
    f, params = trainable_fn(apply_fn, variables)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    f1 = _example_fn(f, treedef)
    x0 = jax.tree_util.tree_map(lambda a: a[0], x)
    closed = jax.make_jaxpr(f1)(leaves, x0)
    plan = make_plan(closed, len(leaves), structured, demote)
    return f1, leaves, closed, plan


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _features(apply_fn, structured, reduction, head, demote, variables, x, pos, valid):
    """Row features of a chunk of examples.

    Returns ``(J, D, X, H)``: fallback Jacobian rows ``[(n, M, V', p)]``, site cotangents
    ``[(n, M, V', S, F)]``, site activations ``[(n, S, C)]`` and, with a ``head`` site (its index,
    else -1), that site's input rows ``H (n, M, C̃)``. With a head the rows are not the logits but
    the head's input ``x (M, C)``: then ``V' = C`` and the head site itself has no D or X.
    """
    _, leaves, closed, plan = trace_example(apply_fn, variables, x, structured, demote)
    shapes = site_shapes(closed, plan)
    fb = plan.fallback
    keep = [k for k in range(len(plan.sites)) if k != head]

    def per_example(x1, pos1, valid1):
        xl = jax.tree_util.tree_leaves(x1)

        def g(fb_vals, eps):
            ls = list(leaves)
            for k, l in enumerate(fb):
                ls[l] = fb_vals[k]
            full = [jnp.zeros(a.shape, a.dtype) for a in shapes]
            for k, e in zip(keep, eps):
                full[k] = e
            outs, xs = evaluate_sites(closed, ls + xl, plan, full)
            if head < 0:
                return logit_rows(outs[0], pos1, valid1, reduction), (xs, None)
            h = xs[head][pos1] * valid1[:, None].astype(xs[head].dtype)  # (M, C̃)
            c = _head_width(plan.sites[head], h)
            return h[:, :c], ([xs[k] for k in keep], h)

        eps0 = [jnp.zeros(shapes[k].shape, shapes[k].dtype) for k in keep]
        (J, D), (xs, h) = jax.jacrev(g, argnums=(0, 1), has_aux=True)([leaves[l] for l in fb], eps0)
        J = [j.reshape(j.shape[:2] + (-1,)) for j in J]
        Ds = []
        for k, d in zip(keep, D):
            s = plan.sites[k]
            d = jnp.transpose(d, (0, 1) + tuple(2 + a for a in s.out_perm))
            shp = d.shape[2:]
            S = int(np.prod(shp[: s.n_x_free], dtype=np.int64))
            Ds.append(d.reshape(d.shape[:2] + (S, -1)))
        return J, Ds, xs, h

    return jax.vmap(per_example)(x, pos, valid)


def _head_width(site, h):
    """C, the head's input width (``h`` has one more column when the bias is folded in)."""
    return h.shape[-1] - (1 if site.bias >= 0 else 0)


def _head_matrix(apply_fn, variables, site):
    """The head's ``W (C, V)``: the site's parameter leaf, contracting axis first."""
    w = jax.tree_util.tree_leaves(trainable_fn(apply_fn, variables)[1])[site.leaf]
    return w if site.w_contract == (0,) else w.T


# The "gram" order (⟨x_o,s, x_u,t⟩ first, then two batched products over the cotangents) runs at
# less than half the FLOP rate of the "jac" order's one 2-D GEMM over C·F: measured side by side
# on the 2-core CPU for the benchmark transformer's sites (S = 64, C = 129, F = 128 / 512, 8
# sequences): 9-10 against 20-23 GFLOP/s under the same load. So gram FLOPs count 2.5× when
# choosing.
GRAM_RATE_PENALTY = 2.5


def _site_orders(dims, n_o, n_u, m, l, vp, diag, budget_floats=None):
    """Per site, ``"gram"`` (contract activations first) or ``"jac"`` (build x ⊗ δ), by FLOPs
    weighted by their rate (:data:`GRAM_RATE_PENALTY`); ``"jac"`` only where its per-row
    Jacobians ``(n_o·m + n_u·l)·vp·C·F`` floats fit ``budget_floats`` (None: no limit)."""
    orders = []
    for S, C, F in dims:
        if S == 1:
            orders.append("pair")
            continue
        out = m * l * vp * (1 if diag else vp)
        gram = GRAM_RATE_PENALTY * n_o * n_u * (S * S * C + S * S * l * vp * F + out * S * F)
        jac = (n_o * m + n_u * l) * vp * S * C * F + n_o * n_u * out * C * F
        fits = budget_floats is None or (n_o * m + n_u * l) * vp * C * F <= budget_floats
        orders.append("gram" if gram <= jac or not fits else "jac")
    return tuple(orders)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _contract(reduction, orders, batches, fo, fu):
    """K block ``(n_o, n_u, M, L, V', V')`` (or ``(..., V')`` for the diagonal reductions).

    ``orders`` picks per site how to contract (:func:`_site_orders`); ``batches`` how many x_o
    examples share one "gram" intermediate (memory).
    """
    Jo, Do, Xo = fo[:3]
    Ju, Du, Xu = fu[:3]
    diag = reduction in ("diagonal", "trace")
    K = 0.0
    for jo, ju in zip(Jo, Ju):
        K = K + jnp.einsum("omip,ulip->oumli" if diag else "omip,uljp->oumlij", jo, ju)
    for do, xo, du, xu, order, batch in zip(Do, Xo, Du, Xu, orders, batches):
        if order == "pair":  # one site position (a plain Dense layer): ⟨x_o,x_u⟩ ⟨δ_o,δ_u⟩
            X = jnp.einsum("oc,uc->ou", xo[:, 0], xu[:, 0])
            P = jnp.einsum(
                "omif,ulif->oumli" if diag else "omif,uljf->oumlij", do[..., 0, :], du[..., 0, :]
            )
            K = K + P * X.reshape(X.shape + (1,) * (P.ndim - 2))
        elif order == "gram":  # ⟨x_o,s, x_u,t⟩ first, then the cotangents
            X = jnp.einsum("osc,utc->oust", xo, xu)

            def one(args, du=du):
                x_o, d_o = args
                Z = jnp.einsum("ust,uljtf->usljf", x_o, du)
                return jnp.einsum("misf,uslif->umli" if diag else "misf,usljf->umlij", d_o, Z)

            if batch >= X.shape[0]:
                K = K + jax.vmap(one)((X, do))
            else:
                K = K + jax.lax.map(one, (X, do), batch_size=batch)
        else:  # build the per-row Jacobians x ⊗ δ
            jo = jnp.einsum("osc,omisf->omicf", xo, do)
            ju = jnp.einsum("utc,ulitf->ulicf", xu, du)
            if diag:
                K = K + jnp.einsum("omicf,ulicf->oumli", jo, ju)
            else:  # one 2-D GEMM (rows_o, C·F) @ (C·F, rows_u): XLA's einsum is slower here
                (o, m, i), (u, l, j) = jo.shape[:3], ju.shape[:3]
                k2 = jo.reshape(o * m * i, -1) @ ju.reshape(u * l * j, -1).T
                K = K + k2.reshape(o, m, i, u, l, j).transpose(0, 3, 1, 4, 2, 5)
    if reduction == "trace":
        K = jnp.sum(K, axis=-1)
    elif reduction == "sum_logits":
        K = K[..., 0, 0]
    return K


def _head_rows(apply_fn, variables, x, head):
    """``rows(p, x, pos, valid) -> (n, M, C̃)``: the head site's input rows at the selected
    positions (with the bias column when the head has a bias), from the per-example jaxpr."""
    _, _, closed, plan = trace_example(apply_fn, variables, x, True)
    shapes = site_shapes(closed, plan)

    def rows(p, x, pos, valid):
        ls = jax.tree_util.tree_leaves(p)

        def one(x1, pos1, valid1):
            eps = [jnp.zeros(a.shape, a.dtype) for a in shapes]
            _, xs = evaluate_sites(closed, ls + jax.tree_util.tree_leaves(x1), plan, eps)
            return xs[head][pos1] * valid1[:, None].astype(xs[head].dtype)

        return jax.vmap(one)(x, pos, valid)

    return rows


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _vp_block(
    apply_fn, reduction, head, variables, xo, pos_o, valid_o, xu, pos_u, valid_u, pre=None, w=None
):
    """K block by NTK-vector products: a VJP per row of x_u, then one JVP over x_o (``pre``: the
    VJP's output times the preconditioner). With a ``head`` site (its index, else -1; ``w`` its
    ``(C, V)`` matrix) the rows are the head's ``C`` inputs, ``K = Wᵀ K_x W + ⟨x̃_o, x̃_u⟩ I``
    (:func:`_contract_any`): C VJPs per position instead of V."""
    f, params = trainable_fn(apply_fn, variables)

    if head < 0:

        def rows(p, x, pos, valid):
            out = f(p, x)
            out = out.reshape(out.shape[0], -1, out.shape[-1])
            return jax.vmap(lambda o, q, v: logit_rows(o, q, v, reduction))(out, pos, valid)

    else:
        head_rows = _head_rows(apply_fn, variables, xo, head)
        c = w.shape[0]
        rows = lambda p, x, pos, valid: head_rows(p, x, pos, valid)[..., :c]

    _, jvp_o = jax.linearize(lambda p: rows(p, xo, pos_o, valid_o), params)

    def one_u(args):
        x1, q1, v1 = args
        x1 = jax.tree_util.tree_map(lambda a: a[None], x1)
        out, vjp1 = jax.vjp(lambda p: rows(p, x1, q1[None], v1[None])[0], params)
        basis = jnp.eye(out.size, dtype=out.dtype).reshape((out.size,) + out.shape)
        g = jax.vmap(lambda c: vjp1(c)[0])(basis)
        if pre is not None:
            g = jax.tree_util.tree_map(lambda a, q: a * q.astype(a.dtype), g, pre)
        cols = jax.vmap(jvp_o)(g)  # (L*V', n_o, M, V')
        return cols.reshape(out.shape + cols.shape[1:])  # (L, V', n_o, M, V')

    cols = jax.lax.map(one_u, (xu, pos_u, valid_u))  # (n_u, L, V', n_o, M, V')
    K = jnp.transpose(cols, (3, 0, 4, 1, 5, 2))  # (o, u, m, l, i, j)
    if head >= 0:  # K_x of the head's input -> K of the logits (reduction "full")
        k = jnp.einsum("oumlab,bj->oumlaj", K, w)
        k = jnp.einsum("oumlaj,ai->oumlij", k, w)
        xh = jnp.einsum(
            "omc,ulc->ouml",
            head_rows(params, xo, pos_o, valid_o),
            head_rows(params, xu, pos_u, valid_u),
        )
        return k + xh[..., None, None] * jnp.eye(w.shape[1], dtype=k.dtype)
    if reduction in ("diagonal", "trace"):
        K = jnp.diagonal(K, axis1=4, axis2=5)
        if reduction == "trace":
            K = jnp.sum(K, axis=-1)
    elif reduction == "sum_logits":
        K = K[..., 0, 0]
    return K


def _contract_any(reduction, orders, batches, w, fo, fu):
    """:func:`_contract`, or with a head ``w (C, V)``: ``K = Wᵀ K_x W + ⟨x̃_o, x̃_u⟩ I``.

    ``K_x (n_o, n_u, M, L, C, C)`` is the kernel of the head's input over every other parameter;
    the second term is the head's own block (``J = x̃ ⊗ e_i`` at the row's position).
    """
    if w is None:
        return _contract(reduction, orders, batches, fo, fu)
    kx = _contract("full", orders, batches, fo, fu)
    k = jnp.einsum("oumlab,bj->oumlaj", kx, w)
    k = jnp.einsum("oumlaj,ai->oumlij", k, w)
    xh = jnp.einsum("omc,ulc->ouml", fo[3], fu[3])
    return k + xh[..., None, None] * jnp.eye(w.shape[1], dtype=k.dtype)


def _precondition(fo, scales):
    """The o-side features of ``J_o diag(p) J_uᵀ``: fallback rows times ``p`` (flattened), site
    cotangents and the head's input rows times their leaf's constant ``p``. ``scales`` is
    ``(row_scales, site_constants, head_constant)`` (None: no preconditioner)."""
    if scales is None:
        return fo
    rows, consts, head_c = scales
    J, D, X, H = fo
    J = [j * r.astype(j.dtype) for j, r in zip(J, rows)]
    D = [d * jnp.asarray(c, d.dtype) for d, c in zip(D, consts)]
    H = None if H is None else H * jnp.asarray(head_c, H.dtype)
    return J, D, X, H


def _split(f, a, b):
    """Examples ``a:b`` of a chunk's features ``(J, D, X)``."""
    return jax.tree_util.tree_map(lambda t: t[a:b], f)


def _contract_symmetric(reduction, orders, batches, w, f, depth=2):
    """K(x, x) from one set of features, computing only the blocks on and above the diagonal.

    Splits the examples in two: ``K = [[K_aa, K_ab], [K_abᵀ, K_bb]]``, recursing ``depth`` times
    into the diagonal blocks, so the contraction does 5/8 of the work of the full product at
    depth 2 (3/4 at depth 1). ``K_ba`` is ``K_ab`` with (o, u), (m, l) and (i, j) swapped.
    """
    n = jax.tree_util.tree_leaves(f)[0].shape[0]
    if depth == 0 or n < 4:
        return _contract_any(reduction, orders, batches, w, f, f)
    h = n // 2
    fa, fb = _split(f, 0, h), _split(f, h, n)
    kaa = _contract_symmetric(reduction, orders, batches, w, fa, depth - 1)
    kbb = _contract_symmetric(reduction, orders, batches, w, fb, depth - 1)
    kab = _contract_any(reduction, orders, batches, w, fa, fb)
    top = jnp.concatenate([kaa, kab], axis=1)
    bottom = jnp.concatenate([_transpose_block(kab, reduction), kbb], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def _one_block(
    apply_fn,
    structured,
    reduction,
    head,
    demote,
    orders,
    batches,
    squeeze,
    variables,
    w,
    scales,
    xo,
    po,
    vo,
    xu=None,
    pu=None,
    vu=None,
):
    """Features and contraction of a single block in one XLA program (``xu`` None: K(x_o, x_o));
    ``w`` is the head's matrix (None without one), ``scales`` the preconditioner (None)."""
    fo = _features(apply_fn, structured, reduction, head, demote, variables, xo, po, vo)
    if xu is None:
        K = _contract_symmetric(reduction, orders, batches, w, fo)
    else:
        fu = _features(apply_fn, structured, reduction, head, demote, variables, xu, pu, vu)
        K = _contract_any(reduction, orders, batches, w, _precondition(fo, scales), fu)
    return K[:, :, 0, 0] if squeeze else K


# ----------------------------------------------------------------------------- planning


def position_index(mask, n, t):
    """``(pos (N, M) int32, valid (N, M) bool)`` from a ``(N, T)`` mask (None: all positions)."""
    if mask is None:
        return np.tile(np.arange(t, dtype=np.int32), (n, 1)), np.ones((n, t), bool)
    counts = mask.sum(axis=1)
    m = int(counts.max())
    pos = np.zeros((n, m), np.int32)
    valid = np.zeros((n, m), bool)
    for k in range(n):
        idx = np.flatnonzero(mask[k])
        pos[k, : idx.size] = idx
        valid[k, : idx.size] = True
    return pos, valid


def _jaxpr_flops(jaxpr) -> float:
    """Multiply-add FLOPs of the matrix products and convolutions in a jaxpr (calls included)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            k = np.prod([eqn.invars[0].aval.shape[d] for d in lc]) if lc else 1
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            out_ch = rhs[dn.rhs_spec[0]]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / max(out_ch, 1)
        for sub in jcore.jaxprs_in_params(eqn.params):
            total += _jaxpr_flops(sub)
    return total


class _Problem:
    """Shapes and the structured plan of one ``entk`` call (host-side, no FLOPs)."""

    _CACHE: dict = {}

    def __init__(self, apply_fn, variables, x_o, x_u, reduction, pos_o, pos_u, v, demote=()):
        f, params = trainable_fn(apply_fn, variables)
        # the key from shapes alone: slicing x_o[0] here would dispatch a device op per call
        x0 = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), x_o
        )
        key = (apply_fn, validate.avals_key(variables), validate.avals_key(x0), demote)
        self.demote = demote
        if key not in self._CACHE:
            if len(self._CACHE) > 64:
                self._CACHE.clear()
            _, leaves, closed, plan = trace_example(apply_fn, variables, x_o, True, demote)
            self._CACHE[key] = (
                plan,
                site_dims(closed, plan),
                [int(np.prod(np.shape(l))) for l in leaves],
                _jaxpr_flops(closed.jaxpr),
                head_site(closed, plan),
            )
        self.plan, self.dims, self.leaf_sizes, flops, head = self._CACHE[key]
        # the head factorisation pays when the head's input is narrower than V (full blocks
        # only), and applies when some other parameter is left to make K_x of the head's input
        self.head = -1
        others = len(self.plan.sites) > 1 or bool(self.plan.fallback)
        if head >= 0 and reduction == "full" and others:
            _, c, _ = self.dims[head]
            if c - (1 if self.plan.sites[head].bias >= 0 else 0) < v:
                self.head = head
        self.n_o, self.m = pos_o.shape
        self.n_u, self.l = pos_u.shape
        self.v = v
        self.vp = 1 if reduction == "sum_logits" else v
        self.diag = reduction in ("diagonal", "trace")
        self.dtype = np.dtype(jax.tree_util.tree_leaves(params)[0].dtype)
        self.itemsize = self.dtype.itemsize
        self.f1_flops = max(flops, 2.0 * sum(self.leaf_sizes))

    headed = False
    """True for the view :meth:`with_head` returns: rows are the head's C inputs."""

    def with_head(self) -> _Problem:
        """This problem under the head factorisation (structured, and vp without a
        preconditioner): the head site leaves the sites, and the feature rows (vp: the VJP
        rows) are its ``C`` inputs instead of the ``V`` logits."""
        p = copy.copy(self)
        _, c, _ = self.dims[self.head]
        p.dims = [d for k, d in enumerate(self.dims) if k != self.head]
        p.vp = c - (1 if self.plan.sites[self.head].bias >= 0 else 0)
        p.headed = True
        return p

    def floats_per_row(self, implementation):
        """Feature floats per output row (one position and one logit of one example)."""
        if implementation == "jacobian":
            return sum(self.leaf_sizes)
        fb = sum(self.leaf_sizes[l] for l in self.plan.fallback)
        return (
            fb
            + sum(S * F for S, _, F in self.dims)
            + sum(S * C for S, C, _ in self.dims) / max(self.vp, 1)
        )

    def cost(self, implementation, symmetric=False) -> float:
        """Estimated FLOPs of the whole call (K(x, x) computes about half of the blocks)."""
        if symmetric and implementation != "vp":
            return 0.5 * self.cost(implementation)
        headed = implementation == "structured" or (implementation == "vp" and not self.demote)
        if headed and self.head >= 0 and not self.headed:
            p = self.with_head()  # K = Wᵀ K_x W: the mapping is two products per (o, u, m, l)
            mapping = (
                2
                * self.n_o
                * self.n_u
                * self.m
                * self.l
                * (p.vp * p.vp * self.vp + p.vp * self.vp**2)
            )
            return p.cost(implementation) + mapping
        f1 = self.f1_flops
        ro, ru = self.n_o * self.m * self.vp, self.n_u * self.l * self.vp
        pairs = self.n_o * self.n_u * self.m * self.l * self.vp * (1 if self.diag else self.vp)
        if implementation == "vp":
            return ru * 2 * f1 * (1 + self.n_o)
        feats = (ro + ru) * 3 * f1
        if implementation == "jacobian":
            return feats + 2 * pairs * sum(self.leaf_sizes)
        fb = sum(self.leaf_sizes[l] for l in self.plan.fallback)
        sites = 0.0
        for (S, C, F), order in zip(
            self.dims, _site_orders(self.dims, 1, 1, self.m, self.l, self.vp, self.diag)
        ):
            if order == "pair":
                sites += C + (pairs / (self.n_o * self.n_u)) * F
            elif order == "gram":
                sites += (
                    S * S * C
                    + S * S * self.l * self.vp * F
                    + (pairs / (self.n_o * self.n_u)) * S * F
                )
            else:
                sites += (self.m + self.l) * self.vp * S * C * F + (
                    pairs / (self.n_o * self.n_u)
                ) * C * F
        return feats + 2 * pairs * fb + 2 * self.n_o * self.n_u * sites


def cost(
    apply_fn,
    params,
    x_o,
    x_u=None,
    *,
    reduction="full",
    mask_o=None,
    mask_u=None,
    preconditioner=None,
) -> dict:
    """Estimated FLOPs of each implementation for this call: ``{"jacobian": .., "vp": .., ...}``."""
    if x_u is None:
        x_u, mask_u = x_o, mask_o if mask_u is None else mask_u
    symmetric = x_u is x_o and _same_mask(mask_o, mask_u)
    prob, *_ = _setup(apply_fn, params, x_o, x_u, reduction, mask_o, mask_u, preconditioner)
    return {impl: float(prob.cost(impl, symmetric)) for impl in IMPLEMENTATIONS}


def _chunks(n, size):
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _plan_chunks(n, m, row_bytes, budget):
    """Example and position chunk sizes so that a chunk's features use <= budget bytes."""
    per_pos = max(row_bytes, 1)
    if m * per_pos <= budget:
        return max(1, min(n, int(budget // (m * per_pos)))), m
    return 1, max(1, min(m, int(budget // per_pos)))


def take_examples(x, idx):
    return jax.tree_util.tree_map(lambda a: a[idx], x)


def _setup(apply_fn, params, x_o, x_u, reduction, mask_o, mask_u, preconditioner=None):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _, p = trainable_fn(apply_fn, params)
    validate.check_params(p)
    shape_o = validate.logits_shape(apply_fn, params, x_o, "x_o")
    shape_u = validate.logits_shape(apply_fn, params, x_u, "x_u")
    if shape_o[1:] != shape_u[1:] and (len(shape_o) == 2 or shape_o[-1] != shape_u[-1]):
        raise ValueError(f"logits of x_o {shape_o} and x_u {shape_u} disagree on V")
    v = shape_o[-1]
    out = []
    for shape, mask, name in ((shape_o, mask_o, "mask_o"), (shape_u, mask_u, "mask_u")):
        if len(shape) == 2:
            if mask is not None:
                raise ValueError(f"{name} given, but the logits {shape} have no position axis")
            out.append(position_index(None, shape[0], 1))
        else:
            m = None if mask is None else validate.check_mask(mask, shape[:2], name)
            out.append(position_index(m, shape[0], shape[1]))
    (pos_o, valid_o), (pos_u, valid_u) = out
    prob = _Problem(apply_fn, params, x_o, x_u, reduction, pos_o, pos_u, v)
    consts = None
    if preconditioner is not None:
        pre, consts = validate.check_preconditioner(preconditioner, p)
        demote = _demoted(prob.plan, consts)
        if demote:
            prob = _Problem(apply_fn, params, x_o, x_u, reduction, pos_o, pos_u, v, demote)
        consts = (pre, consts)
    return prob, len(shape_o) == 3, pos_o, valid_o, pos_u, valid_u, consts


def _demoted(plan, consts) -> tuple:
    """Leaves kept as Jacobian rows under a preconditioner: sites whose ``p`` is not constant over
    the leaf, and biases whose constant differs from their kernel's."""
    out = []
    for s in plan.sites:
        if consts[s.leaf] is None:
            out.append(s.leaf)
        elif s.bias >= 0 and consts[s.bias] != consts[s.leaf]:
            out.append(s.bias)
    return tuple(sorted(out))


def _scales(prob, pre, consts, structured):
    """``(row_scales, site_constants, head_constant)`` for :func:`_precondition`."""
    leaves = jax.tree_util.tree_leaves(pre)
    if not structured:
        return tuple(l.reshape(-1) for l in leaves), (), 1.0
    head = prob.head if prob.headed else -1
    rows = tuple(leaves[l].reshape(-1) for l in prob.plan.fallback)
    sites = tuple(consts[s.leaf] for k, s in enumerate(prob.plan.sites) if k != head)
    return rows, sites, consts[prob.plan.sites[head].leaf] if head >= 0 else 1.0


def entk(
    apply_fn: Callable,
    params: Any,
    x_o: Any,
    x_u: Any = None,
    *,
    implementation: str = "auto",
    reduction: str = "full",
    mask_o: Any | None = None,
    mask_u: Any | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    preconditioner: Any = None,
    dim: int | None = None,
    key: Any = None,
    out: str | os.PathLike | None = None,
) -> jax.Array | np.ndarray:
    """The empirical NTK of the logit network, ``K = J_o J_uᵀ`` (unnormalised), or with a
    ``preconditioner`` p the eNTK ``K_P = J_o diag(p) J_uᵀ`` an optimizer induces.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` of shape ``(N, V)`` or ``(N, T, V)``.
      params: parameters; for flax variables only the ``params`` collection is differentiated.
      x_o: observed inputs (batch ``N_o``). x_u: updated inputs (batch ``N_u``; default ``x_o``).
      implementation: ``"auto"``, ``"jacobian"``, ``"vp"`` or ``"structured"`` (exact), or
        ``"projected"``: an unbiased estimate from Jacobian rows sketched to ``dim`` numbers with
        the random ``key`` (:func:`ldjax.entk_projected`, which also returns its standard error).
      reduction: ``"full"``, ``"diagonal"``, ``"trace"`` or ``"sum_logits"`` (module docstring).
      mask_o, mask_u: ``(N, T)`` boolean masks of the positions to keep (sequence models).
      memory_budget: bytes that one chunk's work (Jacobian features, and with ``out`` one block
        of K) may take; the work is chunked over examples and positions to stay under it, down
        to one example and one position. The output K is counted apart, against the memory
        available (below).
      preconditioner: an elementwise preconditioner ``p``, a pytree like the trainable params
        (leaves may be scalars), e.g. :func:`ldjax.preconditioner` of an optimizer's state.
        ``"jacobian"`` and ``"vp"`` take any p; ``"structured"`` keeps a Dense or embedding
        site structured where p is constant over its parameter (and its bias), and reads the
        other parameters' Jacobian rows.
      out: a path (``.npy``): write K there block by block and return it as a read-only
        ``numpy.memmap``, so a K larger than memory can be computed (:func:`numpy.load` with
        ``mmap_mode="r"`` reads it back). Without ``out`` K is returned in memory.
    Returns:
      K, e.g. ``(N_o, N_u, V, V)`` (classifier) or ``(N_o, N_u, M, L, V, V)`` (sequence): a
      ``jax.Array``, or with ``out`` a read-only ``numpy.memmap`` of the file.
    Raises:
      ValueError: arguments that do not fit (``ldjax._src.validate``); non-finite params, inputs
        or K (naming x_o, x_u or params and the index); a K (with its work) that does not fit the
        memory available, before anything is allocated: the message gives the size and what would
        fit (a reduction, fewer positions, smaller batches, ``out=``).

    Examples:
      A linear model ``z = x W`` has ``K(x_o, x_u) = ⟨x_o, x_u⟩ I``:

      >>> import jax.numpy as jnp, ldjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((3, 4))}
      >>> x = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
      >>> K = ldjax.entk(apply_fn, params, x)          # K(x, x)
      >>> K.shape
      (2, 2, 4, 4)
      >>> float(K[1, 1, 0, 0]), float(K[1, 1, 0, 1]), float(K[0, 1, 2, 2])
      (5.0, 0.0, 0.0)
      >>> ldjax.entk(apply_fn, params, x, reduction="trace").tolist()
      [[4.0, 0.0], [0.0, 20.0]]
    """
    if implementation == "projected":
        if preconditioner is not None:
            raise ValueError("implementation='projected' takes no preconditioner")
        if dim is None or key is None:
            raise ValueError("implementation='projected' needs dim= (k) and key= (a jax key)")
        from ldjax._src.projected import entk_projected  # noqa: PLC0415 (it imports this module)

        return entk_projected(
            apply_fn,
            params,
            x_o,
            x_u,
            dim=dim,
            key=key,
            reduction=reduction,
            mask_o=mask_o,
            mask_u=mask_u,
            memory_budget=memory_budget,
        ).K
    if dim is not None or key is not None:
        raise ValueError("dim= and key= belong to implementation='projected'")
    if implementation not in IMPLEMENTATIONS + ("auto",):
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS + ('auto', 'projected')}, got "
            f"{implementation!r}"
        )
    if x_u is None:
        x_u, mask_u = x_o, mask_o if mask_u is None else mask_u
    memory_budget = validate.check_memory_budget(memory_budget)
    prob, is_seq, pos_o, valid_o, pos_u, valid_u, pre = _setup(
        apply_fn, params, x_o, x_u, reduction, mask_o, mask_u, preconditioner
    )
    validate.check_finite_tree(trainable_fn(apply_fn, params)[1], "params")
    validate.check_finite_tree(x_o, "x_o")
    if x_u is not x_o:
        validate.check_finite_tree(x_u, "x_u")
    # with a preconditioner the o side is scaled, so K(x, x) is not computed as a mirror
    symmetric = x_u is x_o and _same_mask(mask_o, mask_u) and pre is None
    if implementation == "auto":
        implementation = min(IMPLEMENTATIONS, key=lambda i: prob.cost(i, symmetric))
    symmetric = symmetric and implementation != "vp"
    # the head factorisation: structured always, vp without a preconditioner
    if prob.head >= 0 and (
        implementation == "structured" or (implementation == "vp" and pre is None)
    ):
        prob = prob.with_head()
    if implementation == "vp":
        row_bytes_u = prob.vp * sum(prob.leaf_sizes) * prob.itemsize * 2
        nu, lc = _plan_chunks(prob.n_u, prob.l, row_bytes_u, memory_budget)
        no, mc = prob.n_o, prob.m
        cache_u = False
        work = row_bytes_u * nu * lc
    else:
        # features kept per output row; computing them takes about twice as much again
        row_bytes = prob.vp * prob.floats_per_row(implementation) * prob.itemsize
        cache_u = prob.n_u * prob.l * row_bytes <= memory_budget / 2
        if cache_u:
            nu, lc = _plan_chunks(prob.n_u, prob.l, 3 * row_bytes, memory_budget / 2)
            no, mc = _plan_chunks(prob.n_o, prob.m, 3 * row_bytes, memory_budget / 2)
        else:
            nu, lc = _plan_chunks(prob.n_u, prob.l, 3 * row_bytes, memory_budget / 4)
            no, mc = _plan_chunks(prob.n_o, prob.m, 3 * row_bytes, memory_budget / 4)
        if symmetric:
            no, mc = nu, lc = min(no, nu), min(mc, lc)
        work = 3 * row_bytes * (no * mc + nu * lc) + (
            prob.n_u * prob.l * row_bytes if cache_u else 0
        )
    tail = _tail(prob, reduction)
    out_shape = (prob.n_o, prob.n_u) + (() if not is_seq else (prob.m, prob.l)) + tail
    if out is not None:  # blocks of K count as work: a K larger than memory streams to disk
        (no, mc), (nu, lc) = _limit_blocks(
            (no, mc),
            (nu, lc),
            int(np.prod(tail, dtype=np.int64)) * prob.itemsize,
            max(memory_budget / 2, 1),
            symmetric,
        )
    single = out is None and len(_chunks(prob.n_o, no)) * len(_chunks(prob.m, mc)) == 1
    single = single and len(_chunks(prob.n_u, nu)) * len(_chunks(prob.l, lc)) == 1
    _check_memory(
        prob, reduction, is_seq, out_shape, work, (no, mc), (nu, lc), single, out, memory_budget
    )
    K = _run_chunks(
        apply_fn,
        params,
        implementation,
        reduction,
        prob,
        x_o,
        pos_o,
        valid_o,
        x_u,
        pos_u,
        valid_u,
        (no, mc),
        (nu, lc),
        cache_u=cache_u,
        memory_budget=memory_budget,
        symmetric=symmetric,
        squeeze=not is_seq,
        pre=pre,
        out=out,
    )
    if single and validate.enabled() and not validate.all_finite(K):
        k = np.asarray(K)
        _raise_non_finite(apply_fn, params, x_o, x_u, tuple(np.argwhere(~np.isfinite(k))[0]))
    return K


def _tail(prob, reduction):
    """The per-pair shape of K after the reduction."""
    return {"full": (prob.v, prob.v), "diagonal": (prob.v,), "trace": (), "sum_logits": ()}[
        reduction
    ]


def _limit_blocks(chunk_o, chunk_u, pair_bytes, limit, symmetric):
    """Chunk sizes shrunk until one block of K, ``n_o·n_u·m·l`` pairs, takes <= ``limit`` bytes."""
    (no, mc), (nu, lc) = chunk_o, chunk_u
    while no * nu * mc * lc * pair_bytes > limit and max(no, nu, mc, lc) > 1:
        if symmetric:
            if no * nu >= mc * lc and no > 1:
                no = nu = (no + 1) // 2
            else:
                mc = lc = (mc + 1) // 2
            continue
        k = int(np.argmax([no, nu, mc, lc]))
        no, nu, mc, lc = [(c + 1) // 2 if i == k else c for i, c in enumerate((no, nu, mc, lc))]
    return (no, mc), (nu, lc)


def _check_memory(prob, reduction, is_seq, out_shape, work, chunk_o, chunk_u, single, out, budget):
    """Sizes of K and of its work, then :func:`ldjax._src.validate.check_memory`."""
    if not validate.enabled():
        return
    k_bytes = int(np.prod(out_shape, dtype=np.float64)) * prob.itemsize
    (no, mc), (nu, lc) = chunk_o, chunk_u
    block = 0 if single else no * nu * mc * lc * int(np.prod(_tail(prob, reduction)))
    block *= prob.itemsize
    # one XLA program holds its block of K and up to two temporaries of that size (the halves
    # of K(x, x) concatenated, the head factorisation's products), hence 3 x block
    if out is not None:  # K on disk: in memory one block and its work
        host = device = work + 3 * block
        what = lambda: (
            f"one block of K with its work (memory_budget {validate.format_bytes(budget)}) needs"
        )
        host_copy = 0
    else:  # one block: K is built on the device; chunked: on the host, then copied over
        host = (3 * k_bytes + work) if single else (2 * k_bytes + work + 3 * block)
        device = (3 * k_bytes + work) if single else (k_bytes + work + 3 * block)
        what = lambda: (
            f"K {out_shape} {prob.dtype} ({validate.format_bytes(k_bytes)}) with its work needs"
        )
        host_copy = 0 if single else k_bytes
    validate.check_memory(
        what,
        host,
        device,
        host_copy,
        out,
        k_bytes,
        lambda: (
            "What would fit: a smaller memory_budget (blocks of K are <= half of it)."
            if out is not None
            else _fits(prob, reduction, is_seq, out, prob.itemsize)
        ),
    )


def _fits(prob, reduction, is_seq, out, itemsize):
    """What would make K fit, with the sizes."""
    fmt = validate.format_bytes
    pos = (prob.m, prob.l) if is_seq else ()
    lead = (prob.n_o, prob.n_u) + pos

    def size(shape):
        return fmt(float(np.prod(shape, dtype=np.float64)) * itemsize)

    ways = []
    if reduction == "full":
        ways.append(
            f"reduction='diagonal' {lead + (prob.v,)} ({size(lead + (prob.v,))}) or 'trace' "
            f"{lead} ({size(lead)})"
        )
    tail = _tail(prob, reduction)
    if is_seq and prob.m * prob.l > 1:
        one = (prob.n_o, prob.n_u, 1, 1) + tail
        ways.append(
            f"fewer positions with mask_o/mask_u (K grows as M·L = {prob.m}·{prob.l}; the last "
            f"position only, ldjax.last_position_mask, gives {size(one)})"
        )
    if prob.n_o * prob.n_u > 1:
        one = (1, 1) + pos + tail
        ways.append(
            f"smaller batches (K grows as N_o·N_u = {prob.n_o}·{prob.n_u}; one pair gives "
            f"{size(one)}), e.g. x_o and x_u in slices"
        )
    if out is None:
        ways.append("stream K to disk with out='K.npy' (written block by block, read back by mmap)")
    return "What would fit: " + "; ".join(ways) + "."


def _raise_non_finite(apply_fn, params, x_o, x_u, idx):
    """K is not finite at ``idx`` while params and inputs are: find the cause and raise."""
    where = f"K has non-finite values (NaN/Inf), first at index {tuple(int(i) for i in idx)}"
    f = jax.jit(apply_fn)
    p = trainable_fn(apply_fn, params)[1]
    for x, name in ((x_o, "x_o"), (x_u, "x_u")):
        bad = ~np.isfinite(np.asarray(f(params, x)))
        if bad.any():
            ex = sorted({int(i) for i in np.argwhere(bad)[:, 0]})
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{where}: the logits of {name} are non-finite in example(s) {ex[:10]} "
                f"(first at {first})" + validate.non_finite_cause({"params": p, name: x})
            )
    raise ValueError(
        f"{where}, although params, x_o, x_u and their logits are finite: the gradient of "
        f"apply_fn overflows or is undefined there (e.g. sqrt or log at 0, or a low precision)"
    )


def _same_mask(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or np.array_equal(np.asarray(a), np.asarray(b))


def _transpose_block(blk, reduction):
    """K(x_u, x_o) from K(x_o, x_u): swap (o, u), (m, l) and, for the full block, (i, j).
    (numpy or jax arrays: ``.transpose`` of either.)"""
    perm = (1, 0, 3, 2) + ((5, 4) if reduction == "full" else tuple(range(4, blk.ndim)))
    return blk.transpose(perm)


def _run_chunks(
    apply_fn,
    params,
    implementation,
    reduction,
    prob,
    x_o,
    pos_o,
    valid_o,
    x_u,
    pos_u,
    valid_u,
    chunk_o,
    chunk_u,
    cache_u,
    memory_budget,
    symmetric=False,
    squeeze=False,
    pre=None,
    out=None,
):
    """Fills K block by block. With ``symmetric`` (x_u is x_o) only blocks on and above the
    diagonal are computed, and every chunk's features are computed once. ``squeeze`` drops the
    position axes of a classifier's K. ``pre``: the preconditioner ``(p, leaf constants)``. With
    ``out`` (a path) K is an ``.npy`` file filled block by block and returned as a read-only
    memmap."""
    (no, mc), (nu, lc) = chunk_o, chunk_u
    co = [
        (a, b, c, d)
        for (a, b), (c, d) in itertools.product(_chunks(prob.n_o, no), _chunks(prob.m, mc))
    ]
    cu = [
        (a, b, c, d)
        for (a, b), (c, d) in itertools.product(_chunks(prob.n_u, nu), _chunks(prob.l, lc))
    ]

    def piece(x, pos, valid, a, b, c, d, n_ex, n_pos):
        """A chunk padded to ``(n_ex, n_pos)`` so every chunk shares one compilation."""
        idx = np.minimum(np.arange(a, a + n_ex), b - 1)
        p = np.zeros((n_ex, n_pos), np.int32)
        v = np.zeros((n_ex, n_pos), bool)
        p[:, : d - c] = pos[idx, c:d]
        v[: b - a, : d - c] = valid[a:b, c:d]
        whole = a == 0 and b == n_ex == len(pos)
        return (x if whole else take_examples(x, idx)), jnp.asarray(p), jnp.asarray(v)

    structured = implementation == "structured"
    head = prob.head if (implementation != "jacobian" and prob.headed) else -1
    w = None if head < 0 else _head_matrix(apply_fn, params, prob.plan.sites[head])
    demote = prob.demote if structured else ()
    scales = None if pre is None else _scales(prob, pre[0], pre[1], structured)
    p_vp = None if pre is None else pre[0]
    feats = lambda x, p, v: _features(
        apply_fn, structured, reduction, head, demote, params, x, p, v
    )
    dims = prob.dims if structured else []
    budget_floats = memory_budget / 4 / prob.itemsize
    orders = _site_orders(dims, no, nu, mc, lc, prob.vp, prob.diag, budget_floats)
    batches = tuple(
        int(max(1, min(no, budget_floats // max(nu * S * lc * prob.vp * F, 1)))) for S, _, F in dims
    )
    if len(co) == 1 and len(cu) == 1 and out is None:  # one block: one XLA program
        xo, po, vo = piece(x_o, pos_o, valid_o, *co[0], no, mc)
        if implementation == "vp":
            xu, pu, vu = piece(x_u, pos_u, valid_u, *cu[0], nu, lc)
            K = _vp_block(apply_fn, reduction, head, params, xo, po, vo, xu, pu, vu, p_vp, w)
            return K[:, :, 0, 0] if squeeze else K
        u = () if symmetric else piece(x_u, pos_u, valid_u, *cu[0], nu, lc)
        return _one_block(
            apply_fn,
            structured,
            reduction,
            head,
            demote,
            orders,
            batches,
            squeeze,
            params,
            w,
            scales,
            xo,
            po,
            vo,
            *u,
        )

    dtype = np.dtype(prob.dtype)
    tail = _tail(prob, reduction)
    shape = (prob.n_o, prob.n_u, prob.m, prob.l) + tail
    if out is None:
        buf = np.zeros(shape, dtype)
        K = buf
    else:
        final = (prob.n_o, prob.n_u) + tail if squeeze else shape
        K = np.lib.format.open_memmap(os.fspath(out), mode="w+", dtype=dtype, shape=final)
        buf = K.reshape(shape)  # a view: writes go to the file
    cached = {}
    for io, (a, b, c, d) in enumerate(co):
        xo, po, vo = piece(x_o, pos_o, valid_o, a, b, c, d, no, mc)
        fo = None if implementation == "vp" else cached.get(("u", a, c)) if symmetric else None
        if fo is None and implementation != "vp":
            fo = feats(xo, po, vo)
        for iu, (e, g, h, k) in enumerate(cu):
            if symmetric and iu < io:
                continue
            xu, pu, vu = piece(x_u, pos_u, valid_u, e, g, h, k, nu, lc)
            if implementation == "vp":
                blk = _vp_block(apply_fn, reduction, head, params, xo, po, vo, xu, pu, vu, p_vp, w)
            else:
                fu = fo if (symmetric and iu == io) else cached.get(("u", e, h))
                if fu is None:
                    fu = feats(xu, pu, vu)
                    if cache_u:
                        cached[("u", e, h)] = fu
                blk = _contract_any(reduction, orders, batches, w, _precondition(fo, scales), fu)
            blk = np.asarray(blk)[: b - a, : g - e, : d - c, : k - h]
            if validate.enabled() and not validate.all_finite(blk):
                i = [int(t) for t in np.argwhere(~np.isfinite(blk))[0]]
                i[:4] = [i[0] + a, i[1] + e, i[2] + c, i[3] + h]
                del K, buf
                if out is not None:  # no half-written K left behind
                    os.remove(os.fspath(out))
                _raise_non_finite(
                    apply_fn, params, x_o, x_u, tuple(i[:2] + i[4:] if squeeze else i)
                )
            buf[a:b, e:g, c:d, h:k] = blk
            if symmetric and iu != io:
                buf[e:g, a:b, h:k, c:d] = _transpose_block(blk, reduction)
        if symmetric and not cache_u:
            cached.pop(("u", a, c), None)
    if out is not None:
        K.flush()
        del K, buf
        return np.load(os.fspath(out), mmap_mode="r")
    return jnp.asarray(K[:, :, 0, 0] if squeeze else K)


def last_position_mask(mask_or_lengths: Any, t: int | None = None) -> np.ndarray:
    """A ``(N, T)`` mask selecting each example's last True position (or position ``length−1``).

    Examples:
      >>> import ldjax
      >>> ldjax.last_position_mask([2, 3], t=4).astype(int).tolist()
      [[0, 1, 0, 0], [0, 0, 1, 0]]
    """
    a = np.asarray(mask_or_lengths)
    if a.ndim == 2:
        last = a.shape[1] - 1 - np.argmax(a[:, ::-1].astype(bool), axis=1)
        t = a.shape[1]
    else:
        if t is None:
            raise ValueError("last_position_mask needs t when given lengths")
        last = a.astype(int) - 1
    m = np.zeros((len(last), t), bool)
    m[np.arange(len(last)), last] = True
    return m
