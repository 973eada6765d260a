"""Build the neural-tangents golden eNTK fixtures ``tests/golden/{mlp,lenet,transformer}.npz``.

Run with the PEER venv (jax 0.4.25 + neural-tangents 0.6.5; see ``tests/golden/README.md``)::

    cd /path/to/repo && .peer/bin/python tests/golden/make_golden.py

It loads ``ldjax/zoo.py`` by path (never ``ldjax/__init__.py``, which needs flax), draws params and
inputs with a seeded numpy RNG (``jax.random`` streams differ between jax versions), computes the
full empirical NTK in float64 with all three neural-tangents implementations
(``nt.empirical_ntk_fn(apply, trace_axes=(), vmap_axes=0, implementation=...)``), checks they agree
to 1e-10 (relative, Frobenius) and agree with a plain ``jacrev`` contraction, and writes, via
``zoo.save_npz``:

    params/...    float64 model parameters (nested-dict keys joined by '/')
    x_o, x_u      inputs; (N, D) float64 / (N, 28, 28, 1) float64 / (N, T) int32 tokens
    z_o, z_u      peer logits apply(params, x_o), apply(params, x_u)
    K             eNTK in ldjax layout (see below), float64
    model         'mlp' | 'lenet' | 'transformer'
    n_heads       (transformer only) static head count for zoo.transformer_apply
    nt_version, jax_version, numpy_version

neural-tangents output layout (verified here against jacrev): with ``trace_axes=()``,
``diagonal_axes=()`` and outputs ``f(params, x)`` of shape ``(N, X, Y, ...)``, nt returns shape
``(N1, N2, X, X, Y, Y, ...)``: batch axes first, then the non-batch output axes *interleaved* in
pairs (``utils.zip_axes``), i.e. ``K_nt[a, b, x1, x2, y1, y2] = <d f(x1_a)[x1, y1]/dθ,
d f(x2_b)[x2, y2]/dθ>``. Hence:

* classifiers, logits ``(N, V)``: nt gives ``(N_o, N_u, V, V)`` = ldjax ``K[o, u, i, j]``;
* transformer, logits ``(N, T, V)``: nt gives ``(N_o, N_u, T, T, V, V)`` =
  ldjax ``K[o, u, m, l, i, j] = <d z_o[m, i]/dθ, d z_u[l, j]/dθ>``.

So no transpose is needed; the script asserts this (``NT_TO_LDJAX`` is the identity permutation).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-10


def load_zoo():
    spec = importlib.util.spec_from_file_location(
        "ldjax_zoo_peer", os.path.join(ROOT, "ldjax", "zoo.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


zoo = load_zoo()

IMPLS = {
    "JACOBIAN_CONTRACTION": nt.NtkImplementation.JACOBIAN_CONTRACTION,
    "NTK_VECTOR_PRODUCTS": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
    "STRUCTURED_DERIVATIVES": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
}

# nt axis order -> ldjax axis order (identity, asserted against jacrev below).
NT_TO_LDJAX = {2: (0, 1), 4: (0, 1, 2, 3), 6: (0, 1, 2, 3, 4, 5)}


def numpy_params(rng, template):
    """Replace each leaf of ``template`` by seeded numpy draws of the same shape (float64).

    kernels / embeddings: N(0, 1/fan_in) with fan_in = prod(shape[:-1]) (embeddings N(0, 1));
    biases: 0.1 N(0, 1) (non-zero so bias paths are exercised); LayerNorm scale 1 + 0.1 N(0, 1).
    """
    out = {}
    for k in sorted(template):
        v = template[k]
        if isinstance(v, dict):
            out[k] = numpy_params(rng, v)
            continue
        shape = tuple(v.shape)
        if k == "scale":
            out[k] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k == "bias":
            out[k] = 0.1 * rng.standard_normal(shape)
        elif k in ("embed", "pos_embed"):
            out[k] = rng.standard_normal(shape)
        else:
            out[k] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return out


def jacrev_K(apply, params, x_o, x_u):
    """Reference: K = sum over leaves of J_o J_u^T, ldjax layout, via jax.jacrev."""
    j_o = jax.jacrev(apply)(params, x_o)
    j_u = jax.jacrev(apply)(params, x_u)
    out_nd = apply(params, x_o).ndim - 1  # non-batch output axes (1 or 2)

    def contract(a, b):
        a = a.reshape(a.shape[: 1 + out_nd] + (-1,))
        b = b.reshape(b.shape[: 1 + out_nd] + (-1,))
        if out_nd == 1:
            return jnp.einsum("oip,ujp->ouij", a, b)
        return jnp.einsum("omip,uljp->oumlij", a, b)

    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(contract, j_o, j_u))
    return sum(leaves)


def nt_kernels(apply, params, x_o, x_u):
    out = {}
    for name, impl in IMPLS.items():
        fn = jax.jit(nt.empirical_ntk_fn(apply, trace_axes=(), vmap_axes=0, implementation=impl))
        out[name] = np.asarray(fn(x_o, x_u, params))
    return out


def rel(a, b):
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-300))


def build(name, seed):
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(0)  # only the tree structure / shapes are used
    extra = {}
    if name == "mlp":
        template = zoo.mlp_init(key, sizes=(20, 16, 16, 5))
        apply = zoo.mlp_apply
        x_o = rng.standard_normal((3, 20))
        x_u = rng.standard_normal((4, 20))
    elif name == "lenet":
        template = zoo.lenet_init(key)
        apply = zoo.lenet_apply
        x_o = rng.uniform(0.0, 1.0, (2, 28, 28, 1))
        x_u = rng.uniform(0.0, 1.0, (3, 28, 28, 1))
    elif name == "transformer":
        n_heads = 2
        template = zoo.transformer_init(
            key, vocab=11, d_model=8, n_heads=n_heads, n_layers=1, max_len=6
        )

        def apply(p, t):
            return zoo.transformer_apply(p, t, n_heads=n_heads)

        x_o = rng.integers(0, 11, (2, 6)).astype(np.int32)
        x_u = rng.integers(0, 11, (2, 6)).astype(np.int32)
        extra["n_heads"] = np.int32(n_heads)
    else:
        raise ValueError(name)
    params = numpy_params(rng, template)
    params_j = jax.tree_util.tree_map(jnp.asarray, params)

    z_o = np.asarray(apply(params_j, x_o))
    z_u = np.asarray(apply(params_j, x_u))
    ks = nt_kernels(apply, params_j, x_o, x_u)
    ref = np.asarray(jacrev_K(apply, params_j, x_o, x_u))

    k_nt = ks["JACOBIAN_CONTRACTION"]
    perm = NT_TO_LDJAX[k_nt.ndim]
    k = np.transpose(k_nt, perm)
    expect_shape = (x_o.shape[0], x_u.shape[0]) + sum(((d, d) for d in z_o.shape[1:]), ())
    if k.shape != expect_shape:
        raise AssertionError(f"{name}: nt K shape {k_nt.shape}, expected {expect_shape}")
    report = {impl: rel(np.transpose(v, perm), k) for impl, v in ks.items()}
    report["jacrev"] = rel(ref, k)
    # The shape check rules out (N1, N2, T, V, T, V); the jacrev check rules out swapped pairs.
    for what, err in report.items():
        if not err < TOL:
            raise AssertionError(f"{name}: {what} vs JACOBIAN_CONTRACTION rel err {err:.3e}")

    path = os.path.join(HERE, f"{name}.npz")
    zoo.save_npz(
        path,
        params,
        x_o=x_o,
        x_u=x_u,
        z_o=z_o,
        z_u=z_u,
        K=k,
        model=np.str_(name),
        nt_version=np.str_(nt.__version__),
        jax_version=np.str_(jax.__version__),
        numpy_version=np.str_(np.__version__),
        **extra,
    )
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
    print(
        f"{name}: K {k.shape} ||K||_F={np.linalg.norm(k):.6e} P={n_params} "
        f"rel errs {', '.join(f'{a}={b:.1e}' for a, b in report.items())} "
        f"-> {path} ({os.path.getsize(path) / 1024:.1f} KB)"
    )


def main(argv):
    names = argv or ["mlp", "lenet", "transformer"]
    seeds = {"mlp": 0, "lenet": 1, "transformer": 2}
    print(f"jax {jax.__version__}, neural-tangents {nt.__version__}, numpy {np.__version__}")
    for name in names:
        build(name, seeds[name])


if __name__ == "__main__":
    main(sys.argv[1:])
