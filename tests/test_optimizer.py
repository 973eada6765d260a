"""Optimizer-aware prediction: the eNTK K_P = J_o diag(p) J_uᵀ an optimizer induces equals its
jacrev definition for every implementation; decompose(optimizer=, opt_state=) predicts the real
update (exact for SGD with momentum and weight decay, whose step is linear in the gradient: the
remainder is zero and the error falls as η²), splits it into the batch's terms, the state's
carry-over and the remainder, and agrees with actual_step(optimizer=, opt_state=)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import jacrev_entk, precision, rel, small_model

import ldjax
from ldjax import losses


def _kp_definition(f, p, x_o, x_u, pre):
    jo = jax.jacrev(lambda q: f(q, x_o))(p)
    ju = jax.jacrev(lambda q: f(q, x_u))(p)
    k = len(jax.eval_shape(f, p, x_o).shape)
    spec = "oip,ujp->ouij" if k == 2 else "omip,uljp->oumlij"
    total = 0.0
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (jo, ju, pre))):
        a = a.reshape(a.shape[:k] + (-1,)) * jnp.reshape(c, -1)
        total = total + jnp.einsum(spec, a, b.reshape(b.shape[:k] + (-1,)))
    return total


def _random_pre(p, seed=0):
    leaves, td = jax.tree_util.tree_flatten(p)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        td, [jnp.asarray(rng.uniform(0.5, 2.0, np.shape(a)), a.dtype) for a in leaves]
    )


@pytest.mark.parametrize("model", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_preconditioned_entk_equals_its_definition(model):
    with precision("float64"):
        f, p, x_o, x_u = small_model(model, "float64")
        pre = _random_pre(p)
        ref = _kp_definition(f, p, x_o, x_u, pre)
        for impl in ("jacobian", "vp", "structured", "auto"):
            K = ldjax.entk(f, p, x_o, x_u, implementation=impl, preconditioner=pre)
            assert rel(K, ref) < 1e-10, impl
        # a constant preconditioner keeps every site structured: η K
        const = jax.tree_util.tree_map(lambda a: 0.3, p)
        K = ldjax.entk(f, p, x_o, x_u, implementation="structured", preconditioner=const)
        assert rel(K, 0.3 * jacrev_entk(f, p, x_o, x_u)) < 1e-10
        if model == "mlp":
            v = jnp.asarray(np.random.default_rng(1).normal(size=jax.eval_shape(f, p, x_u).shape))
            kv = ldjax.entk_vp(f, p, x_o, x_u, v, preconditioner=pre)
            assert rel(kv, jnp.einsum("ouij,uj->oi", ref, v)) < 1e-10
            with pytest.raises(ValueError, match="preconditioner leaf"):
                ldjax.entk(
                    f, p, x_o, x_u, preconditioner=jax.tree_util.tree_map(lambda a: a[:1], p)
                )


def _warm_state(tx, f, p, x, y, steps=3):
    state, q = tx.init(p), p
    for _ in range(steps):
        g = jax.grad(lambda q: jnp.sum(losses.sft(f(q, x), y)))(q)
        u, state = tx.update(g, state, q)
        q = optax.apply_updates(q, u)
    return state


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_sgd_momentum_prediction_is_exact_to_first_order_and_error_falls_as_eta_squared():
    with precision("float64"):
        f, p, x_o, x_u = small_model("mlp", "float64")
        y = jnp.array([1, 3])
        make = lambda lr: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))
        state = _warm_state(make(1e-2), f, p, x_u[::-1], y)  # a non-zero momentum buffer
        errs = []
        for lr in (1e-2, 1e-3, 1e-4):
            kw = dict(loss_kwargs=dict(targets=y), optimizer=make(lr), opt_state=state)
            d = ldjax.decompose(f, p, x_o, x_u, losses.sft, **kw)
            a = ldjax.actual_step(f, p, x_o, x_u, losses.sft, **kw)
            # linear in the gradient: no remainder; the carry-over is the momentum and the decay
            assert float(jnp.max(jnp.abs(d.delta_logits_remainder))) < 1e-12 * float(
                jnp.max(jnp.abs(d.delta_logits))
            )
            assert float(jnp.linalg.norm(d.delta_logits_carry)) > 0.1 * float(
                jnp.linalg.norm(d.delta_logits)
            )
            errs.append(float(jnp.linalg.norm(a.delta_logits - d.delta_logits)))
            assert d.eta is None
        slopes = np.diff(np.log(errs)) / np.diff(np.log([1e-2, 1e-3, 1e-4]))
        assert np.all(np.abs(slopes - 2.0) < 0.05), slopes  # O(η²)
        # the batch's term is −η K G (momentum adds g once to the buffer); the state's part is
        # the optimizer's update at g = 0 seen through J_o
        d = ldjax.decompose(
            f,
            p,
            x_o,
            x_u,
            losses.sft,
            loss_kwargs=dict(targets=y),
            optimizer=make(1e-3),
            opt_state=state,
        )
        sgd = ldjax.decompose(f, p, x_o, x_u, losses.sft, eta=1e-3, loss_kwargs=dict(targets=y))
        assert rel(d.delta_logits_terms[0], sgd.delta_logits_terms[0]) < 1e-10


@pytest.mark.slow  # > 10 s on 2 cores
def test_adam_exact_update_against_the_kernel_linearised_at_the_state():
    with precision("float64"):
        f, p, x_o, x_u = small_model("mlp", "float64")
        y = jnp.array([1, 3])
        make = lambda lr: optax.adamw(lr, weight_decay=0.01)
        state = _warm_state(make(1e-2), f, p, x_u[::-1], y)
        rel_exact, rel_kernel = [], []
        for lr in (1e-3, 1e-4):
            kw = dict(loss_kwargs=dict(targets=y), optimizer=make(lr), opt_state=state)
            d = ldjax.decompose(f, p, x_o, x_u, losses.sft, **kw)
            a = ldjax.actual_step(f, p, x_o, x_u, losses.sft, **kw)
            rel_exact.append(ldjax.compare(d, a).entk_step)
            rel_kernel.append(rel(d.delta_logits_kernel, a.delta_logits))
        # the exact update: first order, its error falls with η; the kernel (v̂ without the current
        # g²) misses Adam's nonlinearity by a constant fraction
        assert rel_exact[0] < 0.01 and 5 < rel_exact[0] / rel_exact[1] < 20
        assert rel_kernel[1] > 10 * rel_exact[1] and rel_kernel[1] == pytest.approx(
            rel_kernel[0], rel=0.05
        )
        # the kernel's preconditioner from the state: Adam's p = η (1−β₁)/(1−β₁ᵗ)/(√v̂ + ε) with
        # v̂ = β₂ v/(1−β₂ᵗ) (the update at g = 0, so v has not seen the current gradient)
        adam = state[0]
        t = int(adam.count) + 1
        lr, b1, b2, eps = 1e-4, 0.9, 0.999, 1e-8
        want = jax.tree_util.tree_map(
            lambda v: lr * (1 - b1) / (1 - b1**t) / (jnp.sqrt(b2 * v / (1 - b2**t)) + eps), adam.nu
        )
        got = ldjax.preconditioner(make(lr), state, p)
        assert rel(jax.tree_util.tree_leaves(got)[0], jax.tree_util.tree_leaves(want)[0]) < 1e-10
        # method="blocks" (K_P from exact blocks) gives the same numbers as the vector products
        kw = dict(loss_kwargs=dict(targets=y), optimizer=make(1e-4), opt_state=state)
        db = ldjax.decompose(f, p, x_o, x_u, losses.sft, method="blocks", **kw)
        dv = ldjax.decompose(f, p, x_o, x_u, losses.sft, **kw)
        assert rel(db.delta_logits_terms[0], dv.delta_logits_terms[0]) < 1e-10
        assert rel(db.delta_logits, dv.delta_logits) < 1e-10


@pytest.mark.slow  # > 10 s on 2 cores
def test_dpo_terms_stay_apart_and_sum_with_the_carry_to_the_update():
    with precision("float64"):
        f, p, x_o, x_u = small_model("transformer", "float64")
        n, t = x_u.shape
        rng = np.random.default_rng(2)
        y, m = jnp.asarray(rng.integers(0, 13, (n, t))), jnp.asarray(rng.random((n, t)) > 0.3)
        x_neg = jnp.asarray(rng.integers(0, 13, (n, t)))
        kw = dict(
            targets_pos=y,
            targets_neg=y[::-1],
            mask_pos=m,
            mask_neg=m[::-1],
            ref_logp_pos=jnp.zeros(n),
            ref_logp_neg=jnp.zeros(n),
            beta=0.1,
        )
        tx = optax.sgd(1e-3, momentum=0.9)
        state = tx.init(p)
        state = (optax.TraceState(trace=_random_pre(p, 3)),) + tuple(state[1:])
        d = ldjax.decompose(
            f, p, x_o, (x_u, x_neg), losses.dpo, loss_kwargs=kw, optimizer=tx, opt_state=state
        )
        sgd = ldjax.decompose(f, p, x_o, (x_u, x_neg), losses.dpo, eta=1e-3, loss_kwargs=kw)
        for k in range(2):
            assert rel(d.delta_logits_terms[k], sgd.delta_logits_terms[k]) < 1e-10
        a = ldjax.actual_step(
            f, p, x_o, (x_u, x_neg), losses.dpo, loss_kwargs=kw, optimizer=tx, opt_state=state
        )
        assert ldjax.compare(d, a).entk_step < 1e-2
        # split=False: the same prediction from one JVP of both branches' summed update
        whole = ldjax.decompose(
            f, p, x_o, (x_u, x_neg), losses.dpo, loss_kwargs=kw, optimizer=tx, opt_state=state,
            split=False,
        )  # fmt: skip
        assert rel(whole.delta_logits, d.delta_logits) < 1e-12
        assert len(whole.G) == 2 and rel(whole.G[1], d.G[1]) == 0.0


@pytest.mark.slow  # 9 s on 2 quiet cores
def test_unsplit_update_is_the_sum_of_the_causes():
    """split=False: J_o U(g) in one JVP equals terms + carry + remainder (Adam, with the state's
    first moment and the nonlinear second moment), at order 1 and 2; bad combinations are errors."""
    with precision("float64"):
        f, p, x_o, x_u = small_model("mlp", "float64")
        y = jnp.array([1, 3])
        tx = optax.adamw(1e-3, weight_decay=0.01)
        state = _warm_state(tx, f, p, x_u[::-1], y)
        kw = dict(loss_kwargs=dict(targets=y), optimizer=tx, opt_state=state)
        for order in (1, 2):
            d = ldjax.decompose(f, p, x_o, x_u, losses.sft, order=order, **kw)
            whole = ldjax.decompose(f, p, x_o, x_u, losses.sft, order=order, split=False, **kw)
            # all three causes are there and large: the sum is not a single part in disguise
            for part in (d.delta_logits_terms[0], d.delta_logits_carry, d.delta_logits_remainder):
                assert float(jnp.linalg.norm(part)) > 1e-3 * float(jnp.linalg.norm(d.delta_logits))
            assert rel(whole.delta_logits, d.delta_logits) < 1e-12
            assert (
                rel(
                    whole.delta_logits_update,
                    d.delta_logits - (d.delta_logits_curvature if order == 2 else 0.0),
                )
                < 1e-12
            )
            assert whole.delta_logits_terms == () and whole.delta_logits_carry is None
            a = ldjax.actual_step(f, p, x_o, x_u, losses.sft, **kw)
            assert ldjax.compare(whole, a).entk_step == pytest.approx(
                ldjax.compare(d, a).entk_step, rel=1e-9
            )
        with pytest.raises(ValueError, match="split=False"):
            whole.delta_logits_kernel  # noqa: B018
        sft = dict(loss_kwargs=kw["loss_kwargs"])
        with pytest.raises(ValueError, match="split=False is for an optimizer"):
            ldjax.decompose(f, p, x_o, x_u, losses.sft, eta=0.1, split=False, **sft)
        with pytest.raises(ValueError, match="no K blocks"):
            ldjax.decompose(f, p, x_o, x_u, losses.sft, method="blocks", split=False, **kw)
        with pytest.raises(ValueError, match="split must be True or False"):
            ldjax.decompose(f, p, x_o, x_u, losses.sft, split=0, **kw)


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_actual_step_continues_the_optimizer_state_and_bad_combinations_are_errors():
    f, p, x_o, x_u = small_model("mlp", "float32")
    y = jnp.array([1, 3])
    tx = optax.adam(1e-2)
    s1 = ldjax.actual_step(f, p, x_o, x_u, losses.sft, optimizer=tx, loss_kwargs=dict(targets=y))
    s2 = ldjax.actual_step(
        f,
        s1.params,
        x_o,
        x_u,
        losses.sft,
        optimizer=tx,
        opt_state=s1.opt_state,
        loss_kwargs=dict(targets=y),
    )
    state, q = tx.init(p), p  # the same two steps by hand
    for _ in range(2):
        g = jax.grad(lambda q: jnp.sum(losses.sft(f(q, x_u), y)))(q)
        u, state = tx.update(g, state, q)
        q = optax.apply_updates(q, u)
    for a, b in zip(jax.tree_util.tree_leaves(s2.params), jax.tree_util.tree_leaves(q)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    kw = dict(loss_kwargs=dict(targets=y))
    with pytest.raises(ValueError, match="not both"):
        ldjax.decompose(f, p, x_o, x_u, losses.sft, eta=0.1, optimizer=tx, **kw)
    with pytest.raises(ValueError, match="not both"):
        ldjax.actual_step(f, p, x_o, x_u, losses.sft, eta=0.1, optimizer=tx, **kw)
    with pytest.raises(ValueError, match="opt_state given without an optimizer"):
        ldjax.decompose(f, p, x_o, x_u, losses.sft, eta=0.1, opt_state=s1.opt_state, **kw)
    with pytest.raises(ValueError, match="eta .* or an optimizer"):
        ldjax.decompose(f, p, x_o, x_u, losses.sft, **kw)
    mixing = optax.stateless(lambda g, _: jax.tree_util.tree_map(lambda a: a + jnp.roll(a, 1), g))
    with pytest.raises(ValueError, match="not elementwise"):
        ldjax.preconditioner(mixing, mixing.init(p), p)
    sgd_p = ldjax.preconditioner(optax.sgd(0.25), optax.sgd(0.25).init(p), p)
    assert all(np.allclose(a, 0.25) for a in jax.tree_util.tree_leaves(sgd_p))
