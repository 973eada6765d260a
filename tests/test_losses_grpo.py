"""The GRPO family (ldjax.losses.grpo, grpo_nthr): G from jax.grad against the closed forms, the
group advantages, the NTHR influence against the head's parameter gradients, the decomposition
covering GRPO with no new kernel code, and the input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import precision

import ldjax
from ldjax import losses

N, T, V, D = 4, 5, 7, 3


def _batch(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, T, V)) * 2
    y = rng.integers(0, V, (N, T))
    m = rng.uniform(size=(N, T)) < 0.7
    m[:, 0] = True
    a = rng.normal(size=N)
    return jnp.asarray(z), jnp.asarray(y), jnp.asarray(m), jnp.asarray(a)


def _pi_minus_y(z, y):
    return jax.nn.softmax(z, -1) - jax.nn.one_hot(y, V, dtype=z.dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_G_on_policy_is_advantage_times_pi_minus_y_over_length(seed):
    with precision("float64"):
        z, y, m, a = _batch(seed)
        g = ldjax.G(losses.grpo, z, targets=y, mask=m, advantages=a)
        n_tok = np.asarray(m).sum(1)
        want = (np.asarray(a) / n_tok)[:, None, None] * np.asarray(m)[..., None] * _pi_minus_y(z, y)
        np.testing.assert_allclose(g, want, atol=1e-13)
        # no length normalisation (Dr. GRPO): the same without 1/|y|
        g2 = ldjax.G(losses.grpo, z, targets=y, mask=m, advantages=a, length_normalize=False)
        np.testing.assert_allclose(g2, want * n_tok[:, None, None], atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_G_with_old_logp_is_ratio_weighted_and_zero_where_clipped(seed):
    with precision("float64"):
        z, y, m, a = _batch(seed)
        lp = np.asarray(losses.token_logprobs(z, y))
        rng = np.random.default_rng(50 + seed)
        old = lp + rng.normal(size=lp.shape) * 0.3  # ratios on both sides of the clip range
        eps = 0.2
        g = ldjax.G(losses.grpo, z, targets=y, mask=m, advantages=a, old_logp=old, clip_eps=eps)
        rho = np.exp(lp - old)
        an = np.asarray(a)[:, None]
        clipped = ((an > 0) & (rho > 1 + eps)) | ((an < 0) & (rho < 1 - eps))
        assert clipped[np.asarray(m)].any() and (~clipped[np.asarray(m)]).any()
        coef = an * rho * np.asarray(m) * ~clipped / np.asarray(m).sum(1, keepdims=True)
        np.testing.assert_allclose(g, coef[..., None] * _pi_minus_y(z, y), atol=1e-12)
        # the loss value: −mean_t min(ρA, clip(ρ)A)
        val = losses.grpo(z, targets=y, mask=m, advantages=a, old_logp=old, clip_eps=eps)
        surr = np.minimum(rho * an, np.clip(rho, 1 - eps, 1 + eps) * an)
        want = -(surr * np.asarray(m)).sum(1) / np.asarray(m).sum(1)
        np.testing.assert_allclose(val, want, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_nthr_G_down_weights_exactly_the_flagged_negative_tokens(seed):
    with precision("float64"):
        z, y, m, a = _batch(seed)
        a = jnp.array([-1.0, 0.5, -0.3, 2.0])  # both signs present
        s = jnp.asarray(np.random.default_rng(seed).normal(size=(N, T)) * 2)
        tau, w = 0.0, 0.25
        g = ldjax.G(
            losses.grpo_nthr,
            z,
            targets=y,
            mask=m,
            advantages=a,
            influence=s,
            tau=tau,
            down_weight=w,
        )
        flag = (np.asarray(a)[:, None] < 0) & (np.asarray(s) > tau)
        weight = np.where(flag, w, 1.0) * np.asarray(m)
        assert (flag & np.asarray(m)).any()
        coef = np.asarray(a)[:, None] * weight / np.asarray(m).sum(1, keepdims=True)
        np.testing.assert_allclose(g, coef[..., None] * _pi_minus_y(z, y), atol=1e-13)
        # a positive response (A > 0) is never reweighted, whatever its influence
        g_pos = ldjax.G(losses.grpo, z, targets=y, mask=m, advantages=a)
        np.testing.assert_allclose(g[1], g_pos[1], atol=1e-13)


def test_group_advantages_closed_form_and_uniform_groups():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    a = np.asarray(losses.group_advantages(r, 4, eps=0.0 + 1e-12))
    np.testing.assert_allclose(a[:4], [1.0, -1.0, -1.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(a[4:], 0.0)  # all wrong: no signal
    with pytest.raises(ValueError, match="group_size"):
        losses.group_advantages(r, 3)
    with pytest.raises(ValueError, match="rewards"):
        losses.group_advantages(r.reshape(2, 4), 4)


def test_nthr_influence_is_the_head_gradient_inner_product_with_the_correct_responses():
    """s·s̄_C = ⟨∇_{W,b} log π(y_{n,t}), ∇_{W,b} Σ_{m∈C} mean_t log π(y_m)⟩ for z = hW + b."""
    with precision("float64"):
        rng = np.random.default_rng(3)
        h = jnp.asarray(rng.normal(size=(N, T, D)))
        W, b = jnp.asarray(rng.normal(size=(D, V))), jnp.asarray(rng.normal(size=V))
        _, y, m, _ = _batch(3)
        correct = jnp.array([True, False, True, False])
        z = h @ W + b
        s = np.asarray(losses.nthr_influence(h, z, y, m, correct))

        def token_lp(p):
            return losses.token_logprobs(h @ p["W"] + p["b"], y)  # (N, T)

        p = {"W": W, "b": b}
        mf = np.asarray(m, float)
        wa = mf * np.asarray(correct, float)[:, None] / mf.sum(1, keepdims=True)
        g_anchor = jax.grad(lambda p: jnp.sum(token_lp(p) * wa))(p)
        jac = jax.jacrev(token_lp)(p)  # leaves (N, T, ...)
        raw = np.einsum("ntdv,dv->nt", jac["W"], g_anchor["W"]) + np.einsum(
            "ntv,v->nt", jac["b"], g_anchor["b"]
        )
        ref = (raw * mf * np.asarray(correct)[:, None]).sum() / (
            mf * np.asarray(correct)[:, None]
        ).sum()
        np.testing.assert_allclose(s, raw / ref * mf, rtol=1e-10, atol=1e-12)
        # normalised: the anchors' own tokens average 1
        anchor = mf * np.asarray(correct)[:, None]
        np.testing.assert_allclose((s * anchor).sum() / anchor.sum(), 1.0, rtol=1e-12)
        # no anchor: no influence
        none = losses.nthr_influence(h, z, y, m, jnp.zeros(N, bool))
        np.testing.assert_array_equal(none, 0.0)


def test_decompose_covers_grpo_with_no_new_kernel_code():
    """ldjax.decompose of a GRPO step on a tiny sequence model matches the actual small step."""
    with precision("float64"):
        rng = np.random.default_rng(0)
        emb = jnp.asarray(rng.normal(size=(V, D)))
        params = {"emb": emb, "W": jnp.asarray(rng.normal(size=(D, V)) * 0.5)}

        def apply_fn(p, x):  # (N, T) -> (N, T, V): a causal running mean of embeddings
            e = p["emb"][x]
            c = jnp.cumsum(e, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]
            return jnp.tanh(c) @ p["W"]

        x = jnp.asarray(rng.integers(0, V, (N, T)))
        y = jnp.asarray(rng.integers(0, V, (N, T)))
        m = jnp.ones((N, T), bool)
        a = losses.group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), 4)
        kw = dict(targets=y, mask=m, advantages=a)
        d = ldjax.decompose(apply_fn, params, x, x, losses.grpo, eta=1e-5, loss_kwargs=kw)
        act = ldjax.actual_step(apply_fn, params, x, x, losses.grpo, eta=1e-5, loss_kwargs=kw)
        np.testing.assert_allclose(d.delta_logits, act.delta_logits, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(advantages=jnp.zeros(3)), "advantages has shape"),
        (dict(advantages=jnp.array([0.0, jnp.nan, 0, 0])), "advantages contains"),
        (dict(advantages=jnp.zeros(N), old_logp=jnp.zeros((N, 2))), "old_logp has shape"),
        (dict(advantages=jnp.zeros(N), clip_eps=0.0), "clip_eps of grpo must be > 0"),
    ],
)
def test_grpo_rejects_bad_inputs(kwargs, match):
    z, y, m, _ = _batch(0)
    with pytest.raises(ValueError, match=match):
        losses.grpo(z, targets=y, mask=m, **kwargs)


def test_grpo_nthr_rejects_bad_inputs():
    z, y, m, a = _batch(0)
    s = jnp.zeros((N, T))
    with pytest.raises(ValueError, match="influence is required"):
        losses.grpo_nthr(z, targets=y, mask=m, advantages=a, influence=None)
    with pytest.raises(ValueError, match="down_weight of grpo_nthr must be in"):
        losses.grpo_nthr(z, targets=y, mask=m, advantages=a, influence=s, down_weight=1.5)
    with pytest.raises(ValueError, match=r"sequence logits \(N, T, V\)"):
        losses.grpo(z[:, 0], targets=y[:, 0], advantages=a)
