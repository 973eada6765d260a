"""Influence of every training example on every probe: the predicted one-step change of each probe
o after one step on each training example u alone, for whole data sets, sharded over a device mesh
and streamed to disk.

For one u and one o, Proposition 1 (Ren & Sutherland, arXiv 2407.10490, §2–3) gives the linear
prediction, for every readout r of o,

    Δ log π(r | x_o) = −η ⟨∇θ log π(r | x_o), g_u⟩,     g_u = ∇θ L(x_u) = J_uᵀ G_u,

where r is each class (classifiers: ``(N_u, N_o, V)``), the response log-probability
``log π(y_o | x_o) = Σ_m log π(y_{o,m})`` (sequences: ``(N_u, N_o)``) or each response token
(``per_token``: ``(N_u, N_o, T)``). Since ``∇θ log π(r|x_o) = Σ_i A_ri ∇θ z_i(x_o)``, this is
exactly :func:`ldjax.decompose`'s ``A·(−η K G)`` read at r. For the DPO family the step's gradient
has a y⁺ and a y⁻ part, ``g_u = J⁺ᵀG⁺ + J⁻ᵀG⁻``, kept apart as two terms.

Algorithms (``method``):

* ``"gram"``: the readout gradients of O (``N_o · R`` rows of P parameters) are computed once and
  kept on the devices; each chunk of U then costs its per-example gradients (one backward pass
  each) and one product ``(chunk, P) @ (P, N_o · R)``. Fastest whenever those rows fit in memory
  (MNIST's LeNet: 500 probes × 10 classes × 29,624 parameters = 0.6 GB in float32).
* ``"jvp"``: nothing of O is kept; each chunk of U costs its per-example gradients and one JVP of
  the readout of every probe along each of them (``chunk × N_o`` forward-mode passes). For models
  whose rows do not fit.
* ``"factored"``: ``"gram"`` without forming the dense layers' gradients (the "ghost" inner
  product of ghost clipping and LoGra). A parameter used only as the weight of one dense
  ``dot_general`` (``a @ W``: some of W's dims contracted, no batch dims; found in the jaxpr of
  ``apply_fn`` by :mod:`ldjax._src.dense_factors`, whatever the model) has the per-example gradient
  ``Σ_s a_s δ_sᵀ`` over the ``S`` positions it is applied at, so
  ``⟨g_W^o, g_W^u⟩ = Σ_{s,t} (a_o,s·a_u,t)(δ_o,s·δ_u,t)``. Per chunk of U it keeps each dense
  layer's input activations ``a`` and output cotangents ``δ`` (one backward pass per example,
  no weight gradient formed); of O, ``a`` and ``δ`` per readout, computed once. Every other
  parameter (biases, conv kernels, embeddings, LayerNorm scales, tied or shared weights, anything
  inside ``scan``/``while``/``cond``) is *rest*, contracted as ``"gram"``. Per pair and dense
  layer it costs ``2(d_in + R·d_out)`` at one position (``2·S_u·S_o·(d_in + d_out) +
  2·S_o·d_out·R`` at ``S_u``, ``S_o`` positions) instead of ``2·d_in·d_out·R``: far cheaper for
  an MLP (``S = 1``; the MNIST MLP 784-128-128-10 with ``R = 1``: 1.3k against 118k FLOPs per
  pair), dearer for long sequences of narrow layers (``S² ≫ d``: the transformer's ``T²``
  position pairs), where ``"gram"`` wins. Plain SGD only (``eta``; not with ``optimizer``) and
  not with ``kernel_norms``.
* ``"auto"``: the cheapest in FLOPs (:func:`method_costs`), ``"gram"`` only when its rows fit
  ``memory_budget``, ``"factored"`` only when its kept factors (and, for ``S > 1``, a chunk's
  position-pair products) fit it. With ``F`` the FLOPs of one probe's forward pass (XLA's cost
  analysis), ``R`` readouts per probe and ``P`` parameters, beyond the per-example backward
  passes that all share, ``"gram"`` costs ``≈ 3F·N_o·R`` once (the rows) plus ``2P·R`` per pair,
  ``"jvp"`` ``≈ 3F`` per pair and ``"factored"`` ``≈ 3F·N_o·R`` once plus
  ``2·P_rest·R`` plus each dense layer's cost above per pair. A dense MLP has ``F ≈ 2P``, so
  ``"jvp"`` beats ``"gram"`` once ``R ≳ 3`` (10 classes: about 5× cheaper), and ``"factored"``
  beats both; a conv net reuses each weight at many positions, ``F ≫ 2P`` (LeNet:
  ``F ≈ 13 · 2P``), and ``"gram"`` or ``"factored"`` (its dense layers factored, its convs rest)
  wins; for sequences ``R = 1`` and ``"gram"`` wins unless ``T² (d_in + d_out) < d_in·d_out``.

All are exact (no projection): the numbers equal a per-u :func:`ldjax.decompose` to float
rounding. U is cut into chunks of ``chunk_size`` examples; each chunk is sharded over the mesh
axis ``"u"`` and O (padded) over the optional axis ``"o"`` (``jax.sharding.NamedSharding``, one
jitted program), so the same code runs on one CPU, 8 host devices, a GPU node or several hosts
under ``jax.distributed.initialize()``, each process computing and writing the shards it holds.
With ``out=`` the results stream chunk by chunk into on-disk arrays
(:class:`ldjax._src.influence_store.InfluenceStore`), resumable after a kill.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldjax._src import dense_factors, validate
from ldjax._src.actual_step import actual_step
from ldjax._src.optimizer_update import update_parts
from ldjax._src.trainable import branches, trainable_fn

METHODS = ("auto", "gram", "jvp", "factored")
DEFAULT_MEMORY_BUDGET = 4 * 2**30
JVP_WORK = 8
"""Logits-sized arrays counted per (direction, probe) JVP of ``"jvp"``. XLA's memory analysis of
the JVPs at Pythia-14m's shape (T = 128, V = 50,304, 13 probes, compiled from shapes only) gives
3.3–4.0 per pair (the logits' tangent, the log-softmax's pieces); 8 leaves a factor of 2."""
MIN_GEMM_ROWS = 2
"""Rows of U per device below which ``"gram"``'s product gets zero rows added: with one row XLA:CPU
emits a matrix-vector product whose float32 sum over the parameters drifts (Pythia-14m, 14M
parameters, one DPO pair: 4.2e-3 relative error against a float64 sum of the same float32
vectors, where two or more rows give 1e-6)."""


@dataclasses.dataclass
class Influence:
    """The predicted one-step changes of every probe after a step on each training example.

    Attributes:
      delta: ``(N_u, N_o, V)`` (classifiers), ``(N_u, N_o)`` (sequences: the response log-prob) or
        ``(N_u, N_o, T)`` (``per_token``): Δ log π of the readout, summed over the loss's branches.
      terms: for the DPO family, ``(delta⁺, delta⁻)``: the y⁺ and the y⁻ parts of ``delta``.
      delta_loss_o: ``(N_u, N_o)``, the first-order change of each probe's cross-entropy on its
        ``targets_o`` (``−Δ log π(y_o|x_o)``), when ``targets_o`` was given.
      kernel_fro, kernel_trace: ``(N_u, N_o)``, ``‖K(x_o, x_u)‖_F`` and ``tr K(x_o, x_u)``
        (classifiers, when ``kernel_norms=True``; for the DPO family, of the y⁺ input).
      audit: the measured error of the prediction on a sample of u (:func:`audit`), or None.
      readout: ``"class"``, ``"target"`` (``target_only``), ``"sequence"`` or ``"token"``.
      path: the on-disk folder when the results were streamed there (``out=``), else None.
      delta_carry: with an optimizer, ``(N_o, ...)``: what the optimizer's state moves on every
        probe whatever u (momentum, decoupled weight decay), in ``delta``'s readout layout.
      method: the algorithm that ran, ``"gram"``, ``"jvp"`` or ``"factored"`` (``"auto"``
        resolved by cost).
      chunks_computed, chunks: chunks of U computed by this call, of all (with ``out``, the
        others were already on disk).
    """

    delta: Any
    terms: tuple | None
    delta_loss_o: Any
    kernel_fro: Any
    kernel_trace: Any
    audit: dict | None
    readout: str
    path: str | None = None
    delta_carry: Any = None
    method: str = ""
    chunks_computed: int = 0
    chunks: int = 0


# ----------------------------------------------------------------------------- per-example pieces


def _add_batch(tree):
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def _readout(f, theta, x1, y1, m1, kind):
    """The readout values of one probe ``x1`` (no batch axis): ``(R,)``."""
    return _pick(f(theta, _add_batch(x1))[0], y1, m1, kind)


def _pick(z, y1, m1, kind):
    """The readout values ``(R,)`` of one probe's logits ``z`` (no batch axis)."""
    lp = jax.nn.log_softmax(z, axis=-1)
    if kind == "class":
        return lp
    if kind == "target":  # a classifier probe's own class only: log π(y_o|x_o), (1,)
        return lp[y1[0]][None]
    picked = jnp.take_along_axis(lp, y1[:, None].astype(jnp.int32), axis=-1)[:, 0]
    picked = picked * m1.astype(picked.dtype)
    return picked if kind == "token" else jnp.sum(picked)[None]


