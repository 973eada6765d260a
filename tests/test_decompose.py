"""Predicted vs actual one-step change: the eNTK-step error falls as η² (arXiv 2407.10490, §2,
Proposition 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import jacrev_entk, precision, rel, small_model

import ldjax
from ldjax import losses

ETAS = np.logspace(-6, -2.5, 8)  # 3.5 decades


def _slope(f, p, xo, xu, loss_fn, kw):
    errs = []
    for eta in ETAS:
        d = ldjax.decompose(f, p, xo, xu, loss_fn, eta=eta, loss_kwargs=kw)
        a = ldjax.actual_step(f, p, xo, xu, loss_fn, eta=eta, loss_kwargs=kw)
        errs.append(float(np.linalg.norm(np.asarray(a.delta_logits - d.delta_logits))))
    return np.polyfit(np.log(ETAS), np.log(errs), 1)[0], errs


def test_mlp_sft_error_falls_as_eta_squared():
    with precision("float64"):
        f, p, xo, xu = small_model("mlp", jnp.float64)
        slope, _ = _slope(f, p, xo, xu, losses.sft, dict(targets=jnp.array([1, 3])))
        assert abs(slope - 2) <= 0.15, slope


@pytest.mark.slow
def test_transformer_dpo_error_falls_as_eta_squared_and_splits_in_two_terms():
    with precision("float64"):
        f, p, xo, xu = small_model("transformer", jnp.float64)
        xp, xn = xu[:1], xu[1:]
        m = jnp.zeros((1, 7), bool).at[:, 3:6].set(True)
        kw = dict(
            targets_pos=jnp.roll(xp, -1, 1),
            targets_neg=jnp.roll(xn, -1, 1),
            mask_pos=m,
            mask_neg=m,
            ref_logp_pos=jnp.array([-20.0]),
            ref_logp_neg=jnp.array([-18.0]),
            beta=0.1,
        )
        slope, _ = _slope(f, p, xo, (xp, xn), losses.dpo, kw)
        assert abs(slope - 2) <= 0.15, slope
        d = ldjax.decompose(f, p, xo, (xp, xn), losses.dpo, eta=1e-3, loss_kwargs=kw)
        assert len(d.G) == 2 and len(d.delta_logits_terms) == 2
        # each term is −η K(x_o, x_b) G_b with the exact blocks
        for xb, gb, term in zip((xp, xn), d.G, d.delta_logits_terms):
            K = np.asarray(jacrev_entk(f, p, xo, xb))
            assert rel(term, -1e-3 * np.einsum("oumlij,ulj->omi", K, gb)) <= 1e-10
        assert rel(d.delta_logp_linear, sum(d.delta_logp_linear_terms)) <= 1e-12


@pytest.mark.slow  # > 10 s on 2 cores
def test_blocks_method_equals_vector_products():
    with precision("float64"):
        f, p, xo, xu = small_model("transformer", jnp.float64)
        kw = dict(targets=jnp.roll(xu, -1, 1), mask=jnp.ones((2, 7), bool))
        a = ldjax.decompose(f, p, xo, xu, losses.sft, eta=1e-2, loss_kwargs=kw)
        b = ldjax.decompose(f, p, xo, xu, losses.sft, eta=1e-2, loss_kwargs=kw, method="blocks")
        assert rel(a.delta_logits, b.delta_logits) <= 1e-10


def test_compare_separates_the_two_error_sources():
    with precision("float64"):
        f, p, xo, xu = small_model("mlp", jnp.float64)
        kw = dict(targets=jnp.array([1, 3]))
        for eta in (1e-3, 1e-1):
            d = ldjax.decompose(f, p, xo, xu, losses.sft, eta=eta, loss_kwargs=kw)
            a = ldjax.actual_step(f, p, xo, xu, losses.sft, eta=eta, loss_kwargs=kw)
            c = ldjax.compare(d, a)
            dz, dl = np.asarray(a.delta_logits), np.asarray(a.delta_logp)
            assert c.entk_step == pytest.approx(rel(d.delta_logits, dz), rel=1e-9)
            lin = dz - np.sum(np.asarray(jax.nn.softmax(a.logits)) * dz, -1, keepdims=True)
            assert c.linearisation == pytest.approx(rel(lin, dl), rel=1e-9)
            # exact log-softmax of the predicted Δz only carries the eNTK error
            assert c.exact <= c.linear + 1e-12 or c.exact <= 2 * c.entk_step
        assert c.sign_agreement > 0.9


def test_actual_step_takes_any_optax_optimizer_and_only_trainable_params():
    with precision("float64"):
        f, p, xo, xu = small_model("mlp", jnp.float64)
        variables = {"params": p, "frozen": {"shift": jnp.ones(5)}}
        g = lambda v, x: f(v["params"], x) + v["frozen"]["shift"]
        kw = dict(targets=jnp.array([1, 3]))
        a = ldjax.actual_step(
            g, variables, xo, xu, losses.sft, optimizer=optax.adam(1e-3), loss_kwargs=kw
        )
        np.testing.assert_array_equal(a.params["frozen"]["shift"], 1.0)
        moved = [
            float(jnp.max(jnp.abs(x - y)))
            for x, y in zip(
                jax.tree_util.tree_leaves(a.params["params"]), jax.tree_util.tree_leaves(p)
            )
        ]
        assert min(moved) > 0  # Adam's first step moves every parameter by ~lr
        np.testing.assert_allclose(max(moved), 1e-3, rtol=1e-3)


def test_order_two_is_exact_for_a_model_quadratic_in_its_params():
    """z = (x A) B is quadratic in θ = (A, B): Taylor to second order in Δθ is the whole change,
    for a plain SGD step and for a real Adam step from a warm state, at step sizes where the
    first-order prediction is off by far more."""
    with precision("float64"):
        rng = np.random.default_rng(0)
        f = lambda p, x: (x @ p["A"]) @ p["B"]  # noqa: E731
        p = {"A": jnp.asarray(rng.normal(size=(4, 5))), "B": jnp.asarray(rng.normal(size=(5, 3)))}
        xo, xu = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(2, 4)))
        kw = dict(loss_kwargs=dict(targets=jnp.array([0, 2])))
        tx = optax.adam(0.05)
        state = tx.init(p)
        for _ in range(2):  # a warm state: momentum and second moments are not fresh
            g = jax.grad(lambda q: jnp.sum(losses.sft(f(q, xu), targets=jnp.array([0, 2]))))(p)
            state = tx.update(g, state, p)[1]
        for how in (dict(eta=0.05), dict(optimizer=tx, opt_state=state)):
            a = ldjax.actual_step(f, p, xo, xu, losses.sft, **how, **kw)
            d1 = ldjax.decompose(f, p, xo, xu, losses.sft, **how, **kw)
            d2 = ldjax.decompose(f, p, xo, xu, losses.sft, order=2, **how, **kw)
            assert d1.delta_logits_curvature is None
            assert rel(d1.delta_logits, a.delta_logits) > 1e-3
            np.testing.assert_allclose(d2.delta_logits, a.delta_logits, rtol=1e-10, atol=1e-12)
            assert ldjax.compare(d2, a).entk_step < 1e-10
            # the first-order parts are unchanged; the curvature is what was missing
            np.testing.assert_allclose(d2.delta_logits_kernel, d1.delta_logits_kernel, rtol=1e-12)


def test_order_two_error_falls_as_eta_cubed():
    """On a tanh MLP (not polynomial in θ) the error of the second-order Δz is O(η³)."""
    with precision("float64"):
        f, p, xo, xu = small_model("mlp", jnp.float64)
        kw = dict(loss_kwargs=dict(targets=jnp.array([1, 3])))
        etas = np.logspace(-3, -1.5, 4)
        errs = {1: [], 2: []}
        for eta in etas:
            a = ldjax.actual_step(f, p, xo, xu, losses.sft, eta=eta, **kw)
            for order in (1, 2):
                d = ldjax.decompose(f, p, xo, xu, losses.sft, eta=eta, order=order, **kw)
                errs[order].append(float(np.linalg.norm(a.delta_logits - d.delta_logits)))
        slopes = {k: np.polyfit(np.log(etas), np.log(v), 1)[0] for k, v in errs.items()}
        assert abs(slopes[1] - 2) <= 0.15, slopes
        assert abs(slopes[2] - 3) <= 0.2, slopes
        assert errs[2][0] < 1e-2 * errs[1][0]


def test_order_is_checked():
    f, p, xo, xu = small_model("mlp", jnp.float32)
    for bad in (0, 3, True, 1.5):
        with pytest.raises(ValueError, match="order must be 1 or 2"):
            ldjax.decompose(
                f, p, xo, xu, losses.sft, eta=0.1, order=bad,
                loss_kwargs=dict(targets=jnp.array([1, 3])),
            )  # fmt: skip
