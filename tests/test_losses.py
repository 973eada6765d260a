"""G from jax.grad equals the closed forms (arXiv 2407.10490, §3 and Figure 2), both branches, signs
included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import precision

import ldjax
from ldjax import losses

N, T, V = 3, 5, 7


def _batch(seed):
    rng = np.random.default_rng(seed)
    zp, zn = rng.normal(size=(N, T, V)) * 2, rng.normal(size=(N, T, V)) * 2
    tp, tn = rng.integers(0, V, (N, T)), rng.integers(0, V, (N, T))
    mp = rng.uniform(size=(N, T)) < 0.7
    mn = rng.uniform(size=(N, T)) < 0.7
    mp[:, 0] = mn[:, 0] = True
    return [jnp.asarray(a) for a in (zp, zn, tp, tn, mp, mn)]


def _closed(z, y, m):
    """π − y on the masked positions, zero elsewhere: (N, T, V)."""
    pi = jax.nn.softmax(z, -1)
    return (pi - jax.nn.one_hot(y, V, dtype=pi.dtype)) * m[..., None]


def _r(z, y, m, ref):
    return np.asarray(losses.sequence_logprob(z, y, m)) - ref


@pytest.mark.parametrize("seed", [0, 1])
def test_sft_G_is_pi_minus_y(seed):
    with precision("float64"):
        zp, _, tp, _, mp, _ = _batch(seed)
        g = ldjax.G(losses.sft, zp, targets=tp, mask=mp)
        np.testing.assert_allclose(g, _closed(zp, tp, mp), atol=1e-13)
        # classifier form: G = π − e_y
        z = zp[:, 0]
        y = tp[:, 0]
        np.testing.assert_allclose(
            ldjax.G(losses.sft, z, targets=y), jax.nn.softmax(z) - jax.nn.one_hot(y, V), atol=1e-13
        )


@pytest.mark.parametrize("name", ["dpo", "ipo", "sppo", "slic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_G_closed_forms(name, seed):
    with precision("float64"):
        zp, zn, tp, tn, mp, mn = _batch(seed)
        rng = np.random.default_rng(100 + seed)
        lp, ln = _r(zp, tp, mp, 0.0), _r(zn, tn, mn, 0.0)
        # reference log-probs near the policy's so both signs of the margins occur across seeds
        ref_p = lp + rng.normal(size=N) * 3
        ref_n = ln + rng.normal(size=N) * 3
        beta = 0.5
        kw = dict(
            targets_pos=tp,
            targets_neg=tn,
            mask_pos=mp,
            mask_neg=mn,
            ref_logp_pos=jnp.asarray(ref_p),
            ref_logp_neg=jnp.asarray(ref_n),
            beta=beta,
        )
        if name == "slic":
            kw = dict(targets_pos=tp, targets_neg=tn, mask_pos=mp, mask_neg=mn, delta=3.0, lam=0.3)
        gp, gn = ldjax.G(losses.PAIRWISE[name], zp, zn, **kw)
        Cp, Cn = _closed(zp, tp, mp), _closed(zn, tn, mn)
        rp, rn = lp - ref_p, ln - ref_n
        h = rp - rn
        if name == "dpo":
            a = 1 / (1 + np.exp(-beta * h))
            cp, cn = beta * (1 - a), -beta * (1 - a)
        elif name == "ipo":
            cp = 2 * (1 / (2 * beta) - h)
            cn = -cp
        elif name == "sppo":
            c = 1 / beta
            cp, cn = 2 * (c / 2 - rp), -2 * (rn + c / 2)
        else:
            active = (3.0 - (lp - ln)) > 0
            cp, cn = active + 0.3, -active.astype(float)
        np.testing.assert_allclose(gp, cp[:, None, None] * Cp, atol=1e-12)
        np.testing.assert_allclose(gn, cn[:, None, None] * Cn, atol=1e-12)


def test_slic_both_branches_of_the_hinge():
    with precision("float64"):
        zp, zn, tp, tn, mp, mn = _batch(3)
        lp, ln = _r(zp, tp, mp, 0.0), _r(zn, tn, mn, 0.0)
        margin = lp - ln
        for delta, want in [(float(margin.max()) + 1.0, True), (float(margin.min()) - 1.0, False)]:
            _, gn = ldjax.G(
                losses.slic,
                zp,
                zn,
                targets_pos=tp,
                targets_neg=tn,
                mask_pos=mp,
                mask_neg=mn,
                delta=delta,
                lam=0.0,
            )
            assert bool(np.any(np.asarray(gn) != 0)) == want


def test_A_closed_form_and_norm():
    with precision("float64"):
        z = jnp.asarray(np.random.default_rng(0).normal(size=(4, V)) * 3)
        A = ldjax.A(z)
        jac = jax.vmap(jax.jacfwd(lambda x: jax.nn.log_softmax(x)))(z)
        np.testing.assert_allclose(A, jac, atol=1e-13)
        pi = np.asarray(jax.nn.softmax(z))
        np.testing.assert_allclose(
            ldjax.A_norm(z), np.sqrt(V - 2 + V * (pi**2).sum(-1)), atol=1e-12
        )
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(A), axis=(1, 2)), ldjax.A_norm(z), atol=1e-12
        )
        v = np.random.default_rng(1).normal(size=(4, V))
        np.testing.assert_allclose(ldjax.apply_A(z, v), np.einsum("nij,nj->ni", A, v), atol=1e-12)
