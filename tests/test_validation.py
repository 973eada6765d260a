"""Bad input raises an error that names the argument and what was wrong."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model

import ldjax
from ldjax import losses


@pytest.fixture(scope="module")
def mlp():
    return small_model("mlp", jnp.float32)


@pytest.fixture(scope="module")
def tf():
    return small_model("transformer", jnp.float32)


@pytest.mark.parametrize("eta", [0.0, -1e-3, float("nan"), "0.1"])
def test_eta_must_be_positive(mlp, eta):
    f, p, xo, xu = mlp
    with pytest.raises(ValueError, match="eta"):
        ldjax.decompose(
            f, p, xo, xu, losses.sft, eta=eta, loss_kwargs=dict(targets=jnp.array([0, 1]))
        )
    with pytest.raises(ValueError, match="eta"):
        ldjax.actual_step(
            f, p, xo, xu, losses.sft, eta=eta, loss_kwargs=dict(targets=jnp.array([0, 1]))
        )


def test_params_that_do_not_fit(mlp):
    f, p, xo, xu = mlp
    with pytest.raises(
        ValueError, match=r"params do not fit apply_fn on x_o \(input shapes \(3, 9\)"
    ):
        ldjax.entk(f, p, xo[:, :9], xu)


def test_mismatched_shapes(mlp, tf):
    f, p, xo, xu = mlp
    with pytest.raises(ValueError, match=r"v has shape \(2, 4\); expected \(2, 5\)"):
        ldjax.entk_vp(f, p, xo, xu, jnp.zeros((2, 4)))
    ft, pt, to, tu = tf
    with pytest.raises(ValueError, match=r"mask_o has shape \(2, 6\); expected \(2, 7\)"):
        ldjax.entk(ft, pt, to, tu, mask_o=np.ones((2, 6), bool))
    with pytest.raises(ValueError, match="mask_o given, but the logits"):
        ldjax.entk(f, p, xo, xu, mask_o=np.ones((3, 1), bool))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ldjax.entk(f, p, xo, xu, reduction="mean")
    with pytest.raises(ValueError, match="implementation must be one of"):
        ldjax.entk(f, p, xo, xu, implementation="fast")
    with pytest.raises(ValueError, match="x_u: leaves disagree on the batch size"):
        ldjax.entk(
            lambda p, x: f(p, x[0]) + x[1], p, (xo, jnp.zeros((3, 1))), (xu, jnp.zeros((3, 1)))
        )


def test_mask_that_selects_nothing(tf):
    f, p, xo, xu = tf
    m = np.ones((2, 7), bool)
    m[1] = False
    with pytest.raises(ValueError, match=r"mask_u selects no position in example\(s\) \[1\]"):
        ldjax.entk(f, p, xo, xu, mask_u=m)


def test_non_finite_logits(mlp):
    f, p, xo, xu = mlp
    bad = xu.at[1, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"logits of x_u\[0\] contains .* non-finite"):
        ldjax.decompose(
            f, p, xo, bad, losses.sft, eta=0.1, loss_kwargs=dict(targets=jnp.array([0, 1]))
        )
    with pytest.raises(ValueError, match=r"logits\[0\] contains 1 non-finite"):
        ldjax.G(losses.sft, jnp.array([[0.0, jnp.inf]]), targets=jnp.array([0]))
    with pytest.raises(ValueError, match="v contains"):
        ldjax.entk_vp(f, p, xo, xu, jnp.full((2, 5), jnp.nan))
