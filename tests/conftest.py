"""Shared test helpers: the jacrev J_o J_uᵀ baseline, small models, float64 switch."""

import contextlib
import functools
import gc
import importlib.util
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from ldjax import zoo

SHARED_DATA = os.environ.get("LDJAX_DATA")

# One persistent XLA compilation cache per test session, shared by the xdist workers (they inherit
# this process's environment) and by the subprocesses that the CLI, kill and notebook tests start:
# most of the slow tier's time is compiling, and many tests compile the same programs in other
# processes. A cached executable is the one XLA compiled, so no number changes. The size cap turns
# on jax's file lock (the filelock package, a test dependency), so that no process reads a
# half-written entry. The process that made the folder removes it at the end (pytest_unconfigure).
# LDJAX_TEST_XLA_CACHE=0 turns the cache off; a JAX_COMPILATION_CACHE_DIR already set is kept.
XLA_CACHE_MADE = None
if (
    os.environ.get("LDJAX_TEST_XLA_CACHE", "1") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ
    and importlib.util.find_spec("filelock")
):
    XLA_CACHE_MADE = tempfile.mkdtemp(prefix="ldjax-xla-")
    for _name, _value in {
        "jax_compilation_cache_dir": XLA_CACHE_MADE,
        "jax_compilation_cache_max_size": 8 << 30,
        "jax_persistent_cache_min_compile_time_secs": 0.2,
    }.items():
        os.environ[_name.upper()] = str(_value)  # for the processes started from here
        jax.config.update(_name, _value)  # this one read its environment at `import jax`


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
        lambda a: (
            jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a
        ),
        tree,
    )


# one apply function per model for the whole session, so jit caches hit across tests
TRANSFORMER_APPLY = functools.partial(zoo.transformer_apply, n_heads=2)


def numpy_init(init_fn, dtype, seed=0, **kw):
    """Parameters of a zoo ``init_fn`` drawn with numpy (no jax.random: its kernels compile slowly).

    Kernels ~ N(0, 1/fan_in), biases ~ 0.1·N(0, 1), LayerNorm scales ~ 1 + 0.1·N(0, 1).
    """
    shapes = jax.eval_shape(lambda k: init_fn(k, dtype=dtype, **kw), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            a = 1 + 0.1 * rng.normal(size=s.shape)
        elif "bias" in name:
            a = 0.1 * rng.normal(size=s.shape)
        else:
            fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
            a = rng.normal(size=s.shape) / np.sqrt(max(fan_in, 1))
        return jnp.asarray(a, dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def small_model(name, dtype, key=0):
    """``(apply_fn, params, x_o, x_u)`` for "mlp", "lenet" or "transformer" (tiny sizes)."""
    rng = np.random.default_rng(1000 + key)
    if name == "mlp":
        p = numpy_init(zoo.mlp_init, dtype, key, sizes=(12, 16, 16, 5))
        return (
            zoo.mlp_apply,
            p,
            jnp.asarray(rng.normal(size=(3, 12)), dtype),
            jnp.asarray(rng.normal(size=(2, 12)), dtype),
        )
    if name == "lenet":
        p = numpy_init(zoo.lenet_init, dtype, key)
        return (
            zoo.lenet_apply,
            p,
            jnp.asarray(rng.uniform(size=(2, 28, 28, 1)), dtype),
            jnp.asarray(rng.uniform(size=(2, 28, 28, 1)), dtype),
        )
    if name == "transformer":
        p = numpy_init(
            zoo.transformer_init, dtype, key, vocab=13, d_model=8, n_heads=2, n_layers=1, max_len=7
        )
        return (
            TRANSFORMER_APPLY,
            p,
            jnp.asarray(rng.integers(0, 13, (2, 7)), jnp.int32),
            jnp.asarray(rng.integers(0, 13, (2, 7)), jnp.int32),
        )
    raise ValueError(name)


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 65530


MAP_LIMIT = _max_map_count()


def _map_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def pytest_runtest_teardown(item):
    """Free the compiled programs when the process nears the kernel's limit on memory mappings.

    Every executable XLA:CPU compiles maps its code; a session that keeps thousands of them alive
    (the slow tier: ~800 mappings per test) reaches ``vm.max_map_count`` (65,530), the next
    ``mmap`` of the compiler fails and the process dies of a segmentation fault inside
    ``backend_compile_and_load`` (CI, 2026-12-02, at the 81st slow test). Past 60 % of the limit
    the jit caches are cleared: later tests recompile, nothing is shared wrongly.
    """
    if _map_count() > 0.6 * MAP_LIMIT:
        import jax  # noqa: PLC0415

        jax.clear_caches()
        gc.collect()


def pytest_unconfigure(config):
    if XLA_CACHE_MADE is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(XLA_CACHE_MADE, ignore_errors=True)
