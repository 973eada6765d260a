"""K(x_o, x_u) estimated from randomly projected Jacobian rows, with its standard error.

Exact eNTK blocks cost P (parameters) per row and V rows per position. For a model too large for
that, :func:`entk_projected` sketches every Jacobian row ``g_r = ∇θ z_r`` to ``k`` numbers,

    φ_c(r) = ⟨ω_c, g_r⟩,   c = 1..k,   ω_c random with E[ω_c ω_cᵀ] = I,

and estimates ``K(r_o, r_u) = ⟨g_{r_o}, g_{r_u}⟩`` by ``K̂ = (1/k) Σ_c φ_c(r_o) φ_c(r_u)``: an
unbiased mean of k independent products, so its standard error comes from the sketch itself,
``SE² = (1/k) Var_c[φ_c(r_o) φ_c(r_u)]`` (:class:`ProjectedK`).

The sketch never forms a P-long row. On a Dense or Embedding site (``ldjax._src.structured``) the
row is ``Σ_s x_s ⊗ δ_{r,s}`` and ``ω_c = a_c ⊗ b_c`` is a Khatri–Rao (row-wise Kronecker) product
of two Gaussian vectors, so ``φ_c(r) = Σ_s ⟨a_c, x_s⟩ ⟨b_c, δ_{r,s}⟩``: ``S (C + F)`` work per row
and coordinate instead of ``C F``. Parameters that are not sites (biases not folded in, norms,
convolutions) get a dense Gaussian ``ω_c`` over their own entries. Each site's and leaf's random
numbers are drawn from ``key`` block by block (256 coordinates per block), so the same key gives
the same sketch for x_o and x_u, in any chunking, and the first k coordinates of a larger sketch
are the sketch of dimension k.

Reductions as :func:`ldjax.entk`. ``"full"`` and ``"diagonal"`` sketch every logit's row (V rows
per position); ``"sum_logits"`` one row per position. ``"trace"`` has two estimators:

* ``hutchinson=False``: the sum over i of the diagonal, from V rows per position;
* ``hutchinson=True`` (Hutchinson): coordinate c also draws a Rademacher ``v_c ∈ {±1}^V`` and
  sketches the row ``v_cᵀ J``: ``E[v_cᵀ J_o ω_c ω_cᵀ J_uᵀ v_c] = tr(J_o J_uᵀ)``. It needs k
  backward passes per position whatever V is: the estimator for vocabularies of 50k–150k.

When to use it: when ``P × V`` rows do not fit or take too long (real LLMs). For the models in
this repository the exact implementations are faster at any useful accuracy (the relative error
falls like ``1/√k``; ``benchmarks/bench_projected.py`` measures where it reaches 1 %).

Features can be stored (:func:`projected_features` with ``out=``, the batch job's zarr store) and
reused: new probes then cost only their own rows (:func:`projected_kernel`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldjax._src import validate
from ldjax._src.entk import (
    DEFAULT_MEMORY_BUDGET,
    REDUCTIONS,
    logit_rows,
    position_index,
    take_examples,
    trace_example,
)
from ldjax._src.structured import evaluate as evaluate_sites
from ldjax._src.structured import site_dims, site_shapes
from ldjax._src.trainable import trainable_fn

__all__ = [
    "ProjectedFeatures",
    "ProjectedK",
    "entk_projected",
    "load_projected_features",
    "projected_features",
    "projected_kernel",
    "projected_kernel_vector",
]

BLOCK = 256
"""Coordinates drawn per block of random numbers (part of the sketch's definition)."""

_TAG_FALLBACK, _TAG_PROBES = 1_000_003, 2_000_003


class ProjectedFeatures(NamedTuple):
    """Sketched Jacobian rows of a batch.

    Attributes:
      phi: ``(N, M, V', k)`` (``"full"``, ``"diagonal"``, exact ``"trace"``; ``V' = V``) or
        ``(N, M, k)`` (``"sum_logits"``, Hutchinson ``"trace"``); ``M = 1`` for a classifier.
        Rows of masked-out positions are zero.
      reduction, hutchinson: what the rows are.
      sequence: whether the model returns ``(N, T, V)`` logits (K keeps its position axes).
    """

    phi: jax.Array
    reduction: str
    hutchinson: bool
    sequence: bool

    @property
    def dim(self) -> int:
        return int(self.phi.shape[-1])


class ProjectedK(NamedTuple):
    """A projected eNTK estimate and its standard error.

    Attributes:
      K: the estimate, shaped as :func:`ldjax.entk`'s result for the same reduction.
      stderr: the standard error of every entry, same shape (from the sketch's k products).
      dim: k.
    """

    K: jax.Array
    stderr: jax.Array
    dim: int

    def frobenius_error_bound(self, confidence: float = 0.95) -> float:
        """``t`` with ``P(‖K̂ − K‖_F ≤ t) ≥ confidence``, by Chebyshev on
        ``E‖K̂ − K‖²_F = Σ SE²``: ``t = √(Σ SE² / (1 − confidence))`` (SE estimated from the
        sketch, so the bound is itself an estimate; ``benchmarks/bench_projected.py`` measures
        how often it holds)."""
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        se2 = float(np.sum(np.asarray(self.stderr, np.float64) ** 2))
        return math.sqrt(se2 / (1.0 - confidence))

    def relative_error_bound(self, confidence: float = 0.95) -> float:
        """:meth:`frobenius_error_bound` divided by ``‖K̂‖_F``."""
        norm = float(np.linalg.norm(np.asarray(self.K, np.float64)))
        return self.frobenius_error_bound(confidence) / max(norm, 1e-300)


# ----------------------------------------------------------------------------- the sketch


def _normal(key, tag: int, block, shape, dtype):
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, tag), block), shape, dtype)