def _logits_bytes(f, theta, x_o) -> int:
    """Bytes of one probe's logits (``(V,)`` or ``(T, V)``), from shapes only."""
    z = jax.eval_shape(f, theta, _one(x_o))
    return int(np.prod(z.shape[1:])) * np.dtype(z.dtype).itemsize


def _flat_rows(tree, r):
    """A pytree of ``(R, *leaf)`` Jacobian rows as ``(R, P)`` (``ravel_pytree`` order)."""
    return jnp.concatenate([a.reshape(r, -1) for a in jax.tree_util.tree_leaves(tree)], axis=1)


def _example_grads(f, loss_fn, theta, xs1, kw1, hyper):
    """Per-branch gradients ``g_b = J_bᵀ G_b`` of one example's loss, each ``(P,)``."""
    zs, vjps = [], []
    for x in xs1:
        z, vjp = jax.vjp(lambda th, x=x: f(th, _add_batch(x)), theta)
        zs.append(z)
        vjps.append(vjp)
    kw = dict(_add_batch(kw1), **hyper)
    gs = jax.grad(lambda *z: jnp.sum(loss_fn(*z, **kw)), argnums=tuple(range(len(zs))))(*zs)
    return tuple(ravel_pytree(v(g)[0])[0] for v, g in zip(vjps, gs))


def _ravel_list(arrays, lead=(), dtype=None):
    """Arrays ``(*lead, ...)`` as one ``(*lead, n)`` (``n = 0`` for none: zeros of ``dtype``)."""
    if not arrays:
        return jnp.zeros(lead + (0,), dtype)
    return jnp.concatenate([a.reshape(lead + (-1,)) for a in arrays], axis=-1)


def _rest_split(theta, leaves):
    """The leaves of ``theta`` not in ``leaves`` (the factored ones), and ``full(rest) -> theta``
    with those replaced."""
    flat, tdef = jax.tree_util.tree_flatten(theta)
    idx = [k for k in range(len(flat)) if k not in leaves]

    def full(rest):
        vals = list(flat)
        for k, v in zip(idx, rest):
            vals[k] = v
        return tdef.unflatten(vals)

    return [flat[k] for k in idx], full


def _example_factors(f, loss_fn, theta, xs1, kw1, hyper, leaves):
    """Per branch of one example's loss: the factors of its gradient, ``(acts, deltas, g_rest)``:
    per dense layer ``leaves[i]`` its input activations ``(S, d_in)`` and output cotangents
    ``(S, d_out)``, and the rest's gradient ``(P_rest,)`` (:mod:`ldjax._src.dense_factors`)."""
    rest, full = _rest_split(theta, leaves)
    zs, vjps, acts = [], [], []
    for x in xs1:
        xb = _add_batch(x)
        taps = dense_factors.zero_taps(f, theta, xb, leaves)
        z, vjp, a = jax.vjp(
            lambda r, t, xb=xb: dense_factors.apply_tapped(f, full(r), xb, t, leaves),
            rest,
            taps,
            has_aux=True,
        )
        zs.append(z)
        vjps.append(vjp)
        acts.append(a)
    kw = dict(_add_batch(kw1), **hyper)
    gs = jax.grad(lambda *z: jnp.sum(loss_fn(*z, **kw)), argnums=tuple(range(len(zs))))(*zs)
    out = []
    for v, g, a in zip(vjps, gs, acts):
        g_rest, deltas = v(g)
        out.append((a, deltas, _ravel_list(g_rest, (), zs[0].dtype)))
    return tuple(out)


def _readout_factors(f, theta, x1, y1, m1, kind, leaves):
    """One probe's readout Jacobian in factors: ``(acts, deltas, rows_rest)``, per dense layer
    ``(S, d_in)`` and ``(R, S, d_out)``, and the rest's rows ``(R, P_rest)``."""
    rest, full = _rest_split(theta, leaves)
    xb = _add_batch(x1)
    taps = dense_factors.zero_taps(f, theta, xb, leaves)

    def read(r, t):
        z, a = dense_factors.apply_tapped(f, full(r), xb, t, leaves)
        return _pick(z[0], y1, m1, kind), a

    (j_rest, deltas), acts = jax.jacrev(read, argnums=(0, 1), has_aux=True)(rest, taps)
    n_r = jax.eval_shape(lambda: read(rest, taps)[0]).shape[0]
    return acts, deltas, _ravel_list(j_rest, (n_r,), taps[0].dtype if taps else None)


def _z_rows(f, theta, x1):
    """Jacobian rows of the logits of one classifier input: ``(V, P)``."""
    rows = jax.jacrev(lambda th: f(th, _add_batch(x1))[0])(theta)
    v = jax.eval_shape(lambda th: f(th, _add_batch(x1))[0], theta).shape[0]
    return _flat_rows(rows, v)


