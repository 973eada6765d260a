"""Projected eNTK: unbiased, its standard error honest, error ∝ 1/√k, against exact K."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model

import ldjax

SEEDS = 120


def _cut(feats, k):
    return feats._replace(phi=feats.phi[..., :k])


@pytest.fixture(scope="module")
def mlp64():
    """120 independent k = 4096 sketches of the tiny MLP; their first 64 coordinates are 120
    independent k = 64 sketches (nested)."""
    with jax.enable_x64(True):
        f, p, x_o, x_u = small_model("mlp", jnp.float64)
        K = np.asarray(ldjax.entk(f, p, x_o, x_u))
        feats = [
            (
                ldjax.projected_features(f, p, x_o, dim=4096, key=jax.random.key(s)),
                ldjax.projected_features(f, p, x_u, dim=4096, key=jax.random.key(s)),
            )
            for s in range(SEEDS)
        ]
        ests = {
            k: [ldjax.projected_kernel(_cut(fo, k), _cut(fu, k)) for fo, fu in feats]
            for k in (64, 4096)
        }
    return K, ests


def test_unbiased_over_seeds(mlp64):
    """The mean of 120 independent sketches is within 4.5 of its standard errors of exact K."""
    K, ests = mlp64
    Ks = np.stack([np.asarray(e.K) for e in ests[64]])
    mean, se_mean = Ks.mean(0), Ks.std(0, ddof=1) / np.sqrt(SEEDS)
    z = np.abs(mean - K) / np.maximum(se_mean, 1e-12 * np.abs(K).max())
    assert z.max() < 4.5, z.max()
    assert np.median(z) < 1.0


def test_stderr_covers_at_its_rate(mlp64):
    """K̂ ± 1.96 SE holds ~95 % of entries over seeds; the Chebyshev bound at 95 % holds in
    >= 95 % of seeds; one sketch's SE matches the spread over sketches."""
    K, ests = mlp64
    for k in (64, 4096):
        inside = np.mean(
            [np.mean(np.abs(np.asarray(e.K) - K) <= 1.96 * np.asarray(e.stderr)) for e in ests[k]]
        )
        assert 0.88 < inside < 0.99, (k, inside)
        held = np.mean(
            [np.linalg.norm(np.asarray(e.K) - K) <= e.frobenius_error_bound(0.95) for e in ests[k]]
        )
        assert held >= 0.95, (k, held)
    spread = np.stack([np.asarray(e.K) for e in ests[64]]).std(0, ddof=1)
    se = np.mean([np.asarray(e.stderr) for e in ests[64]], axis=0)
    assert 0.8 < np.median(spread / se) < 1.25


def test_error_falls_like_one_over_root_k(mlp64):
    """The mean relative error's log-log slope against k is −1/2."""
    K, ests = mlp64
    err = {
        k: np.mean([np.linalg.norm(np.asarray(e.K) - K) / np.linalg.norm(K) for e in ests[k]])
        for k in ests
    }
    slope = np.log(err[4096] / err[64]) / np.log(64)
    assert -0.56 < slope < -0.44, (err, slope)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet", "transformer"])
def test_other_models_and_reductions(name):
    """Conv fallback leaves (LeNet), embedding/attention sites and masks (transformer): every
    reduction's estimate has the exact shape and lies within 5 SE of the exact entries."""
    with jax.enable_x64(True):
        f, p, x_o, x_u = small_model(name, jnp.float64)
        kw = {}
        if name == "transformer":
            m = np.ones(x_o.shape, bool)
            m[:, :3] = False
            kw = dict(mask_o=m, mask_u=m)
        for red in ("full", "diagonal", "trace", "sum_logits"):
            K = np.asarray(ldjax.entk(f, p, x_o, x_u, reduction=red, **kw))
            e = ldjax.entk_projected(
                f, p, x_o, x_u, dim=2048, key=jax.random.key(7), reduction=red, **kw
            )
            assert e.K.shape == K.shape and e.stderr.shape == K.shape
            z = np.abs(np.asarray(e.K) - K) / (np.asarray(e.stderr) + 1e-9 * np.abs(K).max())
            assert np.mean(z < 1.96) > 0.85 and z.max() < 6, (red, np.mean(z < 1.96), z.max())
            rel = np.linalg.norm(np.asarray(e.K) - K) / np.linalg.norm(K)
            assert rel < e.relative_error_bound(0.99), (red, rel)


