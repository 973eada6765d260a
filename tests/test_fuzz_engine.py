"""Fuzzing the engine's entry points: hypothesis draws shapes, dtypes and values, with or without
one fault, and every call either returns finite numbers equal to a closed form or raises
ValueError. There is no third outcome: a valid call never raises, a faulty one always does.

The models have closed-form kernels, so the reference needs no autodiff:

* features: ``z = tanh(x) W + b``, ``K(x_o, x_u) = (⟨tanh x_o, tanh x_u⟩ + 1) I``;
* tokens: ``z = E[x] W``, ``K = ⟨e_o, e_u⟩ I + [x_o = x_u] WᵀW`` (an id outside E gives NaN
  logits: ``jnp.take`` fills).

Shapes come from a few sizes so that compilations repeat (the file takes a few seconds).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ldjax
from ldjax import losses

D, VOCAB, EMB = 3, 6, 2
SETTINGS = dict(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def features(p, x):
    return jnp.tanh(x) @ p["w"] + p["b"]


def tokens(p, x):
    return jnp.take(p["E"], x, axis=0) @ p["W"]


def K_features(p, xo, xu):
    fo, fu = np.tanh(np.asarray(xo, np.float64)), np.tanh(np.asarray(xu, np.float64))
    v = p["w"].shape[1]
    return (fo @ fu.T + 1)[:, :, None, None] * np.eye(v)


def K_tokens(p, xo, xu):
    E, W = np.asarray(p["E"], np.float64), np.asarray(p["W"], np.float64)
    eo, eu = E[np.asarray(xo)], E[np.asarray(xu)]
    same = np.asarray(xo)[:, None] == np.asarray(xu)[None, :]
    return (eo @ eu.T)[:, :, None, None] * np.eye(W.shape[1]) + same[:, :, None, None] * (W.T @ W)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


reals = st.floats(-2.0, 2.0, allow_nan=False, width=32)


def arrays(draw, shape):
    return np.asarray(
        draw(st.lists(reals, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
        np.float32,
    ).reshape(shape)


FAULTS = {
    "entk": [
        "nan_x_o",
        "inf_x_u",
        "nan_param",
        "int_param",
        "oov",
        "budget_str",
        "budget_nan",
        "budget_neg",
        "mask_on_classifier",
    ],
    "entk_vp": ["nan_x_o", "inf_x_u", "nan_param", "int_param", "oov", "v_shape", "v_nan"],
    "decompose": [
        "nan_x_o",
        "inf_x_u",
        "nan_param",
        "int_param",
        "oov",
        "target_high",
        "target_neg",
        "target_float",
        "target_shape",
        "eta",
    ],
}
CASES = [(e, f) for e, fs in FAULTS.items() for f in [None] + fs]


@st.composite
def problems(draw, entry, fault):
    """The arguments of one call of ``entry`` with ``fault`` (None: a valid call)."""
    n_o = draw(st.sampled_from([1, 3]))
    n_u = 2
    v = draw(st.sampled_from([2, 3]))
    model = "tokens" if fault == "oov" else draw(st.sampled_from(["features", "tokens"]))
    if fault in ("nan_x_o", "inf_x_u") or entry != "entk":
        model = "features" if fault != "oov" else "tokens"
    if model == "features":
        p = {"w": arrays(draw, (D, v)), "b": arrays(draw, (v,))}
        xo, xu = arrays(draw, (n_o, D)), arrays(draw, (n_u, D))
    else:
        p = {"E": arrays(draw, (VOCAB, EMB)), "W": arrays(draw, (EMB, v))}
        ids = st.integers(0, VOCAB - 1)
        xo = np.asarray(draw(st.lists(ids, min_size=n_o, max_size=n_o)), np.int32)
        xu = np.asarray(draw(st.lists(ids, min_size=n_u, max_size=n_u)), np.int32)
    if fault == "nan_x_o":
        xo[draw(st.integers(0, n_o - 1)), draw(st.integers(0, D - 1))] = np.nan
    if fault == "inf_x_u":
        xu[draw(st.integers(0, n_u - 1)), 0] = draw(st.sampled_from([np.inf, -np.inf]))
    if fault == "nan_param":
        key = sorted(p)[draw(st.integers(0, len(p) - 1))]
        flat = p[key].reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
    if fault == "int_param":
        key = sorted(p)[draw(st.integers(0, len(p) - 1))]
        p[key] = np.round(p[key]).astype(np.int32)
    if fault == "oov":
        xu[draw(st.integers(0, n_u - 1))] = draw(st.integers(VOCAB, VOCAB + 5))
    p = {k: jnp.asarray(a) for k, a in p.items()}
    f, K = (features, K_features) if model == "features" else (tokens, K_tokens)
    return dict(f=f, K=K, p=p, xo=jnp.asarray(xo), xu=jnp.asarray(xu), v=v)


def _outcome(call):
    """``("ok", result)`` or ``("error", ValueError)``; anything else propagates (a failure)."""
    try:
        return "ok", call()
    except ValueError as e:
        return "error", e


def _check(fault, outcome, result, reference):
    if fault is None:
        assert outcome == "ok", f"a valid call raised: {result}"
        got = np.asarray(result, np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, reference(), rtol=1e-4, atol=1e-4)
    else:
        assert outcome == "error", f"fault {fault} returned {result!r} instead of raising"
        assert str(result), "an empty message"


def call_entk(prob, fault, draw):
    f, p, xo, xu = prob["f"], prob["p"], prob["xo"], prob["xu"]
    kw = dict(implementation=draw(st.sampled_from(["auto", "vp", "jacobian"])))
    symmetric = draw(st.booleans()) and fault not in ("inf_x_u", "oov")
    kw["memory_budget"] = {
        "budget_str": "4GB",
        "budget_nan": math.nan,
        "budget_neg": -1,
    }.get(fault, draw(st.sampled_from([ldjax.DEFAULT_MEMORY_BUDGET, 300])))
    if fault == "mask_on_classifier":
        kw["mask_o"] = np.ones((xo.shape[0], 1), bool)
    x_u = None if symmetric else xu
    outcome, result = _outcome(lambda: ldjax.entk(f, p, xo, x_u, **kw))
    _check(fault, outcome, result, lambda: prob["K"](p, xo, xo if symmetric else xu))


def call_entk_vp(prob, fault, draw):
    f, p, xo, xu, v = prob["f"], prob["p"], prob["xo"], prob["xu"], prob["v"]
    vec = np.asarray(draw(st.lists(reals, min_size=2 * v, max_size=2 * v)), np.float32)
    vec = vec.reshape(2, v)
    if fault == "v_shape":
        vec = vec[:1]
    elif fault == "v_nan":
        vec[draw(st.integers(0, 1)), 0] = np.nan
    outcome, result = _outcome(lambda: ldjax.entk_vp(f, p, xo, xu, jnp.asarray(vec)))
    ref = lambda: np.einsum("ouij,uj->oi", prob["K"](p, xo, xu), vec.astype(np.float64))
    _check(fault, outcome, result, ref)


def call_decompose(prob, fault, draw):
    f, p, xo, xu, v = prob["f"], prob["p"], prob["xo"], prob["xu"], prob["v"]
    y = np.asarray(draw(st.lists(st.integers(0, v - 1), min_size=2, max_size=2)))
    eta = draw(st.sampled_from([0.1, 1.0]))
    if fault == "target_high":
        y[1] = v + draw(st.integers(0, 3))
    elif fault == "target_neg":
        y[0] = -draw(st.integers(1, 3))
    elif fault == "target_float":
        y = y + 0.5
    elif fault == "target_shape":
        y = y[:1]
    elif fault == "eta":
        eta = draw(st.sampled_from([0.0, -0.1, math.nan, math.inf]))
    method = draw(st.sampled_from(["vp", "blocks"]))

    def reference():
        G = _softmax(f(p, xu)) - np.eye(v)[y]
        return -eta * np.einsum("ouij,uj->oi", prob["K"](p, xo, xu), G)

    kw = dict(targets=jnp.asarray(y))
    outcome, result = _outcome(
        lambda: (
            ldjax.decompose(
                f, p, xo, xu, losses.sft, eta=eta, loss_kwargs=kw, method=method
            ).delta_logits
        )
    )
    _check(fault, outcome, result, reference)


CALLS = {"entk": call_entk, "entk_vp": call_entk_vp, "decompose": call_decompose}


@pytest.mark.parametrize("entry,fault", CASES, ids=[f"{e}-{f}" for e, f in CASES])
def test_fuzz_entry_point(entry, fault):
    """Valid calls (fault None) equal the closed form; each kind of fault raises ValueError."""

    @settings(**{**SETTINGS, "max_examples": 8 if fault is None else 3})
    @given(prob=problems(entry, fault), data=st.data())
    def run(prob, data):
        CALLS[entry](prob, fault, data.draw)

    run()


@pytest.mark.parametrize("fault", [None, "high", "neg", "float", "shape", "nan"])
def test_fuzz_sft_and_G(fault):
    """``losses.sft`` equals −log π(y) and ``G`` equals π − e_y, or both raise ValueError."""

    @settings(**{**SETTINGS, "max_examples": 8 if fault is None else 3})
    @given(data=st.data())
    def run(data):
        n, v = data.draw(st.sampled_from([1, 2, 3])), data.draw(st.sampled_from([2, 4]))
        z = arrays(data.draw, (n, v)) * 3
        y = np.asarray(data.draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)))
        if fault == "high":
            y[-1] = v + data.draw(st.integers(0, 2))
        elif fault == "neg":
            y[0] = -data.draw(st.integers(1, 2))
        elif fault == "float":
            y = y.astype(np.float32)
        elif fault == "shape":
            y = y[None]
        elif fault == "nan":
            z[data.draw(st.integers(0, n - 1)), -1] = data.draw(st.sampled_from([np.nan, np.inf]))
        yj, zj = jnp.asarray(y), jnp.asarray(z)
        out, res = _outcome(lambda: losses.sft(zj, yj))
        _check(fault, out, res, lambda: -np.log(_softmax(z)[np.arange(n), y]))
        out, res = _outcome(lambda: ldjax.G(losses.sft, zj, targets=yj))
        _check(fault, out, res, lambda: _softmax(z) - np.eye(v)[y])

    run()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