def _site_block(k, s_dims, x, d, key, j, dtype, paired):
    """One block of a site's coordinates: ``Σ_s ⟨a_c, x_s⟩ ⟨b_c, δ_{r,s}⟩``."""
    _, c_dim, f_dim = s_dims
    a = _normal(key, 2 * k, j, (c_dim, BLOCK), dtype)
    b = _normal(key, 2 * k + 1, j, (f_dim, BLOCK), dtype)
    xa = x @ a  # (S, BLOCK)
    if paired:  # row c is coordinate c's own row (Hutchinson): d (M, BLOCK, S, F)
        return jnp.einsum("sc,mcs->mc", xa, jnp.einsum("mcsf,fc->mcs", d, b))
    return jnp.einsum("sc,mrsc->mrc", xa, jnp.einsum("mrsf,fc->mrsc", d, b))


def _fallback_block(l, jrow, key, j, dtype, paired):
    g = _normal(key, _TAG_FALLBACK + l, j, (jrow.shape[-1], BLOCK), dtype)
    if paired:
        return jnp.einsum("mcp,pc->mc", jrow, g)
    return jnp.einsum("mrp,pc->mrc", jrow, g)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sketch(apply_fn, reduction, hutchinson, n_blocks, variables, x, pos, valid, key):
    """``(n, M, V', n_blocks·BLOCK)`` or ``(n, M, n_blocks·BLOCK)`` features of a chunk."""
    _, leaves, closed, plan = trace_example(apply_fn, variables, x, True)
    shapes = site_shapes(closed, plan)
    dims = site_dims(closed, plan)
    fb = plan.fallback
    rows_red = "sum_logits" if reduction == "sum_logits" else "full"
    n_logits = int(jax.eval_shape(lambda: apply_fn(variables, x)).shape[-1])

    def per_example(x1, pos1, valid1):
        xl = jax.tree_util.tree_leaves(x1)

        def g(fb_vals, eps, probes):
            ls = list(leaves)
            for q, l in enumerate(fb):
                ls[l] = fb_vals[q]
            outs, xs = evaluate_sites(closed, ls + xl, plan, eps)
            r = logit_rows(outs[0], pos1, valid1, rows_red)
            if probes is not None:
                r = r @ probes.T.astype(r.dtype)  # (M, BLOCK): row c is v_cᵀ z
            return r, xs

        eps0 = [jnp.zeros(s.shape, s.dtype) for s in shapes]
        fb0 = [leaves[l] for l in fb]

        def rows(probes):
            (jr, d), xs = jax.jacrev(g, argnums=(0, 1), has_aux=True)(fb0, eps0, probes)
            jr = [a.reshape(a.shape[:2] + (-1,)) for a in jr]
            ds = []
            for s, a in zip(plan.sites, d):
                a = jnp.transpose(a, (0, 1) + tuple(2 + i for i in s.out_perm))
                shp = a.shape[2:]
                n_s = int(np.prod(shp[: s.n_x_free], dtype=np.int64))
                ds.append(a.reshape(a.shape[:2] + (n_s, -1)))
            return jr, ds, xs

        def block(j, jr, ds, xs, paired):
            dtype = xs[0].dtype if xs else jr[0].dtype
            phi = 0.0
            for k, (sd, xk, dk) in enumerate(zip(dims, xs, ds)):
                phi = phi + _site_block(k, sd, xk, dk, key, j, dtype, paired)
            for q, l in enumerate(fb):
                phi = phi + _fallback_block(l, jr[q], key, j, dtype, paired)
            return phi

        if hutchinson:

            def hblock(j):
                v = jax.random.rademacher(
                    jax.random.fold_in(jax.random.fold_in(key, _TAG_PROBES), j),
                    (BLOCK, n_logits),
                    jnp.float32,
                )
                jr, ds, xs = rows(v)
                return block(j, jr, ds, xs, True)  # (M, BLOCK)

            phis = jax.lax.map(hblock, jnp.arange(n_blocks))  # (nb, M, BLOCK)
            return jnp.moveaxis(phis, 0, -2).reshape(phis.shape[1], -1)
        jr, ds, xs = rows(None)
        phis = jax.lax.map(lambda j: block(j, jr, ds, xs, False), jnp.arange(n_blocks))
        return jnp.moveaxis(phis, 0, -2).reshape(phis.shape[1:3] + (-1,))

    return jax.vmap(per_example)(x, pos, valid)


