"""ldjax.zoo against the neural-tangents golden fixtures (tests/golden/*.npz, see README there).

The fixtures were made in a separate venv (jax 0.4.25 + neural-tangents 0.6.5). Here, under the
main jax, we check that the zoo reproduces the peer's logits on the stored float64 params, and that
a plain ``jax.jacrev`` contraction ``K = sum_theta J_o J_u^T`` equals nt's eNTK (rel err 1e-10).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldjax import zoo

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
MODELS = ["mlp", "lenet", "transformer"]


def _load(name):
    params, arrays = zoo.load_npz(os.path.join(GOLDEN, f"{name}.npz"))
    if name == "mlp":
        apply = zoo.mlp_apply
    elif name == "lenet":
        apply = zoo.lenet_apply
    else:
        n_heads = int(arrays["n_heads"])

        def apply(p, t):
            return zoo.transformer_apply(p, t, n_heads=n_heads)

    return params, arrays, apply


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def _jacrev_entk(apply, params, x_o, x_u):
    """K[o, u, (m, l,) i, j] = sum over param leaves of <d z_o[(m,) i]/dθ, d z_u[(l,) j]/dθ>."""
    j_o = jax.jacrev(apply)(params, x_o)  # leaves (N_o, [T,] V, *leaf_shape)
    j_u = jax.jacrev(apply)(params, x_u)
    out_nd = apply(params, x_o).ndim - 1

    def contract(a, b):
        a = a.reshape(a.shape[: 1 + out_nd] + (-1,))
        b = b.reshape(b.shape[: 1 + out_nd] + (-1,))
        spec = "oip,ujp->ouij" if out_nd == 1 else "omip,uljp->oumlij"
        return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)

    return sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(contract, j_o, j_u)))


@pytest.mark.parametrize("name", MODELS)
def test_fixture_metadata(name):
    params, arrays, _ = _load(name)
    assert str(arrays["model"]) == name
    assert str(arrays["nt_version"]) == "0.6.5"
    assert str(arrays["jax_version"]) == "0.4.25"
    assert all(a.dtype == np.float64 for a in jax.tree_util.tree_leaves(params))
    n_o, n_u = arrays["x_o"].shape[0], arrays["x_u"].shape[0]
    v = arrays["z_o"].shape[-1]
    expect = {
        "mlp": (n_o, n_u, v, v),
        "lenet": (n_o, n_u, v, v),
        "transformer": (n_o, n_u, 6, 6, v, v),
    }[name]
    assert arrays["K"].shape == expect


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_peer(name):
    """Same params, same inputs: zoo here (jax 0.10) == zoo in the peer (jax 0.4.25)."""
    params, arrays, apply = _load(name)
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(jnp.asarray, params)
        for side in ("o", "u"):
            z = np.asarray(jax.jit(apply)(p, jnp.asarray(arrays[f"x_{side}"])))
            assert z.dtype == np.float64
            assert z.shape == arrays[f"z_{side}"].shape
            np.testing.assert_allclose(z, arrays[f"z_{side}"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_jacrev_entk_matches_nt(name):
    params, arrays, apply = _load(name)
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(jnp.asarray, params)
        k = jax.jit(_jacrev_entk, static_argnums=0)(
            apply, p, jnp.asarray(arrays["x_o"]), jnp.asarray(arrays["x_u"])
        )
        k = np.asarray(k)
    assert k.dtype == np.float64 and k.shape == arrays["K"].shape
    assert _rel(k, arrays["K"]) < 1e-10


def test_golden_K_cauchy_schwarz():
    """Layout sanity: K is a Gram matrix of per-logit gradients. Rebuild K([x_o; x_u], [x_o; x_u])
    with jacrev; its off-diagonal block must be the golden K, and the golden K must obey
    Cauchy-Schwarz per output pair: |K_ou[i, j]|^2 <= K_oo[i, i] K_uu[j, j].
    """
    params, arrays, apply = _load("mlp")
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(jnp.asarray, params)
        x_o, x_u = jnp.asarray(arrays["x_o"]), jnp.asarray(arrays["x_u"])
        k_all = jax.jit(_jacrev_entk, static_argnums=0)(
            apply, p, jnp.concatenate([x_o, x_u]), jnp.concatenate([x_o, x_u])
        )
        k_all = np.asarray(k_all)
    n_o = x_o.shape[0]
    k_oo, k_uu = k_all[:n_o, :n_o], k_all[n_o:, n_o:]
    # the cross block of K(x, x) is the golden K itself
    assert _rel(k_all[:n_o, n_o:], arrays["K"]) < 1e-10
    d_o = np.einsum("ooii->oi", k_oo)  # (N_o, V)
    d_u = np.einsum("uujj->uj", k_uu)  # (N_u, V)
    k = arrays["K"]
    assert np.all(k**2 <= d_o[:, None, :, None] * d_u[None, :, None, :] * (1 + 1e-12))


# ------------------------------------------------------------------------------------------------
# zoo behaviour (float32, default init)
# ------------------------------------------------------------------------------------------------


def _shapes(tree):
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


def test_default_shapes():
    """Shapes via jax.eval_shape (no compilation: the CI machine is small)."""
    key = jax.random.PRNGKey(0)
    f32 = jnp.float32
    p = jax.eval_shape(lambda k: zoo.mlp_init(k, sizes=(784, 32, 10)), key)
    assert _shapes(p) == {
        "dense_0": {"kernel": (784, 32), "bias": (32,)},
        "dense_1": {"kernel": (32, 10), "bias": (10,)},
    }
    assert jax.eval_shape(zoo.mlp_apply, p, jax.ShapeDtypeStruct((3, 784), f32)).shape == (3, 10)
    p = jax.eval_shape(zoo.lenet_init, key)
    assert _shapes(p) == {
        "conv_0": {"kernel": (5, 5, 1, 6), "bias": (6,)},
        "conv_1": {"kernel": (5, 5, 6, 16), "bias": (16,)},
        "dense_0": {"kernel": (400, 60), "bias": (60,)},
        "dense_1": {"kernel": (60, 42), "bias": (42,)},
        "dense_2": {"kernel": (42, 10), "bias": (10,)},
    }
    z = jax.eval_shape(zoo.lenet_apply, p, jax.ShapeDtypeStruct((2, 28, 28, 1), f32))
    assert z.shape == (2, 10)
    p = jax.eval_shape(
        lambda k: zoo.transformer_init(k, vocab=13, d_model=16, n_heads=2, n_layers=2, max_len=8),
        key,
    )
    s = _shapes(p)
    assert s["embed"] == (13, 16) and s["pos_embed"] == (8, 16)
    assert s["unembed"] == {"kernel": (16, 13), "bias": (13,)}
    assert s["block_1"]["mlp"]["fc_1"]["kernel"] == (16, 64)
    assert s["block_0"]["attn"]["value"] == {"kernel": (16, 16), "bias": (16,)}
    assert sorted(s) == ["block_0", "block_1", "embed", "ln_f", "pos_embed", "unembed"]
    z = jax.eval_shape(
        lambda q, t: zoo.transformer_apply(q, t, n_heads=2),
        p,
        jax.ShapeDtypeStruct((2, 5), jnp.int32),
    )
    assert z.shape == (2, 5, 13) and z.dtype == jnp.float32


def test_transformer_is_causal():
    """z[:, t] depends on tokens[:, :t+1] only."""
    params, _, apply = _load("transformer")  # vocab 11, T <= 6, 2 heads; float32 here
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    apply = jax.jit(apply)
    a = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 0, 6]], np.int32)  # differ at t = 4
    z = apply(p, a)
    za, zb = z[:1], z[1:]
    np.testing.assert_array_equal(np.asarray(za[:, :4]), np.asarray(zb[:, :4]))
    assert float(jnp.max(jnp.abs(za[:, 4:] - zb[:, 4:]))) > 1e-4


def test_gelu_tanh_closed_form():
    x = jnp.linspace(-4.0, 4.0, 17)
    np.testing.assert_allclose(
        zoo.gelu_tanh(x), jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-6
    )


def test_bad_inputs_raise():
    key = jax.random.PRNGKey(0)
    sds = jax.ShapeDtypeStruct
    p = jax.eval_shape(lambda k: zoo.mlp_init(k, sizes=(4, 3)), key)
    with pytest.raises(ValueError, match="features"):
        jax.eval_shape(zoo.mlp_apply, p, sds((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="D_in"):
        jax.eval_shape(zoo.mlp_apply, p, sds((5,), jnp.float32))
    with pytest.raises(ValueError, match=r"\(N, 28, 28, 1\)"):
        jax.eval_shape(
            zoo.lenet_apply, jax.eval_shape(zoo.lenet_init, key), sds((2, 1, 28, 28), jnp.float32)
        )
    pt = jax.eval_shape(
        lambda k: zoo.transformer_init(k, vocab=5, d_model=8, n_heads=2, n_layers=1, max_len=4), key
    )
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(zoo.transformer_apply, pt, sds((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        jax.eval_shape(zoo.transformer_apply, pt, sds((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="n_heads"):
        jax.eval_shape(
            lambda q, t: zoo.transformer_apply(q, t, n_heads=3), pt, sds((1, 3), jnp.int32)
        )
    with pytest.raises(ValueError, match="sizes"):
        zoo.mlp_init(key, sizes=(4,))
    with pytest.raises(ValueError, match="divisible"):
        zoo.transformer_init(key, d_model=10, n_heads=4)


def test_npz_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    p = {
        "embed": rng.standard_normal((5, 8)),
        "block_0": {
            "ln_1": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)},
            "attn": {"query": {"kernel": rng.standard_normal((8, 8))}},
        },
    }
    path = tmp_path / "sub" / "m.npz"
    zoo.save_npz(path, p, x_o=np.arange(6).reshape(2, 3), tag="abc")
    q, arrays = zoo.load_npz(path)
    assert jax.tree_util.tree_structure(q) == jax.tree_util.tree_structure(p)
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(p)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert str(arrays["tag"]) == "abc" and arrays["x_o"].shape == (2, 3)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        zoo.load_npz(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="clashes"):
        zoo.save_npz(tmp_path / "x.npz", p, **{"params/a": np.zeros(1)})
    with pytest.raises(ValueError, match="'a/b'"):
        zoo.save_npz(tmp_path / "x.npz", {"a/b": np.zeros(1)})
    np.savez(tmp_path / "plain.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="no 'params/"):
        zoo.load_npz(tmp_path / "plain.npz")