# ----------------------------------------------------------------------------- the chunk programs


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one influence job (the jit cache key)."""

    apply_fn: Callable
    loss_fn: Callable
    kind: str
    n_branches: int
    method: str
    kernel_norms: bool
    mesh: Mesh
    u_axis: str
    o_axis: str | None
    optimizer: Any = None
    dir_batch: int = 0  # "jvp": directions of U pushed through the probes at once (0: all)
    factored: tuple = ()
    """``"factored"``: the parameter leaves taken as dense layers (the others are "rest")."""


def _shard(spec, *axes):
    return NamedSharding(spec.mesh, P(*axes))


def _all_axes(spec: _Spec) -> tuple:
    """Every mesh axis, for a batch sharded over all the devices."""
    return tuple(spec.mesh.axis_names)


def _local(spec: _Spec, fn, in_specs, out_specs):
    """``fn`` run on each device's own shard (``jax.shard_map``): per-example work has no
    cross-device data flow, and XLA:CPU in jaxlib 0.10.2 miscompiles per-example conv gradients
    partitioned by the SPMD partitioner over several devices (0.1–0.2 relative error on LeNet with
    8 host devices); as a per-device program they are exact (≤ 1e-6 relative, float32).

    ``check_vma=False``: a gradient with respect to the replicated parameters must stay this
    device's own (with the check, shard_map's autodiff would sum it over the devices)."""
    return jax.shard_map(
        fn, mesh=spec.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )


@functools.lru_cache(maxsize=32)
def _readout_rows_fn(spec: _Spec, n_o_pad: int):
    """The readout Jacobian rows of the probes, ``(N_o_pad, R, P)`` sharded over ``"o"``: each
    device computes the rows of its share of the probes (sharded over every mesh axis), then
    they are gathered (the probes come padded to a multiple of the device count)."""
    f = spec.apply_fn

    def rows(theta, x_o, y_o, m_o):
        def one(x1, y1, m1):
            r = _readout(f, theta, x1, y1, m1, spec.kind)
            jac = jax.jacrev(lambda th: _readout(f, th, x1, y1, m1, spec.kind))(theta)
            return _flat_rows(jac, r.shape[0])

        return jax.vmap(one)(x_o, y_o, m_o)

    allp = P(_all_axes(spec))
    local = _local(spec, rows, (P(), allp, allp, allp), allp)
    return jax.jit(lambda *a: local(*a)[:n_o_pad], out_shardings=_shard(spec, spec.o_axis))


@functools.lru_cache(maxsize=32)
def _factor_rows_fn(spec: _Spec, n_o_pad: int):
    """``"factored"``: the probes' readout Jacobians in factors (:func:`_readout_factors`), each
    array ``(N_o_pad, ...)`` sharded over ``"o"``, computed like :func:`_readout_rows_fn`."""
    f = spec.apply_fn

    def rows(theta, x_o, y_o, m_o):
        def one(x1, y1, m1):
            return _readout_factors(f, theta, x1, y1, m1, spec.kind, spec.factored)

        return jax.vmap(one)(x_o, y_o, m_o)

    allp = P(_all_axes(spec))
    local = _local(spec, rows, (P(), allp, allp, allp), allp)
    return jax.jit(
        lambda *a: jax.tree_util.tree_map(lambda v: v[:n_o_pad], local(*a)),
        out_shardings=_shard(spec, spec.o_axis),
    )


@functools.lru_cache(maxsize=32)
def _z_rows_fn(spec: _Spec, n_o_pad: int):
    f = spec.apply_fn
    allp = P(_all_axes(spec))
    local = _local(
        spec,
        lambda theta, x: jax.vmap(lambda x1: _z_rows(f, theta, x1))(x),
        (P(), allp),
        allp,
    )
    return jax.jit(lambda *a: local(*a)[:n_o_pad], out_shardings=_shard(spec, spec.o_axis))


@functools.lru_cache(maxsize=32)
def _chunk_fn(spec: _Spec):
    """``(theta, rows_o | probes, zrows_o, xs_chunk, kw_chunk, hyper, eta) -> outputs`` of one chunk
    of U: ``delta (c, N_o, R, B)`` and, with ``kernel_norms``, ``fro, trace (c, N_o)``. For
    ``"factored"`` ``rows_o`` holds the probes' factors (:func:`_factor_rows_fn`)."""
    f, loss_fn = spec.apply_fn, spec.loss_fn
    hi = jax.lax.Precision.HIGHEST

    def program(theta, rows_o, probes, zrows_o, xs, kw, hyper, eta, opt_state):
        if spec.method == "factored":  # plain SGD, no kernel norms (checked by influence)

            def factors(theta, xs, kw, hyper):
                return jax.vmap(
                    lambda xs1, kw1: _example_factors(
                        f, loss_fn, theta, xs1, kw1, hyper, spec.factored
                    )
                )(xs, kw)

            u_spec = P(spec.u_axis)
            facs = _local(spec, factors, (P(), u_spec, u_spec, P()), u_spec)(theta, xs, kw, hyper)
            least = MIN_GEMM_ROWS * spec.mesh.shape[spec.u_axis]
            parts = [-eta * _factored_dot(fb, rows_o, least) for fb in facs]
            return (jnp.stack(parts, axis=-1),)

        def per_example(theta, xs, kw, hyper):
            g = jax.vmap(lambda xs1, kw1: _example_grads(f, loss_fn, theta, xs1, kw1, hyper))(
                xs, kw
            )
            if not spec.kernel_norms:
                return g, None
            return g, jax.vmap(lambda x1: _z_rows(f, theta, x1))(xs[0])  # (c, V, P)

        u_spec = P(spec.u_axis)
        outs = (u_spec, u_spec) if spec.kernel_norms else (u_spec, None)
        g, ju = _local(spec, per_example, (P(), u_spec, u_spec, P()), outs)(theta, xs, kw, hyper)
        if spec.optimizer is None:  # the update of SGD: −η g_b per branch
            dirs = [-eta * gb for gb in g]
        else:  # per branch the optimizer linearised at its state, then the exact batch part
            unravel = ravel_pytree(theta)[1]

            def split(*gs):
                terms, carry, exact = update_parts(
                    spec.optimizer, opt_state, theta, tuple(unravel(x) for x in gs)
                )
                flat = lambda tree: ravel_pytree(tree)[0]
                return tuple(flat(tr) for tr in terms) + (flat(exact) - flat(carry),)

            dirs = list(jax.vmap(split)(*g))
        parts = [_project(spec, theta, rows_o, probes, d) for d in dirs]
        delta = jnp.stack(parts, axis=-1)
        if not spec.kernel_norms:
            return (delta,)
        k = jnp.einsum("ujp,oip->uoij", ju, zrows_o, precision=hi)
        fro = jnp.sqrt(jnp.sum(k * k, axis=(-2, -1)))
        return delta, fro, jnp.trace(k, axis1=-2, axis2=-1)

    u, o = spec.u_axis, spec.o_axis
    outs = (_shard(spec, u, o),) + ((_shard(spec, u, o),) * 2 if spec.kernel_norms else ())
    return jax.jit(program, out_shardings=outs)


def _rows_dot(dirs, rows, least: int):
    """``dirs (c, P) @ rows (M, P)ᵀ`` ``(c, M)`` as one 2-D matmul (1.4–1.7× an einsum), with zero
    rows added to ``dirs`` below ``least`` (:data:`MIN_GEMM_ROWS` per device): with one row
    XLA:CPU emits a matrix-vector product whose float32 sum over P drifts."""
    c, n_p = dirs.shape
    if c < least:
        dirs = jnp.concatenate([dirs, jnp.zeros((least - c, n_p), dirs.dtype)])
    out = jax.lax.dot_general(
        dirs, rows, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST
    )
    return out[:c]


