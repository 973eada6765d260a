"""ldjax.entk: every implementation equals the jacrev J_o J_uᵀ and neural-tangents' golden K."""

import functools
import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cast, jacrev_entk, numpy_init, precision, rel, small_model
from flax import nnx

import ldjax
from ldjax import zoo

IMPLS = ["jacobian", "vp", "structured", "auto"]
TOL = {"float32": 1e-5, "float64": 1e-10}


@pytest.mark.parametrize(
    "model,dtype",
    [
        pytest.param("mlp", "float32", marks=pytest.mark.slow),  # float64 below: the fast check
        ("mlp", "float64"),
        pytest.param("lenet", "float64", marks=pytest.mark.slow),  # ~18 s; golden values: fast
        pytest.param("transformer", "float64", marks=pytest.mark.slow),  # ~40 s
        pytest.param("lenet", "float32", marks=pytest.mark.slow),
        pytest.param("transformer", "float32", marks=pytest.mark.slow),
    ],
)
def test_every_implementation_equals_jacrev(model, dtype):
    with precision(dtype):
        f, p, xo, xu = small_model(model, jnp.dtype(dtype))
        K0 = jacrev_entk(f, p, xo, xu)
        Ks = {impl: ldjax.entk(f, p, xo, xu, implementation=impl) for impl in IMPLS}
        assert ldjax.entk_cost(f, p, xo, xu)  # "auto" chose one of the three by this FLOP model
        for impl, K in Ks.items():
            assert K.shape == K0.shape
            assert K.dtype == jnp.dtype(dtype)
            assert rel(K, K0) <= TOL[dtype], (impl, rel(K, K0))
        for a in IMPLS:  # and each other
            for b in IMPLS:
                assert rel(Ks[a], Ks[b]) <= TOL[dtype]


@pytest.mark.slow
def test_float32_long_sequence():
    """T = 32, V = 16 (T·V = 512 Jacobian rows): every float32 K equals the float64 definition.

    On jaxlib 0.10.2's CPU backend this needs ldjax/_xla_flags.py: without it the jitted
    backward pass over ≥ 256 rows is miscompiled and jacobian/structured were off by 60 %.
    """
    rng = np.random.default_rng(7)
    kw = dict(vocab=16, d_model=32, n_heads=4, n_layers=2, max_len=32)
    f = functools.partial(zoo.transformer_apply, n_heads=4)
    p32 = numpy_init(zoo.transformer_init, jnp.float32, 3, **kw)
    xo = jnp.asarray(rng.integers(0, 16, (1, 32)), jnp.int32)
    xu = jnp.asarray(rng.integers(0, 16, (1, 32)), jnp.int32)
    with precision("float64"):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p32)
        K64 = np.asarray(jacrev_entk(f, p64, xo, xu))
    for impl in IMPLS:
        K = ldjax.entk(f, p32, xo, xu, implementation=impl)
        assert rel(K, K64) <= 1e-5, (impl, rel(K, K64))


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
@pytest.mark.parametrize(
    "bias,transposed", [pytest.param(True, False, marks=pytest.mark.slow), (False, True)]
)
def test_head_factorisation(bias, transposed):
    """z = x̃ W̃ with C < V: structured K = Wᵀ K_x W + ⟨x̃_o, x̃_u⟩ I equals the definition."""
    from ldjax._src import entk as ntk

    rng = np.random.default_rng(3)
    c, v = 4, 9
    p = {
        "w1": jnp.asarray(rng.normal(size=(5, c)) / 2),
        "b1": jnp.asarray(rng.normal(size=(c,))),
        "head": jnp.asarray(rng.normal(size=(v, c) if transposed else (c, v))),
    }
    if bias:
        p["b"] = jnp.asarray(rng.normal(size=(v,)))

    def f(q, x):  # (N, T, 5) -> (N, T, V)
        h = jnp.tanh(x @ q["w1"] + q["b1"])
        if transposed:  # contracts the head's second axis: W (V, C)
            z = jax.lax.dot_general(h, q["head"], (((2,), (1,)), ((), ())))
        else:
            z = h @ q["head"]
        return z + q["b"] if bias else z

    with precision("float64"):
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p)
        xo = jnp.asarray(rng.normal(size=(3, 4, 5)))
        xu = jnp.asarray(rng.normal(size=(2, 4, 5)))
        prob, *_ = ntk._setup(f, p, xo, xu, "full", None, None)
        assert prob.head >= 0
        K0 = jacrev_entk(f, p, xo, xu)
        for impl in ("structured", "vp"):  # vp: C VJPs per position, not V
            assert rel(ldjax.entk(f, p, xo, xu, implementation=impl), K0) <= 1e-10, impl
        mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]], bool)
        Km = ldjax.entk(f, p, xo, xo, implementation="jacobian", mask_o=mask, mask_u=mask)
        for impl, budget in itertools.product(("structured", "vp"), (10**9, 4000)):
            K = ldjax.entk(  # one block (triangular K(x,x)) and chunked
                f,
                p,
                xo,
                xo,
                implementation=impl,
                mask_o=mask,
                mask_u=mask,
                memory_budget=budget,
            )
            assert rel(K, Km) <= 1e-10, (impl, budget)