# ----------------------------------------------------------------------------- checks


def _check_dim(dim) -> int:
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 2:
        raise ValueError(f"dim must be an int >= 2 (the sketch's k), got {dim!r}")
    return int(dim)


def _check_key(key):
    try:
        k = jnp.asarray(key)
    except TypeError as e:
        raise ValueError(f"key must be a jax.random key, got {type(key).__name__}") from e
    if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
        if k.shape != ():
            raise ValueError(f"key must be a single key, got shape {k.shape}")
        return k
    if k.shape != (2,) or k.dtype != jnp.uint32:
        raise ValueError(
            f"key must be a jax.random.key(...) or PRNGKey(...) (uint32[2]), got "
            f"{k.dtype}{list(k.shape)}"
        )
    return k


# ----------------------------------------------------------------------------- public API


def projected_features(
    apply_fn: Callable,
    params: Any,
    x: Any,
    *,
    dim: int,
    key: Any,
    reduction: str = "full",
    mask: Any | None = None,
    hutchinson: bool | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    out: str | Path | None = None,
) -> ProjectedFeatures:
    """Sketched Jacobian rows of ``x`` (module docstring): the part of a projected eNTK that one
    side of K needs; compute the training set's once and reuse it for every probe.

    Args:
      apply_fn, params, x, reduction, mask: as :func:`ldjax.entk` (one side).
      dim: k, the sketch dimension (standard error ∝ 1/√k).
      key: a ``jax.random`` key; the same key gives the same sketch on both sides of K.
      hutchinson: only for ``"trace"``: Hutchinson's estimator (k backward passes per position,
        whatever V) or the exact sum of the diagonal (V rows). Default: Hutchinson when
        ``V > dim``.
      memory_budget: bytes one chunk's rows may take (chunks over examples).
      out: a folder: the features are written there chunk by chunk (zarr, with a manifest of
        fingerprints: ``ldjax.influence``'s store) and a rerun resumes; read back with
        :func:`load_projected_features`.
    Returns:
      :class:`ProjectedFeatures`.

    Examples:
      >>> import jax, jax.numpy as jnp, ldjax
      >>> f = lambda p, x: x @ p["w"]
      >>> p = {"w": jnp.ones((3, 2))}
      >>> x = jnp.array([[1.0, 0.0, 2.0]])
      >>> feats = ldjax.projected_features(f, p, x, dim=512, key=jax.random.key(0))
      >>> feats.phi.shape                                  # (N, M, V, k)
      (1, 1, 2, 512)
    """
    dim = _check_dim(dim)
    key = _check_key(key)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")
    _, p = trainable_fn(apply_fn, params)
    if not jax.tree_util.tree_leaves(p):
        raise ValueError("params has no trainable leaves (flax: the 'params' collection is empty)")
    shape = validate.logits_shape(apply_fn, params, x, "x")
    seq = len(shape) == 3
    if not seq and mask is not None:
        raise ValueError(f"mask given, but the logits {shape} have no position axis")
    m = None if mask is None else validate.check_mask(mask, shape[:2], "mask")
    pos, valid = position_index(m, shape[0], shape[1] if seq else 1)
    v = shape[-1]
    if hutchinson is None:
        hutchinson = reduction == "trace" and v > dim
    if hutchinson and reduction != "trace":
        raise ValueError(f"hutchinson=True estimates the trace; reduction is {reduction!r}")
    hutchinson = bool(hutchinson)
    n_blocks = -(-dim // BLOCK)
    n, mm = pos.shape
    n_par = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(p))
    itemsize = np.dtype(jax.tree_util.tree_leaves(p)[0].dtype).itemsize
    rows = BLOCK if hutchinson else (1 if reduction == "sum_logits" else v)
    # the rows of one example (bounded by P per row), and its features
    per_ex = mm * rows * (n_par + n_blocks * BLOCK) * itemsize * 3
    chunk = int(max(1, min(n, memory_budget // max(per_ex, 1))))
    tail = (dim,) if (hutchinson or reduction == "sum_logits") else (v, dim)

    def compute(a, b):
        idx = np.minimum(np.arange(a, a + chunk), b - 1)
        xc = x if (a == 0 and b == n == chunk) else take_examples(x, idx)
        phi = _sketch(
            apply_fn,
            reduction,
            hutchinson,
            n_blocks,
            params,
            xc,
            jnp.asarray(pos[idx]),
            jnp.asarray(valid[idx]),
            key,
        )
        if reduction == "sum_logits":
            phi = phi[:, :, 0]  # the one row Σ_i z_i
        return phi[: b - a, ..., :dim]

    if out is not None:
        phi = _features_to_store(
            Path(out), compute, n, mm, tail, chunk, itemsize, apply_fn, params, x, key,
            dict(reduction=reduction, hutchinson=hutchinson, dim=dim, sequence=seq, mask=m),
        )  # fmt: skip
    else:
        phi = jnp.concatenate([compute(a, min(a + chunk, n)) for a in range(0, n, chunk)])
    return ProjectedFeatures(phi, reduction, hutchinson, seq)


def _features_to_store(path, compute, n, mm, tail, chunk, itemsize, apply_fn, params, x, key, cfg):
    from ldjax._src.influence import fingerprint  # noqa: PLC0415 (the store is optional)
    from ldjax._src.influence_store import InfluenceStore  # noqa: PLC0415

    shape = (n, mm) + tail
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    identity = dict(
        fingerprints=dict(
            params=fingerprint(trainable_fn(apply_fn, params)[1]),
            x=fingerprint(x),
            mask=fingerprint(cfg["mask"]) if cfg["mask"] is not None else None,
            key=np.asarray(key_data).tolist(),
        ),
        config=dict(
            job="projected_features",
            reduction=cfg["reduction"],
            hutchinson=cfg["hutchinson"],
            dim=cfg["dim"],
            sequence=cfg["sequence"],
        ),
    )
    dtype = {4: "float32", 8: "float64", 2: "float32"}[itemsize]
    store = InfluenceStore(
        path, {"features": shape}, identity, chunk_rows=chunk, probe_cols=mm, dtype=dtype
    )
    for ci, a in enumerate(range(0, n, chunk)):
        if store.is_done(ci):
            continue
        b = min(a + chunk, n)
        store.write_shards(ci, [("features", slice(a, b), np.asarray(compute(a, b), dtype))])
    store.finish()
    return jnp.asarray(np.asarray(store.read("features")))


def load_projected_features(path: str | Path) -> ProjectedFeatures:
    """The features a :func:`projected_features` call with ``out=path`` wrote; an error if the
    folder is not such a store or not finished (rerun the call to resume it)."""
    import json  # noqa: PLC0415

    import tensorstore as ts  # noqa: PLC0415

    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise ValueError(f"{path}: no manifest.json; not a projected-features store")
    man = json.loads(mpath.read_text(encoding="utf-8"))
    cfg = man.get("config", {})
    if cfg.get("job") != "projected_features":
        raise ValueError(f"{path}: holds {cfg.get('job', 'an influence job')!r}, not features")
    n = man["arrays"]["features"]["shape"][0]
    rows = man["chunk_rows"]
    missing = [
        ci
        for ci in range(-(-n // rows))
        if not all(
            (path / "done" / f"chunk-{ci:06d}.p{k}").exists() for k in range(man["process_count"])
        )
    ]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} chunk(s) of the features are not written yet (first: "
            f"{missing[0]}); rerun projected_features with the same arguments to finish"
        )
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / "features.zarr")}}
    phi = ts.open(spec, open=True).result().read().result()
    return ProjectedFeatures(
        jnp.asarray(np.asarray(phi)), cfg["reduction"], cfg["hutchinson"], cfg["sequence"]
    )


def _check_pair(fo: ProjectedFeatures, fu: ProjectedFeatures) -> None:
    for name in ("reduction", "hutchinson", "sequence"):
        if getattr(fo, name) != getattr(fu, name):
            raise ValueError(
                f"features disagree on {name}: {getattr(fo, name)!r} vs {getattr(fu, name)!r}"
            )
    if fo.phi.shape[-1] != fu.phi.shape[-1]:
        raise ValueError(f"features disagree on dim: {fo.phi.shape[-1]} vs {fu.phi.shape[-1]}")
    if fo.phi.ndim == 4 and fo.phi.shape[2] != fu.phi.shape[2]:
        raise ValueError(f"features disagree on V: {fo.phi.shape[2]} vs {fu.phi.shape[2]}")


@functools.partial(jax.jit, static_argnums=(0,))
def _estimate(kind, po, pu):
    k = po.shape[-1]
    if kind == "trace_rows":  # Σ_i over V rows: the k products are formed explicitly
        prod = jnp.einsum("omic,ulic->oumlc", po, pu)
        mean = jnp.mean(prod, axis=-1)
        m2 = jnp.mean(prod**2, axis=-1)
    else:
        spec = {
            "full": "omic,uljc->oumlij",
            "diagonal": "omic,ulic->oumli",
            "scalar": "omc,ulc->ouml",
        }[kind]
        mean = jnp.einsum(spec, po, pu) / k
        m2 = jnp.einsum(spec, po**2, pu**2) / k
    var = jnp.maximum(m2 - mean**2, 0.0) * (k / (k - 1))
    return mean, jnp.sqrt(var / k)


def projected_kernel(fo: ProjectedFeatures, fu: ProjectedFeatures | None = None) -> ProjectedK:
    """K̂ between two batches' features (``fu`` None: K̂(x_o, x_o)) and its standard error.

    Returns:
      :class:`ProjectedK`; ``K`` is shaped as :func:`ldjax.entk`'s result.
    """
    fu = fo if fu is None else fu
    _check_pair(fo, fu)
    if fo.reduction == "trace" and not fo.hutchinson:
        kind = "trace_rows"
    elif fo.phi.ndim == 3:
        kind = "scalar"
    else:
        kind = fo.reduction
    mean, se = _estimate(kind, fo.phi, fu.phi)
    if not fo.sequence:
        mean, se = mean[:, :, 0, 0], se[:, :, 0, 0]
    return ProjectedK(mean, se, fo.dim)


@jax.jit
def _kv(po, pu, v):
    k = po.shape[-1]
    psi = jnp.einsum("uljc,ulj->uc", pu, v)  # each u's sketched gradient J_uᵀ v_u
    per_c = jnp.einsum("omic,c->omic", po, jnp.sum(psi, axis=0))
    mean = jnp.mean(per_c, axis=-1)
    var = jnp.maximum(jnp.mean(per_c**2, axis=-1) - mean**2, 0.0) * (k / (k - 1))
    return mean, jnp.sqrt(var / k)


def projected_kernel_vector(
    fo: ProjectedFeatures, fu: ProjectedFeatures, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``K̂·v = Σ_u K̂(x_o, x_u) v_u`` (the projected :func:`ldjax.entk_vp`) and its standard error,
    from ``"full"`` features: ``(1/k) Σ_c φ_c(o) ⟨φ_c(u), v⟩``.

    Args:
      fo, fu: ``"full"`` :class:`ProjectedFeatures` of x_o and x_u.
      v: ``(N_u, V)`` or ``(N_u, T, V)``, e.g. G (masked positions: the features are zero there).
    Returns:
      ``(Kv, stderr)``, each ``(N_o, V)`` or ``(N_o, M, V)`` (M: x_o's kept positions).
    """
    _check_pair(fo, fu)
    if fo.reduction != "full":
        raise ValueError(f"K·v needs 'full' features, got {fo.reduction!r}")
    v = jnp.asarray(v)
    n_u, l_u, vv = fu.phi.shape[:3]
    want = (n_u, vv) if not fu.sequence else (n_u, None, vv)
    if v.ndim != len(want) or v.shape[0] != n_u or v.shape[-1] != vv:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected {want} (x_u's logits)")
    if fu.sequence:
        if v.shape[1] != l_u:
            raise ValueError(
                f"v has {v.shape[1]} positions; the features of x_u keep {l_u} (the positions "
                "its mask selects, in order)"
            )
    else:
        v = v[:, None]
    kv, se = _kv(fo.phi, fu.phi, v.astype(fu.phi.dtype))
    if not fo.sequence:
        kv, se = kv[:, 0], se[:, 0]
    return kv, se


def entk_projected(
    apply_fn: Callable,
    params: Any,
    x_o: Any,
    x_u: Any = None,
    *,
    dim: int,
    key: Any,
    reduction: str = "full",
    mask_o: Any | None = None,
    mask_u: Any | None = None,
    hutchinson: bool | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> ProjectedK:
    """The projected eNTK (module docstring) with its standard error: ``entk(...,
    implementation="projected", dim=k, key=key)`` returns this result's ``K``.

    Args:
      apply_fn, params, x_o, x_u, reduction, mask_o, mask_u, memory_budget: as
        :func:`ldjax.entk`.
      dim: k; key: the sketch's ``jax.random`` key; hutchinson: see :func:`projected_features`.
    Returns:
      :class:`ProjectedK`: ``K`` (the shape :func:`ldjax.entk` gives), ``stderr`` per entry,
      :meth:`ProjectedK.relative_error_bound`.

    Examples:
      A linear model ``z = x W`` has ``K = ⟨x_o, x_u⟩ I``; with k = 4096 the estimate is within a
      few standard errors of it:

      >>> import jax, jax.numpy as jnp, ldjax
      >>> f = lambda p, x: x @ p["w"]
      >>> p = {"w": jnp.ones((3, 2))}
      >>> x = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
      >>> est = ldjax.entk_projected(f, p, x, dim=4096, key=jax.random.key(0))
      >>> est.K.shape, est.stderr.shape
      ((2, 2, 2, 2), (2, 2, 2, 2))
      >>> exact = ldjax.entk(f, p, x)
      >>> bool(jnp.all(jnp.abs(est.K - exact) <= 5 * est.stderr + 1e-6))
      True
    """
    same = x_u is None or x_u is x_o
    if x_u is None:
        x_u, mask_u = x_o, mask_o if mask_u is None else mask_u
    kw = dict(
        dim=dim,
        key=key,
        reduction=reduction,
        hutchinson=hutchinson,
        memory_budget=memory_budget,
    )
    fo = projected_features(apply_fn, params, x_o, mask=mask_o, **kw)
    if same and (mask_u is mask_o):
        return projected_kernel(fo)
    if validate.logits_shape(apply_fn, params, x_u, "x_u")[-1] != fo.phi.shape[2] and (
        fo.phi.ndim == 4
    ):
        raise ValueError("logits of x_o and x_u disagree on V")
    fu = projected_features(apply_fn, params, x_u, mask=mask_u, **kw)
    if fo.sequence != fu.sequence:
        raise ValueError("x_o and x_u: one gives sequence logits (N, T, V), the other (N, V)")
    return projected_kernel(fo, fu)