def _factored_dot(fu, fo, least: int):
    """``⟨readout rows of o, g_u⟩`` ``(c, N_o, R)`` from factors: ``fu`` of a chunk of U
    (:func:`_example_factors`, batched: ``(c, S, d_in)``, ``(c, S, d_out)``, ``(c, P_rest)``) and
    ``fo`` of the probes (:func:`_readout_factors`, batched). Per dense layer
    ``Σ_{s,t} (a_u,s·a_o,t)(δ_u,s·δ_o,r,t)``, plus the rest's ``g_rest · rows_rest``."""
    hi = jax.lax.Precision.HIGHEST
    dims = (((1,), (1,)), ((), ()))
    a_u, d_u, g_u = fu
    a_o, d_o, rows = fo
    c = g_u.shape[0]
    n_o, r, n_p = rows.shape
    total = _rows_dot(g_u, rows.reshape(n_o * r, n_p), least).reshape(c, n_o, r)
    for au, du, ao, do in zip(a_u, d_u, a_o, d_o):
        if au.shape[1] == 1 and ao.shape[1] == 1:  # one position (an MLP): two 2-D matmuls
            kaa = jax.lax.dot_general(au[:, 0], ao[:, 0], dims, precision=hi)  # (c, N_o)
            kdd = jax.lax.dot_general(
                du[:, 0], do[:, :, 0].reshape(n_o * r, -1), dims, precision=hi
            )
            total = total + kaa[:, :, None] * kdd.reshape(c, n_o, r)
        else:  # S_u × S_o position pairs, then each readout's cotangents (no R·S² array)
            kaa = jnp.einsum("usi,oti->uost", au, ao, precision=hi)
            m = jnp.einsum("uost,usj->uotj", kaa, du, precision=hi)
            total = total + jnp.einsum("uotj,ortj->uor", m, do, precision=hi)
    return total


def _project(spec, theta, rows_o, probes, dirs):
    """The readout change of every probe along each parameter direction: ``(c, N_o, R)`` from
    ``dirs (c, P)``, by the kept rows (gram) or one JVP per (direction, probe)."""
    if spec.method == "gram":  # (c, P) @ (P, N_o·R)
        n_o, r, n_p = rows_o.shape
        least = MIN_GEMM_ROWS * spec.mesh.shape[spec.u_axis]
        flat = _rows_dot(dirs, rows_o.reshape(n_o * r, n_p), least)
        return flat.reshape(dirs.shape[0], n_o, r)
    f = spec.apply_fn
    unravel = ravel_pytree(theta)[1]

    def local(theta, dirs, x_o, y_o, m_o):
        def along(direction):
            t = unravel(direction)

            def one(x1, y1, m1):
                return jax.jvp(lambda th: _readout(f, th, x1, y1, m1, spec.kind), (theta,), (t,))[1]

            return jax.vmap(one)(x_o, y_o, m_o)

        if spec.dir_batch and spec.dir_batch < dirs.shape[0]:  # bounded memory (JVP_WORK)
            return jax.lax.map(along, dirs, batch_size=spec.dir_batch)
        return jax.vmap(along)(dirs)

    # per device: its directions (rows of U) along its probes, no cross-device data flow
    u_name = spec.u_axis if dirs.shape[0] % spec.mesh.shape[spec.u_axis] == 0 else None
    o_spec = P(spec.o_axis)
    in_specs = (P(), P(u_name), o_spec, o_spec, o_spec)
    return _local(spec, local, in_specs, P(u_name, spec.o_axis))(theta, dirs, *probes)


@functools.lru_cache(maxsize=32)
def _carry_fn(spec: _Spec):
    """The optimizer state's carry-over ``U(0)`` seen on every probe's readout: ``(N_o, R)``."""

    def program(theta, rows_o, probes, opt_state):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, theta)
        carry = ravel_pytree(spec.optimizer.update(zeros, opt_state, theta)[0])[0]
        return _project(spec, theta, rows_o, probes, carry[None])[0]

    return jax.jit(program, out_shardings=_shard(spec, spec.o_axis))


# ----------------------------------------------------------------------------- host helpers


def _global(x, sharding):
    """A host array as a global ``jax.Array`` of ``sharding`` (each process supplies its shards)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _host(arr):
    """The whole of a (possibly multi-process) global array on this host."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    return np.asarray(arr)


def _pad(a, n, axis=0):
    """``a`` with its ``axis`` padded to length ``n`` by repeating its last entry."""
    a = np.asarray(a)
    k = n - a.shape[axis]
    if k <= 0:
        return a
    last = np.take(a, [-1] * k, axis=axis)
    return np.concatenate([a, last], axis=axis)


def fingerprint(tree) -> str:
    """SHA-256 of a pytree's structure, shapes, dtypes and bytes (host arrays)."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h.update(str(treedef).encode())
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def optimizer_fingerprint(optimizer, opt_state, params, seed: int = 0) -> str:
    """SHA-256 of what an optax optimizer does at its state: its update of a fixed pseudo-random
    gradient and of a zero one (the carry-over), rounded to 15 bits of mantissa.

    An optax ``GradientTransformation`` is a pair of closures whose ``repr`` holds a memory address
    (another each time it is built), so it cannot name the job; its updates can: two optimizers
    with another learning rate, momentum, decay or ε give other updates, the same optimizer built
    again gives the same. The rounding keeps the fingerprint across machines whose last bits
    differ.
    """
    params = jax.device_get(params)
    opt_state = jax.device_get(opt_state)
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    g = jax.tree_util.tree_unflatten(
        treedef, [rng.standard_normal(np.shape(a)).astype(np.asarray(a).dtype) for a in leaves]
    )
    zeros = jax.tree_util.tree_map(np.zeros_like, g)
    h = hashlib.sha256()
    for grad in (g, zeros):
        upd = jax.device_get(optimizer.update(grad, opt_state, params)[0])
        for a in jax.tree_util.tree_leaves(upd):
            bits = np.ascontiguousarray(np.asarray(a, np.float32)).view(np.uint32) >> 8
            h.update(f"{np.shape(a)}".encode())
            h.update(bits.tobytes())
    return h.hexdigest()


def default_mesh(devices=None, o_devices: int = 1) -> Mesh:
    """A mesh over ``devices`` (default: all, every process's) with axes ``("u",)`` or, with
    ``o_devices > 1``, ``("u", "o")`` — U sharded over ``len(devices) / o_devices`` devices and O
    over ``o_devices``."""
    devices = list(jax.devices() if devices is None else devices)
    if o_devices < 1 or len(devices) % o_devices:
        raise ValueError(f"o_devices={o_devices} must divide the {len(devices)} devices")
    arr = np.asarray(devices, dtype=object)
    if o_devices == 1:
        return Mesh(arr, ("u",))
    return Mesh(arr.reshape(len(devices) // o_devices, o_devices), ("u", "o"))


def _one(x):
    """The shape of one example of the batch ``x`` (batch axis of size 1)."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(
            (1,) + np.shape(a)[1:], a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype
        ),
        x,
    )