@pytest.mark.slow
def test_hutchinson_trace_is_unbiased():
    with jax.enable_x64(True):
        f, p, x_o, x_u = small_model("mlp", jnp.float64)
        K = np.asarray(ldjax.entk(f, p, x_o, x_u, reduction="trace"))
        ests = [
            ldjax.entk_projected(
                f, p, x_o, x_u, dim=256, key=jax.random.key(s), reduction="trace", hutchinson=True
            )
            for s in range(40)
        ]
    Ks = np.stack([np.asarray(e.K) for e in ests])
    z = np.abs(Ks.mean(0) - K) / (Ks.std(0, ddof=1) / np.sqrt(40))
    assert z.max() < 4.5
    # one sketch's standard error describes the spread over sketches
    se = np.mean([np.asarray(e.stderr) for e in ests], axis=0)
    ratio = Ks.std(0, ddof=1) / se
    assert 0.7 < np.median(ratio) < 1.3, ratio


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_sketch_is_nested_and_shared():
    """The first k coordinates of a bigger sketch are the k sketch; K̂(x, x) from one feature set
    equals the one from two (same key, same sketch on both sides)."""
    f, p, x_o, _ = small_model("mlp", jnp.float32)
    key = jax.random.key(3)
    a = ldjax.projected_features(f, p, x_o, dim=300, key=key)
    b = ldjax.projected_features(f, p, x_o, dim=600, key=key)
    np.testing.assert_allclose(
        np.asarray(a.phi), np.asarray(b.phi[..., :300]), rtol=1e-4, atol=1e-5
    )  # float32: two programs, two summation orders
    one = ldjax.projected_kernel(a)
    two = ldjax.entk_projected(f, p, x_o, x_o + 0.0, dim=300, key=key)
    np.testing.assert_allclose(np.asarray(one.K), np.asarray(two.K), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_kernel_vector_against_entk_vp():
    with jax.enable_x64(True):
        f, p, x_o, x_u = small_model("transformer", jnp.float64)
        v = jax.random.normal(jax.random.PRNGKey(0), f(p, x_u).shape, jnp.float64)
        exact = np.asarray(ldjax.entk_vp(f, p, x_o, x_u, v))
        fo = ldjax.projected_features(f, p, x_o, dim=4096, key=jax.random.key(1))
        fu = ldjax.projected_features(f, p, x_u, dim=4096, key=jax.random.key(1))
        kv, se = ldjax.projected_kernel_vector(fo, fu, v)
    assert kv.shape == exact.shape
    z = np.abs(np.asarray(kv) - exact) / np.asarray(se)
    assert np.mean(z < 1.96) > 0.85 and z.max() < 6


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_stored_features_equal_recomputed_and_resume(tmp_path):
    f, p, x_o, x_u = small_model("mlp", jnp.float32)
    key = jax.random.key(5)
    ref = ldjax.projected_features(f, p, x_u, dim=512, key=key)
    out = tmp_path / "feats"
    st = ldjax.projected_features(f, p, x_u, dim=512, key=key, out=out, memory_budget=1)
    np.testing.assert_allclose(np.asarray(st.phi), np.asarray(ref.phi), rtol=1e-4, atol=1e-4)
    loaded = ldjax.load_projected_features(out)
    np.testing.assert_array_equal(np.asarray(loaded.phi), np.asarray(st.phi))
    fo = ldjax.projected_features(f, p, x_o, dim=512, key=key)
    np.testing.assert_allclose(
        np.asarray(ldjax.projected_kernel(fo, loaded).K),
        np.asarray(ldjax.projected_kernel(fo, ref).K),
        rtol=1e-4,
        atol=1e-4,
    )
    # a lost chunk is recomputed, the others are not; the result is bitwise the same
    done = sorted((out / "done").iterdir())
    assert len(done) == x_u.shape[0]
    done[-1].unlink()
    with pytest.raises(ValueError, match="not written yet"):
        ldjax.load_projected_features(out)
    again = ldjax.projected_features(f, p, x_u, dim=512, key=key, out=out, memory_budget=1)
    np.testing.assert_array_equal(np.asarray(again.phi), np.asarray(st.phi))
    with pytest.raises(ValueError, match="another influence job"):
        ldjax.projected_features(f, p, x_u, dim=512, key=jax.random.key(6), out=out)


def test_bad_arguments_are_named():
    f, p, x_o, _ = small_model("mlp", jnp.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="dim must be an int >= 2"):
        ldjax.entk_projected(f, p, x_o, dim=1, key=key)
    with pytest.raises(ValueError, match="key must be"):
        ldjax.entk_projected(f, p, x_o, dim=8, key=np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match="hutchinson=True estimates the trace"):
        ldjax.projected_features(f, p, x_o, dim=8, key=key, hutchinson=True)
    with pytest.raises(ValueError, match="needs dim"):
        ldjax.entk(f, p, x_o, implementation="projected")
    with pytest.raises(ValueError, match="no preconditioner"):
        ldjax.entk(
            f, p, x_o, implementation="projected", dim=8, key=key,
            preconditioner=jax.tree_util.tree_map(jnp.ones_like, p),
        )  # fmt: skip
    with pytest.raises(ValueError, match="belong to implementation='projected'"):
        ldjax.entk(f, p, x_o, dim=8)
    a = ldjax.projected_features(f, p, x_o, dim=8, key=key)
    b = ldjax.projected_features(f, p, x_o, dim=16, key=key)
    with pytest.raises(ValueError, match="disagree on dim"):
        ldjax.projected_kernel(a, b)
    with pytest.raises(ValueError, match="v has shape"):
        ldjax.projected_kernel_vector(a, a, jnp.zeros((3, 4)))