def test_xla_cpu_reduction_workaround_is_active():
    """The minimal miscompile behind the test above: jit(jacrev(LayerNorm)) vs eager, float32."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32)), jnp.float32)
    ln = lambda h: zoo.layer_norm({"scale": jnp.ones(32), "bias": jnp.zeros(32)}, h)
    assert rel(jax.jit(jax.jacrev(ln))(x), jax.jacrev(ln)(x)) <= 1e-6


@pytest.mark.parametrize(
    "model,impl",
    [
        ("mlp", "jacobian"),
        ("mlp", "vp"),
        pytest.param("transformer", "structured", marks=pytest.mark.slow),
    ],
)
def test_reductions_are_named_and_undivided(model, impl):
    with precision("float64"):
        f, p, xo, xu = small_model(model, jnp.float64)
        K = np.asarray(jacrev_entk(f, p, xo, xu))
        want = {
            "diagonal": np.diagonal(K, axis1=-2, axis2=-1),
            "trace": np.trace(K, axis1=-2, axis2=-1),
            "sum_logits": K.sum((-2, -1)),
        }
        for red, w in want.items():
            got = ldjax.entk(f, p, xo, xu, implementation=impl, reduction=red)
            assert got.shape == w.shape, red
            assert rel(got, w) <= 1e-10, (red, rel(got, w))


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
@pytest.mark.parametrize(
    "impl", ["jacobian", pytest.param("vp", marks=pytest.mark.slow), "structured"]
)
def test_masks_and_chunking(impl):
    """Masked positions are the m-th selected position; a tiny memory budget changes nothing."""
    with precision("float64"):
        f, p, xo, xu = small_model("transformer", jnp.float64)
        K = np.asarray(jacrev_entk(f, p, xo, xu))
        mo = np.zeros((2, 7), bool)
        mo[0, 3:] = True
        mo[1, 5:] = True
        mu = np.zeros((2, 7), bool)
        mu[0, 1:4] = True
        mu[1, 6] = True
        want = np.zeros((2, 2, 4, 3, 13, 13))
        for o in range(2):
            for u in range(2):
                io, iu = np.flatnonzero(mo[o]), np.flatnonzero(mu[u])
                want[o, u, : len(io), : len(iu)] = K[o, u][np.ix_(io, iu)]
        whole = ldjax.entk(f, p, xo, xu, implementation=impl, mask_o=mo, mask_u=mu)
        chunked = ldjax.entk(
            f, p, xo, xu, implementation=impl, mask_o=mo, mask_u=mu, memory_budget=50_000
        )
        assert whole.shape == want.shape
        assert rel(whole, want) <= 1e-10
        assert rel(chunked, want) <= 1e-10


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_last_token_block_and_symmetry():
    with precision("float64"):
        f, p, xo, _ = small_model("transformer", jnp.float64)
        last = ldjax.last_position_mask(np.ones((2, 7), bool))
        K = ldjax.entk(f, p, xo, mask_o=last, implementation="structured")[:, :, 0, 0]
        full = np.asarray(jacrev_entk(f, p, xo, xo))[:, :, -1, -1]
        assert rel(K, full) <= 1e-10
        # K(x, x) is symmetric: K[o,u,i,j] = K[u,o,j,i]
        assert rel(K, np.transpose(np.asarray(K), (1, 0, 3, 2))) <= 1e-12


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_causal_block_is_zero_above_the_diagonal_for_shared_prefix_free_params():
    """A per-token block K_{m,l}(x, x) is non-zero for every pair: positions share parameters."""
    with precision("float64"):
        f, p, xo, _ = small_model("transformer", jnp.float64)
        tr = ldjax.entk(f, p, xo[:1], reduction="trace")[0, 0]
        assert tr.shape == (7, 7)
        assert np.all(np.diag(np.asarray(tr)) > 0)  # ‖J_m‖² > 0 on the diagonal


@pytest.mark.parametrize(
    "name", ["mlp", "lenet", pytest.param("transformer", marks=pytest.mark.slow)]
)
def test_equals_neural_tangents_golden(name):
    """K from neural-tangents 0.6.5 (all three implementations, trace_axes=()), made in the peer
    venv."""
    params, arrays = zoo.load_npz(os.path.join(os.path.dirname(__file__), "golden", f"{name}.npz"))
    with precision("float64"):
        if name == "mlp":
            f = zoo.mlp_apply
        elif name == "lenet":
            f = zoo.lenet_apply
        else:
            h = int(arrays["n_heads"])
            f = lambda p, t: zoo.transformer_apply(p, t, n_heads=h)
        params = cast(params, jnp.float64)
        # jacobian, vp and structured all equal the jacrev J_o J_uᵀ (test above); here the two
        # algorithms that share least with it, against the peer
        for impl in ("structured", "vp"):
            K = ldjax.entk(
                f,
                params,
                jnp.asarray(arrays["x_o"]),
                jnp.asarray(arrays["x_u"]),
                implementation=impl,
            )
            assert rel(K, arrays["K"]) <= 1e-10, (impl, rel(K, arrays["K"]))


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_entk_vp_equals_K_times_v():
    with precision("float64"):
        for model in ["mlp", "transformer"]:
            f, p, xo, xu = small_model(model, jnp.float64)
            K = np.asarray(jacrev_entk(f, p, xo, xu))
            shape_u = jax.eval_shape(f, p, xu).shape
            v = np.random.default_rng(0).normal(size=shape_u)
            want = (
                np.einsum("ouij,uj->oi", K, v)
                if len(shape_u) == 2
                else np.einsum("oumlij,ulj->omi", K, v)
            )
            assert rel(ldjax.entk_vp(f, p, xo, xu, v), want) <= 1e-10
            # x_u is x_o takes the shared-linearisation path
            Kuu = np.asarray(jacrev_entk(f, p, xu, xu))
            want = (
                np.einsum("ouij,uj->oi", Kuu, v)
                if len(shape_u) == 2
                else np.einsum("oumlij,ulj->omi", Kuu, v)
            )
            assert rel(ldjax.entk_vp(f, p, xu, xu, v), want) <= 1e-10


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = jnp.tanh(x)
        return nn.Dense(4)(x)


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_flax_linen_only_params_are_trainable():
    with precision("float64"):
        m = _LinenNet()
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 5), jnp.float64)
        variables = m.init(jax.random.PRNGKey(1), x)
        variables = {
            "params": cast(variables["params"], jnp.float64),
            "batch_stats": jax.tree_util.tree_map(
                lambda a: a + 0.5, cast(variables["batch_stats"], jnp.float64)
            ),
        }
        K = ldjax.entk(m.apply, variables, x, implementation="structured")
        f = lambda p, x: m.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
        K0 = jacrev_entk(f, variables["params"], x, x)
        assert rel(K, K0) <= 1e-10
        # batch_stats are closed over: the result changes with them but they get no Jacobian rows
        n_params = sum(a.size for a in jax.tree_util.tree_leaves(variables["params"]))
        assert n_params == 5 * 8 + 8 + 8 * 2 + 8 * 4 + 4


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_flax_nnx_model():
    with precision("float64"):

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.l1 = nnx.Linear(5, 8, rngs=rngs, param_dtype=jnp.float64)
                self.l2 = nnx.Linear(8, 3, rngs=rngs, param_dtype=jnp.float64)

            def __call__(self, x):
                return self.l2(jnp.tanh(self.l1(x)))

        model = Net(nnx.Rngs(0))
        f, params = ldjax.from_nnx(model)
        x = jax.random.normal(jax.random.PRNGKey(0), (4, 5), jnp.float64)
        K0 = jacrev_entk(f, params, x, x)
        for impl in IMPLS:
            assert rel(ldjax.entk(f, params, x, implementation=impl), K0) <= 1e-10


def test_structured_plan_finds_dense_and_embedding_sites():
    from ldjax._src import entk as ntk

    f, p, xo, xu = small_model("transformer", jnp.float32)
    prob, *_ = ntk._setup(f, p, xo, xu, "full", None, None)
    kinds = sorted(s.kind for s in prob.plan.sites)
    # 1 layer x (q, k, v, o, mlp in, mlp out) + unembedding = 7 dense sites, 1 token embedding;
    # every Dense bias joins its site (y = x W + b)
    assert kinds.count("dot") == 7 and kinds.count("gather") == 1
    assert all(s.bias >= 0 for s in prob.plan.sites if s.kind == "dot")


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
@pytest.mark.parametrize("reduction", ["full", "diagonal"])
def test_symmetric_chunks_are_mirrored(reduction):
    """K(x, x) with x_u omitted: blocks below the diagonal are transposes of those above."""
    with precision("float64"):
        f, p, xo, _ = small_model("transformer", jnp.float64)
        K0 = np.asarray(jacrev_entk(f, p, xo, xo))
        want = K0 if reduction == "full" else np.diagonal(K0, axis1=-2, axis2=-1)
        got = ldjax.entk(
            f, p, xo, reduction=reduction, implementation="structured", memory_budget=20_000
        )
        assert rel(got, want) <= 1e-10