def _factored_sizes(f, theta, x_o, x_u, readouts: int) -> dict:
    """``"factored"``'s sizes: ``pair`` the FLOPs per (u, o) pair, ``o_elems`` the numbers it
    keeps per probe, ``pair_elems`` the largest per-pair intermediate of one layer
    (``S_u·S_o + S_o·d_out``; 0 when every layer has one position), ``leaves`` the factored
    parameter leaves."""
    n_p = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(theta))
    lay_o = {lay.leaf: lay for lay in dense_factors.dense_layers(f, theta, _one(x_o))}
    lay_u = {lay.leaf: lay for lay in dense_factors.dense_layers(f, theta, _one(x_u))}
    leaves = sorted(lay_o.keys() & lay_u.keys())
    r = readouts
    n_rest = n_p - sum(lay_o[k].d_in * lay_o[k].d_out for k in leaves)
    pair, o_elems, pair_elems = 2.0 * n_rest * r, r * n_rest, 0
    for k in leaves:
        lo, lu = lay_o[k], lay_u[k]
        st = lo.positions * lu.positions
        if st == 1:  # (a_u·a_o)(δ_u·δ_o,r)
            pair += 2.0 * (lo.d_in + r * lo.d_out) + 2.0 * r
        else:  # K_a (S_u, S_o), then Σ_s K_a δ_u (S_o, d_out), then against δ_o,r
            pair += 2.0 * st * (lo.d_in + lo.d_out) + 2.0 * lo.positions * lo.d_out * r
            pair_elems = max(pair_elems, st + lo.positions * lo.d_out)
        o_elems += lo.positions * (lo.d_in + r * lo.d_out)
    return dict(pair=pair, o_elems=o_elems, pair_elems=pair_elems, leaves=tuple(leaves))


def method_costs(f, theta, x_o, *, n_u: int, n_o: int, readouts: int, x_u: Any = None) -> dict:
    """Estimated FLOPs of the algorithms beyond the per-example backward passes they share (module
    docstring): ``{"gram": 3F·N_o·R + 2P·R·N_u·N_o, "jvp": 3F·N_u·N_o,
    "factored": 3F·N_o·R + N_u·N_o·(2·P_rest·R + Σ_k c_k), "forward": F}`` with ``c_k`` a dense
    layer's FLOPs per pair, ``2(d_in + R·d_out) + 2R`` at one position,
    ``2·S_u·S_o·(d_in + d_out) + 2·S_o·d_out·R`` at ``S_u``, ``S_o`` positions,
    ``F`` the FLOPs of one probe's forward pass from XLA's cost analysis
    (``2P`` when the backend gives none), ``k`` the dense layers
    (:func:`ldjax._src.dense_factors.dense_layers`) at the shapes of one probe and one training
    example ``x_u`` (default: a probe's), ``P_rest`` the other parameters; ``"factored_sizes"``
    holds what ``"auto"`` checks against the memory budget (:func:`_factored_sizes`)."""
    n_p = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(theta))
    one = _one(x_o)
    try:
        cost = jax.jit(f).lower(theta, one).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
    except Exception:  # noqa: BLE001 - a backend without a cost model: the dense estimate
        flops = 0.0
    flops = flops if flops > 0 else 2.0 * n_p
    gram = 3.0 * flops * n_o * readouts + 2.0 * n_p * readouts * n_u * n_o
    sizes = _factored_sizes(f, theta, x_o, x_o if x_u is None else x_u, readouts)
    factored = 3.0 * flops * n_o * readouts + sizes["pair"] * n_u * n_o
    return dict(
        gram=gram,
        jvp=3.0 * flops * n_u * n_o,
        factored=factored,
        forward=flops,
        factored_sizes=sizes,
    )


def _split_kwargs(loss_kwargs, n_u):
    """Per-example arrays (leading axis ``N_u``) apart from hyper-parameters (scalars)."""
    per, hyper = {}, {}
    for k, v in (loss_kwargs or {}).items():
        if np.ndim(v) >= 1:
            if np.shape(v)[0] != n_u:
                raise ValueError(
                    f"loss_kwargs[{k!r}] has leading size {np.shape(v)[0]}; expected "
                    f"N_u = {n_u} (one row per training example) or a scalar"
                )
            per[k] = np.asarray(v)
        else:
            hyper[k] = v
    return per, hyper


# ----------------------------------------------------------------------------- the job


