"""The bad-input suite: every category of the 151-case sweep (issue "Nothing silent") raises
ValueError naming the argument, and where it applies the index and the value.

Each case is ``(call, patterns)``: ``call(m)`` runs an entry point on the tiny models of
``conftest.small_model`` with one thing wrong; every regex of ``patterns`` must be found in the
message (the argument's name first, then the index and the value).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model

import ldjax
from ldjax import losses
from ldjax._src import validate

V, VT, T = 5, 13, 7  # classes of the MLP, vocabulary and length of the transformer


@pytest.fixture(scope="module")
def m():
    f, p, xo, xu = small_model("mlp", jnp.float32)  # x_o (3, 12), x_u (2, 12), V 5
    ft, pt, to, tu = small_model("transformer", jnp.float32)  # tokens (2, 7), V 13
    y = jnp.array([0, 1])
    ys = jnp.asarray(np.random.default_rng(0).integers(0, VT, (2, T)), jnp.int32)
    mask = jnp.ones((2, T), bool)
    ref = jnp.array([-20.0, -21.0])
    pair = dict(
        targets_pos=ys,
        targets_neg=(ys + 1) % VT,
        mask_pos=mask,
        mask_neg=mask,
        ref_logp_pos=ref,
        ref_logp_neg=ref - 1.0,
    )
    # one token in, V logits out: z = E[x] W (an embedding lookup, jnp.take: fill mode)
    rng = np.random.default_rng(1)
    pe = {"E": jnp.asarray(rng.normal(size=(VT, 4)), jnp.float32)}
    pe["W"] = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
    fe = lambda p, x: jnp.take(p["E"], x, axis=0) @ p["W"]
    te = jnp.array([1, 5, 12], jnp.int32)
    return dict(
        f=f,
        p=p,
        xo=xo,
        xu=xu,
        ft=ft,
        pt=pt,
        to=to,
        tu=tu,
        y=y,
        ys=ys,
        pair=pair,
        fe=fe,
        pe=pe,
        te=te,
    )


def _nan_at(tree, path_key, idx, value=jnp.nan):
    """``tree`` with ``tree[path_key][idx] = value``."""
    out = jax.tree_util.tree_map(lambda a: a, tree)
    out[path_key[0]][path_key[1]] = out[path_key[0]][path_key[1]].at[idx].set(value)
    return out


def _sft(m, **kw):
    return ldjax.decompose(m["f"], m["p"], m["xo"], m["xu"], losses.sft, eta=0.1, loss_kwargs=kw)


def _step(m, **kw):
    return ldjax.actual_step(m["f"], m["p"], m["xo"], m["xu"], losses.sft, eta=0.1, loss_kwargs=kw)


def _dpo(m, x_u=None, loss=losses.dpo, **kw):
    x_u = (m["tu"], m["tu"][::-1]) if x_u is None else x_u
    return ldjax.decompose(
        m["ft"], m["pt"], m["to"], x_u, loss, eta=0.1, loss_kwargs={**m["pair"], **kw}
    )


def _pair_G(m, loss=losses.dpo, **kw):
    z = jnp.zeros((2, T, VT))
    return ldjax.G(loss, z, z, **{**m["pair"], **kw})


Z = jnp.zeros((2, V))
ZS = jnp.zeros((2, T, VT))

CASES = {
    # ---- 2. loss targets: integer, within [0, V), shaped like the logits
    "sft target = V": (
        lambda m: losses.sft(Z, jnp.array([0, V])),
        [r"^targets\[1\] = 5 is out of range \[0, 5\)"],
    ),
    "sft target -1": (lambda m: losses.sft(Z, jnp.array([0, -1])), [r"^targets\[1\] = -1"]),
    "sft target broadcast": (
        lambda m: losses.sft(Z, jnp.array([4])),
        [r"^targets has shape \(1,\); expected \(2,\)"],
    ),
    "sft float target": (
        lambda m: losses.sft(Z, jnp.array([4.7, 3.2])),
        [r"^targets must hold integer class indices", r"float32", r"targets\[0\] = 4\.7"],
    ),
    "sft bool target": (lambda m: losses.sft(Z, jnp.array([True, False])), [r"^targets", "bool"]),
    "sft list target": (lambda m: losses.sft(Z, [4, 9]), [r"^targets\[1\] = 9 is out of range"]),
    "sequence target = V": (
        lambda m: losses.sft(ZS, m["ys"].at[1, 2].set(VT)),
        [r"^targets\[1, 2\] = 13 is out of range \[0, 13\)"],
    ),
    "sequence target shape": (
        lambda m: losses.sft(ZS, m["ys"][:, :6]),
        [r"^targets has shape \(2, 6\); expected \(2, 7\)"],
    ),
    "sequence_logprob target -1": (
        lambda m: losses.sequence_logprob(ZS, m["ys"].at[0, 3].set(-1)),
        [r"^targets\[0, 3\] = -1"],
    ),
    "token_logprobs target = V": (
        lambda m: losses.token_logprobs(Z, jnp.array([5, 0])),
        [r"^targets\[0\] = 5"],
    ),
    "G target = V": (
        lambda m: ldjax.G(losses.sft, Z, targets=jnp.array([0, V])),
        [r"^targets\[1\] = 5", r"logits\[0\]"],
    ),
    "decompose target = V": (
        lambda m: _sft(m, targets=jnp.array([0, V])),
        [r"^targets\[1\] = 5", r"logits of x_u\[0\]"],
    ),
    "decompose float target": (
        lambda m: _sft(m, targets=jnp.array([4.7, 9.2])),
        [r"^targets must hold integer", r"targets\[0\] = 4\.7"],
    ),
    "decompose target broadcast": (
        lambda m: _sft(m, targets=jnp.array([4])),
        [r"^targets has shape \(1,\); expected \(2,\)"],
    ),
    "decompose targets missing": (lambda m: _sft(m), [r"^targets is required"]),
    "actual_step target -1": (
        lambda m: _step(m, targets=jnp.array([0, -1])),
        [r"^targets\[1\] = -1"],
    ),
    "dpo sequence target = V": (
        lambda m: _dpo(m, targets_neg=m["ys"].at[1, 2].set(VT)),
        [r"^targets_neg\[1, 2\] = 13", r"logits of x_u\[1\]"],
    ),
    "dpo targets_pos batch": (
        lambda m: _pair_G(m, targets_pos=m["ys"][:1]),
        [r"^targets_pos has shape \(1, 7\); expected \(2, 7\)"],
    ),
    # ---- masks
    "sft mask shape": (
        lambda m: losses.sft(ZS, m["ys"], jnp.ones((2, 6), bool)),
        [r"^mask has shape \(2, 6\); expected \(2, 7\)"],
    ),
    "sft mask NaN weight": (
        lambda m: losses.sft(ZS, m["ys"], jnp.ones((2, T)).at[1, 4].set(jnp.nan)),
        [r"^mask contains 1 non-finite", r"\(1, 4\)", "nan"],
    ),
    "dpo mask_neg batch": (
        lambda m: _pair_G(m, mask_neg=jnp.ones((3, T), bool)),
        [r"^mask_neg has shape \(3, 7\); expected \(2, 7\)"],
    ),
    "entk mask_o values": (
        lambda m: ldjax.entk(m["ft"], m["pt"], m["to"], mask_o=jnp.full((2, T), 2)),
        [r"^mask_o must be boolean", r"mask_o\[0, 0\] = 2"],
    ),
    "entk mask_u shape": (
        lambda m: ldjax.entk(m["ft"], m["pt"], m["to"], m["tu"], mask_u=np.ones((2, 6), bool)),
        [r"^mask_u has shape \(2, 6\); expected \(2, 7\)"],
    ),
    # ---- DPO family: the pair, its batch sizes, β and the other hyper-parameters, π_ref
    "dpo x_u not a pair": (
        lambda m: _dpo(m, x_u=m["tu"]),
        [r"^x_u must be a pair \(x⁺, x⁻\) for loss dpo", "got 1 batch"],
    ),
    "actual_step dpo x_u not a pair": (
        lambda m: ldjax.actual_step(
            m["ft"], m["pt"], m["to"], m["tu"], losses.dpo, eta=0.1, loss_kwargs=m["pair"]
        ),
        [r"^x_u must be a pair \(x⁺, x⁻\) for loss dpo"],
    ),
    "sft x_u a pair": (
        lambda m: ldjax.decompose(
            m["f"],
            m["p"],
            m["xo"],
            (m["xu"], m["xu"]),
            losses.sft,
            eta=0.1,
            loss_kwargs=dict(targets=m["y"]),
        ),
        [r"^x_u gives 2 batch\(es\) but loss sft takes 1"],
    ),
    "dpo x⁺ x⁻ batch sizes": (
        lambda m: _dpo(m, x_u=(m["tu"], jnp.concatenate([m["tu"], m["tu"][:1]]))),
        [r"^logits of x_u\[1\] has batch size 3 but logits of x_u\[0\] has 2"],
    ),
    "dpo beta 0": (lambda m: _dpo(m, beta=0.0), [r"^beta of dpo must be > 0", "got 0.0"]),
    "dpo beta < 0": (lambda m: _pair_G(m, beta=-0.5), [r"^beta of dpo must be > 0", r"-0\.5"]),
    "ipo beta NaN": (
        lambda m: _pair_G(m, loss=losses.ipo, beta=math.nan),
        [r"^beta of ipo must be finite", "nan"],
    ),
    "dpo beta a string": (
        lambda m: _pair_G(m, beta="0.1"),
        [r"^beta of dpo must be a real number"],
    ),
    "dpo beta an array": (
        lambda m: _pair_G(m, beta=jnp.array([0.1, 0.2])),
        [r"^beta of dpo must be a scalar", r"\(2,\)"],
    ),
    "sppo c <= 0": (lambda m: _pair_G(m, loss=losses.sppo, c=0.0), [r"^c of sppo must be > 0"]),
    "slic lam < 0": (
        lambda m: _pair_G(m, loss=losses.slic, lam=-1.0),
        [r"^lam of slic must be >= 0", r"-1\.0"],
    ),
    "slic delta Inf": (
        lambda m: _pair_G(m, loss=losses.slic, delta=math.inf),
        [r"^delta of slic must be finite"],
    ),
    "slic given beta": (
        lambda m: _pair_G(m, loss=losses.slic, beta=0.1),
        [r"^loss_kwargs has beta, which loss slic does not take"],
    ),
    "dpo ref NaN": (
        lambda m: _dpo(m, ref_logp_pos=jnp.array([-1.0, jnp.nan])),
        [r"^ref_logp_pos contains 1 non-finite", r"index \(1,\)", "nan"],
    ),
    "dpo ref shape": (
        lambda m: _pair_G(m, ref_logp_neg=jnp.zeros(3)),
        [r"^ref_logp_neg has shape \(3,\); expected \(2,\)"],
    ),
    "dpo ref missing": (
        lambda m: _dpo(m, ref_logp_pos=None),
        [r"^ref_logp_pos is required"],
    ),
    # ---- 3. non-finite inputs, params and logits
    "entk NaN in x_o": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"].at[2, 5].set(jnp.nan), m["xu"]),
        [r"^x_o contains 1 non-finite", r"index \(2, 5\)", "nan"],
    ),
    "entk Inf in x_u": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"], m["xu"].at[1, 0].set(jnp.inf)),
        [r"^x_u contains 1 non-finite", r"index \(1, 0\)", "inf"],
    ),
    "entk NaN in params": (
        lambda m: ldjax.entk(m["f"], _nan_at(m["p"], ("dense_1", "kernel"), (3, 4)), m["xo"]),
        [r"^params\['dense_1'\]\['kernel'\] contains 1 non-finite", r"\(3, 4\)"],
    ),
    "entk out-of-vocabulary token": (
        lambda m: ldjax.entk(m["fe"], m["pe"], m["te"], m["te"].at[1].set(VT + 7)),
        [r"^K has non-finite values", r"logits of x_u are non-finite in example\(s\) \[1\]", "20"],
    ),
    "entk_vp NaN in params": (
        lambda m: ldjax.entk_vp(
            m["f"], _nan_at(m["p"], ("dense_0", "bias"), 2), m["xo"], m["xu"], jnp.ones((2, V))
        ),
        [r"^params\['dense_0'\]\['bias'\] contains 1 non-finite", r"\(2,\)"],
    ),
    "entk_vp out-of-vocabulary token": (
        lambda m: ldjax.entk_vp(m["fe"], m["pe"], m["te"], m["te"].at[0].set(VT), jnp.ones((3, V))),
        [r"^K·v contains", r"x_u in \[5, 13\]"],
    ),
    "decompose out-of-vocabulary token": (
        lambda m: ldjax.decompose(
            m["fe"],
            m["pe"],
            m["te"],
            m["te"].at[2].set(99),
            losses.sft,
            eta=0.1,
            loss_kwargs=dict(targets=jnp.array([0, 1, 2])),
        ),
        [r"^logits of x_u\[0\] contains 5 non-finite", r"x_u\[0\] in \[1, 99\]"],
    ),
    "decompose Inf in x_u": (
        lambda m: (
            _sft(m, targets=m["y"])
            if False
            else ldjax.decompose(
                m["f"],
                m["p"],
                m["xo"],
                m["xu"].at[0, 1].set(jnp.inf),
                losses.sft,
                eta=0.1,
                loss_kwargs=dict(targets=m["y"]),
            )
        ),
        [r"x_u\[0\]", r"\(0, 1\)", "inf"],
    ),
    "decompose NaN in params": (
        lambda m: ldjax.decompose(
            m["f"],
            _nan_at(m["p"], ("dense_2", "bias"), 1),
            m["xo"],
            m["xu"],
            losses.sft,
            eta=0.1,
            loss_kwargs=dict(targets=m["y"]),
        ),
        [r"^logits of x_o contains", r"params\['dense_2'\]\['bias'\]", r"\(1,\)"],
    ),
    "actual_step NaN in x_o": (
        lambda m: ldjax.actual_step(
            m["f"],
            m["p"],
            m["xo"].at[0, 0].set(jnp.nan),
            m["xu"],
            losses.sft,
            eta=0.1,
            loss_kwargs=dict(targets=m["y"]),
        ),
        [r"^x_o contains 1 non-finite", r"\(0, 0\)"],
    ),
    "G NaN logits": (
        lambda m: ldjax.G(losses.sft, Z.at[1, 3].set(jnp.nan), targets=m["y"]),
        [r"^logits\[0\] contains 1 non-finite", r"\(1, 3\)"],
    ),
    "loss Inf logits": (
        lambda m: losses.sft(Z.at[0, 0].set(-jnp.inf), m["y"]),
        [r"^logits contains 1 non-finite", r"\(0, 0\)", "-inf"],
    ),
    # ---- 4. integer params and other dtypes
    "decompose integer params": (
        lambda m: ldjax.decompose(
            m["f"],
            jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), m["p"]),
            m["xo"],
            m["xu"],
            losses.sft,
            eta=0.1,
            loss_kwargs=dict(targets=m["y"]),
        ),
        [r"^params must be floating point", r"params\['dense_0'\]\['bias'\] has dtype int32"],
    ),
    "entk integer params": (
        lambda m: ldjax.entk(
            m["f"], jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), m["p"]), m["xo"]
        ),
        [r"^params must be floating point", "int32"],
    ),
    "entk_vp integer params": (
        lambda m: ldjax.entk_vp(
            m["f"],
            jax.tree_util.tree_map(lambda a: a.astype(jnp.int8), m["p"]),
            m["xo"],
            m["xu"],
            jnp.ones((2, V)),
        ),
        [r"^params must be floating point", "int8"],
    ),
    "actual_step integer params": (
        lambda m: ldjax.actual_step(
            m["f"],
            jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), m["p"]),
            m["xo"],
            m["xu"],
            losses.sft,
            eta=0.1,
            loss_kwargs=dict(targets=m["y"]),
        ),
        [r"^params must be floating point"],
    ),
    "integer logits": (
        lambda m: ldjax.entk(
            lambda p, x: (x @ p).astype(jnp.int32), jnp.ones((2, 3)), m["xo"][:, :2]
        ),
        [r"returned logits of dtype int32", "x_o"],
    ),
    "loss integer logits": (
        lambda m: losses.sft(jnp.zeros((2, V), jnp.int32), m["y"]),
        [r"^logits must be floating point logits, got dtype int32"],
    ),
    "loss logits 1-D": (
        lambda m: losses.sft(jnp.zeros((V,)), m["y"]),
        [r"^logits has shape \(5,\); expected logits \(N, V\) or \(N, T, V\)"],
    ),
    # ---- memory_budget's type and value
    "memory_budget '1GB'": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"], memory_budget="1GB"),
        [r"^memory_budget must be a number of bytes", "'1GB'"],
    ),
    "memory_budget NaN": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"], memory_budget=math.nan),
        [r"^memory_budget must be a finite number of bytes", "nan"],
    ),
    "memory_budget 0": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"], memory_budget=0),
        [r"^memory_budget must be a finite number of bytes >= 1, got 0"],
    ),
    "memory_budget True": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"], memory_budget=True),
        [r"^memory_budget must be a number of bytes", "True"],
    ),
    "out in a missing folder": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"], out="/nonexistent/dir/K.npy"),
        [r"^out: the folder /nonexistent/dir does not exist"],
    ),
    # ---- shapes, batches and names
    "entk_vp v shape": (
        lambda m: ldjax.entk_vp(m["f"], m["p"], m["xo"], m["xu"], jnp.zeros((3, V))),
        [r"^v has shape \(3, 5\); expected \(2, 5\)"],
    ),
    "entk_vp v NaN": (
        lambda m: ldjax.entk_vp(
            m["f"], m["p"], m["xo"], m["xu"], jnp.zeros((2, V)).at[1, 1].set(jnp.nan)
        ),
        [r"^v contains 1 non-finite", r"\(1, 1\)"],
    ),
    "x_o empty batch": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"][:0]),
        [r"^x_o has batch size 0"],
    ),
    "x_o does not fit params": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"][:, :9]),
        [r"^params do not fit apply_fn on x_o", r"\(3, 9\)"],
    ),
    "reduction name": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"], reduction="mean"),
        [r"^reduction must be one of", "'mean'"],
    ),
    "implementation name": (
        lambda m: ldjax.entk(m["f"], m["p"], m["xo"], implementation="fast"),
        [r"^implementation must be one of", "'fast'"],
    ),
    "entk_cost mask shape": (
        lambda m: ldjax.entk_cost(m["ft"], m["pt"], m["to"], mask_o=np.ones((2, 3), bool)),
        [r"^mask_o has shape \(2, 3\)"],
    ),
    "apply_fn returns a tuple": (
        lambda m: ldjax.entk(lambda p, x: (m["f"](p, x), x), m["p"], m["xo"]),
        [r"^apply_fn must return one logits array, got tuple on x_o"],
    ),
    "x_u leaves disagree on the batch": (
        lambda m: ldjax.entk_vp(
            lambda p, x: m["f"](p, x[0]),
            m["p"],
            (m["xo"], m["xo"]),
            (m["xu"], m["xo"]),
            jnp.zeros((2, V)),
        ),
        [r"^x_u: leaves disagree on the batch size: \[2, 3\]"],
    ),
    "G without logits": (lambda m: ldjax.G(losses.sft, targets=m["y"]), [r"^G needs at least one"]),
    "G pair loss given one logits": (
        lambda m: ldjax.G(losses.dpo, ZS, **m["pair"]),
        [r"^logits must be a pair \(z⁺, z⁻\) for loss dpo", r"got 1 array"],
    ),
    "custom loss: target out of range": (
        lambda m: ldjax.decompose(
            m["f"],
            m["p"],
            m["xo"],
            m["xu"],
            lambda z, targets: losses.sft(z, targets) * 2,
            eta=0.1,
            loss_kwargs=dict(targets=jnp.array([7, 0])),
        ),
        [r"^targets\[0\] = 7 is out of range \[0, 5\)"],
    ),
    "custom loss: NaN keyword": (
        lambda m: ldjax.decompose(
            m["f"],
            m["p"],
            m["xo"],
            m["xu"],
            lambda z, targets, w: losses.sft(z, targets) * w,
            eta=0.1,
            loss_kwargs=dict(targets=m["y"], w=jnp.array([1.0, jnp.nan])),
        ),
        [r"^w contains 1 non-finite", r"\(1,\)"],
    ),
    "partial of dpo: beta 0": (
        lambda m: ldjax.G(functools.partial(losses.dpo, beta=0.0), ZS, ZS, **m["pair"]),
        [r"^beta of dpo must be > 0"],
    ),
    "eta NaN": (
        lambda m: ldjax.decompose(
            m["f"],
            m["p"],
            m["xo"],
            m["xu"],
            losses.sft,
            eta=math.nan,
            loss_kwargs=dict(targets=m["y"]),
        ),
        [r"^eta must be > 0", "nan"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_a_named_value_error(m, case):
    call, patterns = CASES[case]
    with pytest.raises(ValueError) as info:
        call(m)
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{case}: {pat!r} not in {msg!r}"


def test_traced_loss_checks_shapes_at_trace_time_and_values_when_concrete(m):
    """Inside jit the loss sees tracers: shapes and dtypes are checked at trace time (the same
    ValueError), values cannot be and are left to the entry points."""
    f = jax.jit(losses.sft)
    with pytest.raises(ValueError, match=r"^targets has shape \(1,\); expected \(2,\)"):
        f(Z, jnp.array([4]))
    with pytest.raises(ValueError, match=r"^targets must hold integer class indices"):
        f(Z, jnp.array([4.7, 9.2]))
    g = jax.jit(lambda b: losses.dpo(ZS, ZS, **{**m["pair"], "beta": b}))
    assert np.isfinite(float(g(0.5)[0]))  # a traced β is a scalar: fine
    with pytest.raises(ValueError, match=r"^beta of dpo must be a scalar"):
        g(jnp.array([0.1, 0.2]))
    # concrete values inside the same loss: the value checks run
    with pytest.raises(ValueError, match=r"^beta of dpo must be > 0"):
        jax.jit(lambda z: losses.dpo(z, z, **m["pair"], beta=-1.0))(ZS)


def test_valid_calls_still_give_the_closed_forms(m):
    """The checks do not reject what is right: sft = −log π(y), G = π − e_y, and a DPO pair at the
    reference gives log 2 per pair."""
    z = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    np.testing.assert_allclose(losses.sft(z, jnp.array([1, 2])), -np.log([0.25, 0.5]), rtol=1e-6)
    g = ldjax.G(losses.sft, z, targets=np.array([1, 2], np.int64))
    np.testing.assert_allclose(g, np.exp(z) - np.eye(3)[[1, 2]], atol=1e-6)
    ref = losses.sequence_logprob(ZS, m["ys"], jnp.ones((2, T), bool))
    kw = {**m["pair"], "ref_logp_pos": ref, "ref_logp_neg": ref}
    kw["targets_neg"] = m["ys"]
    np.testing.assert_allclose(losses.dpo(ZS, ZS, **kw), [np.log(2)] * 2, rtol=1e-6)


# ----------------------------------------------------------------------------- memory


def _linear(v):
    return lambda p, x: x @ p["w"] + p["b"], {"w": jnp.ones((3, v)), "b": jnp.zeros(v)}


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with 1 MiB of memory available (so the sizes below are machine-independent)."""
    monkeypatch.setattr(validate, "available_memory", lambda: {"host": 2**20, "device": 2**20})
    monkeypatch.setattr(validate, "MEMORY_CHECKED_FROM", 0)
    if jax.devices()[0].platform != "cpu":
        pytest.skip("the host-memory figures below are for the CPU backend")


def test_a_K_too_large_fails_before_allocating_with_its_size_and_what_would_fit(small_machine):
    f, p = _linear(40)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 3)), jnp.float32)
    with pytest.raises(ValueError) as info:  # (12, 12, 40, 40) float32 = 0.9 MiB, twice chunked
        ldjax.entk(f, p, x, memory_budget=2**14)
    msg = str(info.value)
    assert msg.startswith("entk: K (12, 12, 40, 40) float32 (900.0 KiB)"), msg
    assert "more than the 1.0 MiB of memory available" in msg
    assert "reduction='diagonal' (12, 12, 40) (22.5 KiB)" in msg
    assert "one pair gives 6.2 KiB" in msg
    assert "out='K.npy'" in msg
    # the diagonal fits
    d = ldjax.entk(f, p, x, reduction="diagonal")
    np.testing.assert_allclose(
        d,
        np.broadcast_to((np.asarray(x) @ np.asarray(x).T + 1)[..., None], (12, 12, 40)),
        rtol=1e-5,
    )


def test_the_issue_case_per_token_K_of_16_GiB_fails_at_once(monkeypatch):
    """V = 256, T = 128, N = 2: the per-token full K is one 16 GiB array."""
    monkeypatch.setattr(validate, "available_memory", lambda: {"host": 8 * 2**30, "device": None})
    if jax.devices()[0].platform != "cpu":
        pytest.skip("host memory figure")
    from ldjax import zoo

    kw = dict(vocab=256, d_model=8, n_heads=2, n_layers=1, max_len=128)
    p = jax.eval_shape(lambda k: zoo.transformer_init(k, **kw), jax.random.PRNGKey(0))
    p = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), p)
    x = jnp.zeros((2, 128), jnp.int32)
    f = lambda p, x: zoo.transformer_apply(p, x, n_heads=2)
    with pytest.raises(ValueError) as info:
        ldjax.entk(f, p, x)
    msg = str(info.value)
    assert "K (2, 2, 128, 128, 256, 256) float32 (16.0 GiB)" in msg, msg
    assert "8.0 GiB of memory available" in msg
    assert "last_position_mask, gives 1.0 MiB" in msg