def influence(
    apply_fn: Callable,
    params: Any,
    x_u: Any,
    x_o: Any,
    loss_fn: Callable,
    *,
    eta: float | None = None,
    loss_kwargs: dict | None = None,
    optimizer: Any = None,
    opt_state: Any = None,
    targets_o: Any = None,
    mask_o: Any = None,
    per_token: bool = False,
    target_only: bool = False,
    kernel_norms: bool = False,
    chunk_size: int = 32,
    method: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    mesh: Mesh | None = None,
    out: str | None = None,
    audit_size: int = 0,
    audit_seed: int = 0,
    progress: bool = False,
) -> Influence:
    """The predicted one-step change of every probe after one step on each training example alone:
    plain SGD at ``eta``, or the real update of an optax ``optimizer`` from ``opt_state``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` ``(N, V)`` or ``(N, T, V)``.
      params: parameters (flax variables: only ``params`` is differentiated).
      x_u: the training examples, batch ``N_u``; for the DPO family the pair ``(x⁺, x⁻)``.
      x_o: the probes, batch ``N_o``.
      loss_fn: ``loss_fn(*logits, **loss_kwargs) -> (N,)``, e.g. ``ldjax.losses.dpo``; the step on u
        is ``Δθ = −η ∇θ L(x_u)``.
      eta: the step size η > 0 of a plain SGD step (not with ``optimizer``).
      optimizer, opt_state: an optax ``GradientTransformation`` and its state (e.g. from a training
        checkpoint): the step on u is the optimizer's update from that state. ``delta`` is then the
        part of the update that u's gradient makes, ``U(g_u) − U(0)`` (exact), the y⁺/y⁻
        ``terms`` are the optimizer linearised at its state (``K_P`` of its preconditioner, exactly
        additive), and the state's own carry-over ``U(0)`` — the same for every u, not u's
        doing — is ``Influence.delta_carry``.
      loss_kwargs: the loss's arguments for every training example (arrays with leading ``N_u``:
        targets, masks, reference log-probs) and its hyper-parameters (scalars: ``beta``, ...).
      targets_o, mask_o: ``(N_o, T)`` for sequence probes (the response tokens and where they are);
        for classifiers ``targets_o (N_o,)`` is optional and gives ``delta_loss_o``.
      per_token: sequences: one value per response token instead of the response's sum.
      target_only: classifiers: only each probe's own class, ``Δ log π(y_o|x_o)`` ``(N_u, N_o)``
        (needs ``targets_o``; ``R = 1`` instead of ``V``: the TracIn-at-one-checkpoint matrix
        ``−η g_oᵀ g_u`` of the probes' losses is ``delta_loss_o = −delta``).
      kernel_norms: classifiers: also ``‖K(x_o, x_u)‖_F`` and ``tr K(x_o, x_u)``.
      chunk_size: training examples per chunk (rounded up to a multiple of the mesh's ``"u"`` size;
        at most ``N_u`` so rounded: a small U computes no padded rows).
      method: ``"auto"``, ``"gram"``, ``"jvp"`` or ``"factored"`` (module docstring;
        ``"factored"`` only with ``eta`` and without ``kernel_norms``).
      memory_budget: bytes that ``"gram"``'s kept rows (``"factored"``'s kept factors) may take
        (``"auto"`` picks by it), and that ``"jvp"``'s work on one device may take: it pushes as
        many directions of U through its probes at once as fit, counting :data:`JVP_WORK`
        logits-sized arrays per (direction, probe), one direction at a time at least.
      mesh: a :class:`jax.sharding.Mesh` with axis ``"u"`` (and optionally ``"o"``); default: all
        devices on ``"u"`` (:func:`default_mesh`).
      out: a folder to stream the results into (zarr arrays and a manifest); a rerun of the same
        job resumes there, a changed job is refused (:mod:`ldjax._src.influence_store`).
      audit_size: measure the prediction against the actual one-step change for this many u drawn
        at random (seed ``audit_seed``) (:func:`audit`).
      progress: show a progress bar (pairs per second and ETA).
    Returns:
      An :class:`Influence`; with ``out``, its arrays are read from the store.

    Examples:
      >>> import jax.numpy as jnp, ldjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> x_u = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> x_o = jnp.array([[1.0, 1.0]])
      >>> kw = dict(targets=jnp.array([0, 2]))
      >>> inf = ldjax.influence(apply_fn, params, x_u, x_o, ldjax.losses.sft, eta=0.1,
      ...                       loss_kwargs=kw)
      >>> inf.delta.shape                                  # (N_u, N_o, V)
      (2, 1, 3)
      >>> d = ldjax.decompose(apply_fn, params, x_o, x_u[:1], ldjax.losses.sft, eta=0.1,
      ...                     loss_kwargs=dict(targets=jnp.array([0])))
      >>> bool(jnp.allclose(inf.delta[0], d.delta_logp_linear, atol=1e-7))
      True
    """
    if (eta is None) == (optimizer is None):
        raise ValueError(
            "pass eta (a plain SGD step) or optimizer (with its own learning rate and "
            "schedule), exactly one of them"
        )
    if optimizer is None and opt_state is not None:
        raise ValueError("opt_state given without an optimizer")
    eta = None if eta is None else validate.check_eta(eta)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    xs = branches(x_u)
    n_u = validate.check_batched(xs[0], "x_u")
    for k, x in enumerate(xs[1:], 1):
        if validate.check_batched(x, f"x_u[{k}]") != n_u:
            raise ValueError(
                f"x_u[{k}] has batch {validate.check_batched(x, f'x_u[{k}]')}, x_u[0] {n_u}"
            )
    f, theta = trainable_fn(apply_fn, params)
    shape_o = validate.logits_shape(apply_fn, params, x_o, "x_o")
    for k, x in enumerate(xs):
        validate.logits_shape(apply_fn, params, x, f"x_u[{k}]")
    n_o = shape_o[0]
    seq = len(shape_o) == 3
    kind = ("token" if per_token else "sequence") if seq else "class"
    if seq:
        if targets_o is None:
            raise ValueError("sequence probes need targets_o (N_o, T): the response tokens to read")
        y_o = np.asarray(targets_o)
        m_o = (
            np.ones(y_o.shape, bool)
            if mask_o is None
            else validate.check_mask(mask_o, shape_o[:2], "mask_o")
        )
        if y_o.shape != shape_o[:2]:
            raise ValueError(f"targets_o has shape {y_o.shape}; expected {shape_o[:2]} (N_o, T)")
        if kernel_norms:
            raise ValueError(
                "kernel_norms is for classifiers; for sequences use ldjax.entk with "
                "mask_o/mask_u and reduction='trace'"
            )
    else:
        if per_token:
            raise ValueError("per_token is for sequence models; these logits are (N, V)")
        y_o = np.zeros((n_o, 1), np.int32)  # unused by the class readout
        m_o = np.ones((n_o, 1), bool)
        if target_only:
            if targets_o is None:
                raise ValueError("target_only needs targets_o (N_o,): the probes' classes")
            validate.check_targets(targets_o, shape_o, "targets_o", "the probes' logits")
            y_o = np.asarray(targets_o).astype(np.int32)[:, None]
            kind = "target"
            if kernel_norms:
                raise ValueError("kernel_norms needs the full class readout (target_only=False)")
    if target_only and seq:
        raise ValueError("target_only is for classifiers (sequences read their targets already)")
    per, hyper = _split_kwargs(loss_kwargs, n_u)
    r = shape_o[-1] if kind == "class" else (shape_o[1] if kind == "token" else 1)
    n_params = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(theta))
    itemsize = np.dtype(jax.tree_util.tree_leaves(theta)[0].dtype).itemsize
    rows_bytes = n_o * r * n_params * itemsize * (2 if kernel_norms else 1)
    if method == "factored" and optimizer is not None:
        raise ValueError(
            "method='factored' is for a plain SGD step (eta); with optimizer= the step is not "
            "−η g_u: use method='gram' or 'jvp'"
        )
    if method == "factored" and kernel_norms:
        raise ValueError("kernel_norms needs method='gram' (the probes' Jacobian rows)")
    factored: tuple = ()
    if method in ("auto", "factored") and optimizer is None and not kernel_norms:
        factored = dense_factors.split_leaves(f, theta, [_one(x_o)] + [_one(x) for x in xs])[0]
    if method == "auto":
        costs = method_costs(f, theta, x_o, n_u=n_u, n_o=n_o, readouts=r, x_u=xs[0])
        fits = rows_bytes <= memory_budget
        method = "gram" if fits and (kernel_norms or costs["gram"] <= costs["jvp"]) else "jvp"
        if optimizer is None and not kernel_norms and costs["factored"] < costs[method]:
            sizes = costs["factored_sizes"]
            chunk_elems = chunk_size * n_o * sizes["pair_elems"]
            if (n_o * sizes["o_elems"] + chunk_elems) * itemsize <= memory_budget:
                method = "factored"
    if kernel_norms and method != "gram":
        raise ValueError(
            f"kernel_norms needs method='gram' (the probes' Jacobian rows, "
            f"{rows_bytes / 2**30:.2f} GiB, must be kept)"
        )

    mesh = default_mesh() if mesh is None else mesh
    if "u" not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis 'u' (training examples), got {mesh.axis_names}")
    o_axis = "o" if "o" in mesh.axis_names else None
    n_ud = mesh.shape["u"]
    n_od = mesh.shape["o"] if o_axis else 1
    chunk = -(-chunk_size // n_ud) * n_ud
    chunk = min(chunk, -(-n_u // n_ud) * n_ud)  # never more padded rows than U needs
    n_o_pad = -(-n_o // n_od) * n_od
    dir_batch = 0
    if method == "jvp":  # a chunk's JVPs at once unless their logits outgrow the budget
        per_dir = JVP_WORK * _logits_bytes(f, theta, x_o) * (n_o_pad // n_od)
        dir_batch = int(max(1, min(chunk // n_ud, memory_budget // max(per_dir, 1))))
    spec = _Spec(
        apply_fn,
        loss_fn,
        kind,
        len(xs),
        method,
        bool(kernel_norms),
        mesh,
        "u",
        o_axis,
        optimizer,
        dir_batch,
        factored if method == "factored" else (),
    )
    if optimizer is not None and opt_state is None:
        opt_state = optimizer.init(theta)
    rep = NamedSharding(mesh, P())
    state_g = (
        None
        if optimizer is None
        else jax.tree_util.tree_map(lambda a: _global(a, rep), jax.device_get(opt_state))
    )

    # probes: padded, sharded over "o" (replicated without it)
    o_sh = NamedSharding(mesh, P(o_axis))
    probes = tuple(_global(_pad(a, n_o_pad), o_sh) for a in (x_o, y_o, m_o))
    theta_g = jax.tree_util.tree_map(lambda a: _global(a, NamedSharding(mesh, P())), theta)
    kept: dict = {}

    def probe_rows():
        """The probes' rows (gram, kernel norms), computed once, only when a chunk needs them
        (a finished job computes nothing): each device computes its share, then they are
        gathered."""
        if not kept and (method in ("gram", "factored") or kernel_norms):
            n_all = mesh.devices.size
            all_sh = NamedSharding(mesh, P(tuple(mesh.axis_names)))
            spread = tuple(
                _global(_pad(a, -(-n_o // n_all) * n_all), all_sh) for a in (x_o, y_o, m_o)
            )
            if method == "gram":
                kept["rows"] = _readout_rows_fn(spec, n_o_pad)(theta_g, *spread)
            if method == "factored":
                kept["rows"] = _factor_rows_fn(spec, n_o_pad)(theta_g, *spread)
            if kernel_norms:
                kept["zrows"] = _z_rows_fn(spec, n_o_pad)(theta_g, spread[0])
        return kept.get("rows"), kept.get("zrows")

    hyper_g = {k: jnp.asarray(v) for k, v in hyper.items()}

    final = _FinalShapes(
        n_u, n_o, r, len(xs), kind, targets_o is not None, bool(kernel_norms), optimizer is not None
    )
    y_loss = None if targets_o is None else np.asarray(targets_o)
    dtype = np.dtype(jax.tree_util.tree_leaves(theta)[0].dtype)
    store = None
    if out is not None:
        from ldjax._src.influence_store import InfluenceStore  # noqa: PLC0415 - tensorstore is optional

        fp = dict(
            params=fingerprint(theta),
            x_u=fingerprint(xs),
            x_o=fingerprint(x_o),
            loss_kwargs=fingerprint((per, {k: float(v) for k, v in sorted(hyper.items())})),
            targets_o=fingerprint((y_o, m_o)),
        )
        loss_name = (
            f"{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', loss_fn)}"
        )
        config = dict(
            eta=eta,
            loss=loss_name,
            kind=kind,
            method=method,
            chunk_size=chunk,
            kernel_norms=bool(kernel_norms),
            mesh=dict(mesh.shape),
            dtype=str(dtype),
            optimizer=(
                None if optimizer is None else optimizer_fingerprint(optimizer, opt_state, theta)
            ),
        )
        if optimizer is not None:
            fp["opt_state"] = fingerprint(opt_state)
        store = InfluenceStore(
            out,
            final.shapes(),
            dict(fingerprints=fp, config=config),
            chunk_rows=chunk // n_ud,
            probe_cols=n_o_pad // n_od,
            dtype=dtype,
        )
        results = None
    else:
        results = {k: np.zeros(s, dtype) for k, s in final.shapes().items()}

    u_sh = NamedSharding(mesh, P("u"))
    program = _chunk_fn(spec)
    eta_a = jnp.asarray(0.0 if eta is None else eta, dtype)
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415 - tqdm belongs to the experiments extra

        bar = tqdm(total=n_u * n_o, unit="pair", unit_scale=True, desc="influence", mininterval=1.0)
    try:
        computed = 0
        for ci, a in enumerate(range(0, n_u, chunk)):
            b = min(a + chunk, n_u)
            if store is not None and store.is_done(ci):
                if bar is not None:
                    bar.update((b - a) * n_o)
                continue
            xs_c = tuple(
                jax.tree_util.tree_map(
                    lambda v, a=a, b=b: _global(_pad(np.asarray(v)[a:b], chunk), u_sh), x
                )
                for x in xs
            )
            kw_c = {k: _global(_pad(v[a:b], chunk), u_sh) for k, v in per.items()}
            rows, zrows = probe_rows()
            computed += 1
            outs = program(
                theta_g,
                rows,
                probes if method == "jvp" else None,
                zrows,
                xs_c,
                kw_c,
                hyper_g,
                eta_a,
                state_g,
            )
            if store is None:
                block = {k: _host(v)[: b - a, :n_o] for k, v in zip(_RAW, outs)}
                for k, v in final.finalize(block, y_loss).items():
                    results[k][a:b] = v
            else:
                store.write_shards(ci, _shard_writes(outs, a, b, n_o, final, y_loss))
            if bar is not None:
                bar.update((b - a) * n_o)
    finally:
        if bar is not None:
            bar.close()
    if store is not None:
        store.finish()
        results = {k: store.read(k) for k in final.shapes()}
    carry = None
    if optimizer is not None:
        rows = probe_rows()[0]
        c = _host(_carry_fn(spec)(theta_g, rows, probes if method == "jvp" else None, state_g))
        carry = c[:n_o, 0] if kind in ("sequence", "target") else c[:n_o]
    audit_result = None
    if audit_size:
        step_of = dict(eta=eta, optimizer=optimizer, opt_state=opt_state, carry=carry)
        audit_result = _stored_audit(
            store,
            apply_fn,
            params,
            xs,
            x_o,
            loss_fn,
            step_of,
            per,
            hyper,
            y_o,
            m_o,
            kind,
            results,
            audit_size,
            audit_seed,
        )
    return Influence(
        results["delta"],
        (results["delta_pos"], results["delta_neg"]) if len(xs) == 2 else None,
        results.get("delta_loss_o"),
        results.get("kernel_fro"),
        results.get("kernel_trace"),
        audit_result,
        kind,
        None if out is None else str(out),
        carry,
        method,
        computed,
        -(-n_u // chunk),
    )


_RAW = ("delta", "kernel_fro", "kernel_trace")
"""Names of the chunk program's outputs, in order."""


@dataclasses.dataclass(frozen=True)
class _FinalShapes:
    """From the chunk program's raw ``delta (c, N_o, R, B)`` to the user's arrays."""

    n_u: int
    n_o: int
    r: int
    n_branches: int
    kind: str
    loss_o: bool
    kernel_norms: bool
    optimizer: bool = False

    def _tail(self):
        return () if self.kind in ("sequence", "target") else (self.r,)

    def shapes(self) -> dict:
        base = (self.n_u, self.n_o) + self._tail()
        out = {"delta": base}
        if self.n_branches == 2:
            out.update(delta_pos=base, delta_neg=base)
        if self.loss_o:
            out["delta_loss_o"] = (self.n_u, self.n_o)
        if self.kernel_norms:
            out.update(kernel_fro=(self.n_u, self.n_o), kernel_trace=(self.n_u, self.n_o))
        return out

    def finalize(self, block: dict, y_loss, cols=slice(None)) -> dict:
        full = np.asarray(block["delta"])  # (rows, cols, R, B [+ 1 with an optimizer])
        if self.kind in ("sequence", "target"):
            full = full[:, :, 0]
        terms = full[..., : self.n_branches]
        out = {"delta": full[..., -1] if self.optimizer else terms.sum(-1)}
        if self.n_branches == 2:
            out.update(delta_pos=terms[..., 0], delta_neg=terms[..., 1])
        if self.loss_o:
            d = out["delta"]
            if self.kind == "class":
                y = np.asarray(y_loss)[cols].astype(int)
                out["delta_loss_o"] = -np.take_along_axis(d, y[None, :, None], axis=-1)[..., 0]
            else:
                out["delta_loss_o"] = -d if self.kind in ("sequence", "target") else -d.sum(-1)
        if self.kernel_norms:
            out.update(
                kernel_fro=np.asarray(block["kernel_fro"]),
                kernel_trace=np.asarray(block["kernel_trace"]),
            )
        return out


def _shard_writes(outs, a, b, n_o, final, y_loss) -> list:
    """This process's shards of one chunk's outputs as ``[(name, index, data)]`` in the arrays'
    global coordinates (padding dropped; replicated shards written once)."""
    writes = []
    by_index = [
        {tuple((s.start, s.stop) for s in sh.index[:2]): sh for sh in o.addressable_shards}
        for o in outs
    ]
    for sh in outs[0].addressable_shards:
        if sh.replica_id != 0:
            continue
        rows, cols = sh.index[0], sh.index[1]
        r0, r1 = rows.start or 0, rows.stop if rows.stop is not None else outs[0].shape[0]
        c0, c1 = cols.start or 0, cols.stop if cols.stop is not None else outs[0].shape[1]
        g0, g1 = a + r0, min(a + r1, b)
        h1 = min(c1, n_o)
        if g0 >= g1 or c0 >= h1:
            continue
        key = ((rows.start, rows.stop), (cols.start, cols.stop))
        block = {
            name: np.asarray(by_index[k][key].data)[: g1 - g0, : h1 - c0]
            for k, name in enumerate(_RAW[: len(outs)])
        }
        for name, data in final.finalize(block, y_loss, slice(c0, h1)).items():
            writes.append((name, (slice(g0, g1), slice(c0, h1)), data))
    return writes


# ----------------------------------------------------------------------------- the audit


def _actual_readout(step, y_o, m_o, kind):
    """The actual Δ log π of every probe's readout, in :class:`Influence`'s ``delta`` layout."""
    dl = np.asarray(step.delta_logp, np.float64)
    if kind == "class":
        return dl
    if kind == "target":
        return np.take_along_axis(dl, np.asarray(y_o)[:, :1].astype(int), axis=-1)[:, 0]
    picked = np.take_along_axis(dl, np.asarray(y_o)[..., None].astype(int), axis=-1)[..., 0]
    picked = picked * np.asarray(m_o, np.float64)
    return picked if kind == "token" else picked.sum(-1)


def _audit(apply_fn, params, xs, x_o, loss_fn, step_of, per, hyper, y_o, m_o, kind, delta, idx):
    """``step_of``: the step size η (SGD), or ``{"eta", "optimizer", "opt_state", "carry"}``; with
    an optimizer the predicted change of u's step is u's part plus the state's carry-over."""
    if not isinstance(step_of, dict):
        step_of = dict(eta=step_of, optimizer=None, opt_state=None, carry=None)
    if step_of.get("optimizer") is None:
        how = dict(eta=step_of["eta"])
    else:
        how = dict(optimizer=step_of["optimizer"], opt_state=step_of["opt_state"])
    carry = step_of.get("carry")
    pred, act, rel, agree = [], [], [], []
    for u in idx:
        xu = tuple(jax.tree_util.tree_map(lambda v, u=u: np.asarray(v)[u : u + 1], x) for x in xs)
        kw = dict({k: v[u : u + 1] for k, v in per.items()}, **hyper)
        step = actual_step(
            apply_fn, params, x_o, xu if len(xu) > 1 else xu[0], loss_fn, loss_kwargs=kw, **how
        )
        a = _actual_readout(step, y_o, m_o, kind)
        p = np.asarray(delta[int(u)], np.float64)
        if carry is not None:
            p = p + np.asarray(carry, np.float64)
        pred.append(p)
        act.append(a)
        rel.append(float(np.linalg.norm(p - a) / max(np.linalg.norm(a), 1e-300)))
        agree.append(float(np.mean(np.sign(p) == np.sign(a))))
    rel = np.asarray(rel)
    return dict(
        indices=np.asarray(idx, int),
        predicted=np.asarray(pred),
        actual=np.asarray(act),
        rel_error=rel,
        median_rel_error=float(np.median(rel)) if rel.size else float("nan"),
        sign_agreement=np.asarray(agree),
    )


def audit(
    apply_fn,
    params,
    x_u,
    x_o,
    loss_fn,
    *,
    eta,
    delta,
    indices,
    loss_kwargs=None,
    targets_o=None,
    mask_o=None,
) -> dict:
    """The measured error of an influence prediction: for each u in ``indices``, one real SGD step
    on u alone (:func:`ldjax.actual_step`) and the actual Δ log π of every probe's readout, against
    ``delta[u]`` (:attr:`Influence.delta`).

    Returns:
      ``{"indices" (k,), "predicted", "actual" (k, ...), "rel_error" (k,)
      (‖predicted − actual‖ / ‖actual‖ over the probes and readouts), "median_rel_error",
      "sign_agreement" (k,)}``.
    """
    xs = branches(x_u)
    n_u = validate.check_batched(xs[0], "x_u")
    per, hyper = _split_kwargs(loss_kwargs, n_u)
    shape_o = validate.logits_shape(apply_fn, params, x_o, "x_o")
    if len(shape_o) == 2 and np.ndim(delta) == 3:
        kind, y_o, m_o = "class", None, None
    elif len(shape_o) == 2:  # target_only: (N_u, N_o)
        kind, y_o, m_o = "target", np.asarray(targets_o)[:, None], None
    else:
        kind = "token" if np.ndim(delta) == 3 else "sequence"
        y_o = np.asarray(targets_o)
        m_o = np.ones(y_o.shape, bool) if mask_o is None else np.asarray(mask_o, bool)
    return _audit(
        apply_fn,
        params,
        xs,
        x_o,
        loss_fn,
        validate.check_eta(eta),
        per,
        hyper,
        y_o,
        m_o,
        kind,
        delta,
        np.asarray(indices, int),
    )


def _stored_audit(
    store,
    apply_fn,
    params,
    xs,
    x_o,
    loss_fn,
    step_of,
    per,
    hyper,
    y_o,
    m_o,
    kind,
    results,
    size,
    seed,
):
    n_u = results["delta"].shape[0]
    idx = np.sort(np.random.default_rng(seed).choice(n_u, size=min(int(size), n_u), replace=False))
    if store is not None:
        saved = store.read_audit()
        if saved is not None and np.array_equal(saved["indices"], idx):
            return saved
    result = None
    if jax.process_index() == 0:
        result = _audit(
            apply_fn,
            params,
            xs,
            x_o,
            loss_fn,
            step_of,
            per,
            hyper,
            y_o,
            m_o,
            kind,
            results["delta"],
            idx,
        )
        if store is not None:
            store.write_audit(result)
    if store is not None and jax.process_count() > 1:
        store.barrier("audit")
        result = store.read_audit()
    return result


def load_influence(path) -> dict:
    """The arrays an influence job streamed to ``out=path``, read lazily, with its manifest:
    ``{"manifest", "done", "delta", "delta_loss_o", ...}``
    (:func:`ldjax._src.influence_store.load_influence`; TensorStore is imported only here)."""
    from ldjax._src.influence_store import load_influence as _load  # noqa: PLC0415

    return _load(path)