def _per_position_mlp():
    """A cheap sequence model: ``z[n, t] = tanh(x[n, t] W₁) W₂``, x ``(3, 4, 6)``, V 5."""
    rng = np.random.default_rng(2)
    p = {"w1": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) / 2}
    p["w2"] = jnp.asarray(rng.normal(size=(8, V)), jnp.float32) / 2
    x = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
    return lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"], p, x


@pytest.mark.parametrize(
    "model,kw",
    [
        ("mlp", dict(implementation="structured")),
        ("mlp", dict(implementation="vp", reduction="diagonal")),
        ("seq", dict(implementation="structured", symmetric=True)),
        ("seq", dict(implementation="jacobian", reduction="trace", masks=True)),
    ],
)
def test_K_streamed_to_disk_equals_K_in_memory(tmp_path, model, kw):
    if model == "mlp":
        f, p, xo, xu = small_model(model, jnp.float32)
    else:
        f, p, xo = _per_position_mlp()
        xu = xo[:2] * 0.5
    kw = dict(kw)
    if kw.pop("symmetric", False):
        xu = None
    if kw.pop("masks", False):
        mask = np.ones((3, 4), bool)
        mask[0, :2] = False
        kw.update(mask_o=mask, mask_u=mask[1:])
    want = np.asarray(ldjax.entk(f, p, xo, xu, **kw))
    path = tmp_path / "K.npy"
    got = ldjax.entk(f, p, xo, xu, out=path, memory_budget=2000, **kw)  # many small blocks
    assert isinstance(got, np.memmap) and not got.flags.writeable
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.load(path), got)


def test_K_streamed_to_disk_when_it_does_not_fit_in_memory(small_machine, tmp_path):
    """With 1 MiB available the 0.9 MiB K (twice that, chunked) fails in memory but streams to
    disk in blocks of <= memory_budget / 2."""
    f, p = _linear(40)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(12, 3)), jnp.float32)
    with pytest.raises(ValueError, match="memory available"):
        ldjax.entk(f, p, x, memory_budget=2**14)
    K = ldjax.entk(f, p, x, memory_budget=2**14, out=tmp_path / "K.npy")
    xn = np.asarray(x, np.float64)
    want = (xn @ xn.T + 1)[:, :, None, None] * np.eye(40)
    np.testing.assert_allclose(K, want, rtol=1e-5, atol=1e-5)


def test_a_non_finite_K_streamed_to_disk_raises_and_leaves_no_file(m, tmp_path):
    path = tmp_path / "K.npy"
    bad = m["te"].at[2].set(VT + 1)
    with pytest.raises(ValueError, match=r"^K has non-finite values.*example\(s\) \[2\]"):
        ldjax.entk(m["fe"], m["pe"], m["te"], bad, out=path, memory_budget=500)
    assert not path.exists()
