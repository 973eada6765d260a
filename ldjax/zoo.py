"""Reference model zoo: small pure-JAX architectures used by the paper's experiments.

Everything here uses only ``jax``, ``jax.numpy`` and ``jax.lax`` (no flax), and runs identically
under jax 0.4.25 (the neural-tangents peer venv, ``tests/golden``) and current jax. Each model is a
pair ``*_init(key, ...) -> params`` / ``*_apply(params, x) -> logits`` with ``params`` a nested dict
of arrays, so the same parameters can be fed to ``ldjax.entk`` and to ``neural_tangents``.

Models
------
* ``mlp``: ``x (N, D_in) -> z (N, V)``, tanh hidden layers.
* ``lenet``: the paper's MNIST LeNet, ``x (N, 28, 28, 1)`` NHWC ``-> z (N, 10)``.
* ``transformer``: decoder-only pre-LN causal transformer, ``tokens (N, T) -> z (N, T, V)``.

Every non-linearity is smooth (tanh, tanh-approximate GELU written out, softmax, LayerNorm), so
float64 finite differences of ``z`` w.r.t. ``theta`` are well behaved.

``save_npz`` / ``load_npz`` store nested-dict params next to plain arrays in one ``.npz`` using
numpy only (keys ``'params/<a>/<b>/...'``), so the two venvs can exchange models and inputs.

This module deliberately does not import anything else from ``ldjax``: the peer venv loads it by
path (``importlib.util.spec_from_file_location``) without touching ``ldjax/__init__.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "mlp_init",
    "mlp_apply",
    "lenet_init",
    "lenet_apply",
    "transformer_init",
    "transformer_apply",
    "gelu_tanh",
    "layer_norm",
    "save_npz",
    "load_npz",
]

Params = dict[str, Any]

_PARAMS_PREFIX = "params/"


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _lecun_normal(key, shape, fan_in, dtype):
    """``N(0, 1/fan_in)`` samples of ``shape`` (LeCun normal, untruncated)."""
    return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)


def _dense_init(key, d_in, d_out, dtype):
    """``{'kernel': (d_in, d_out), 'bias': (d_out,)}``; LeCun-normal kernel, zero bias."""
    return {
        "kernel": _lecun_normal(key, (d_in, d_out), d_in, dtype),
        "bias": jnp.zeros((d_out,), dtype),
    }


def _dense(p, x):
    """``x (..., d_in) @ kernel (d_in, d_out) + bias (d_out,) -> (..., d_out)``."""
    return jnp.matmul(x, p["kernel"]) + p["bias"]


def _ln_init(d, dtype):
    return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}


def layer_norm(p, x, eps=1e-5):
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``,
    ``x (..., d)``."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def gelu_tanh(x):
    """GELU, tanh approximation written out: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * (x * x * x))))


def _softmax(s, axis=-1):
    """Numerically stable softmax written out (same graph in every jax version)."""
    s = s - lax.stop_gradient(jnp.max(s, axis=axis, keepdims=True))
    e = jnp.exp(s)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _check_ndim(name, x, ndim, what):
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{name}: expected {what}, got array of shape {tuple(jnp.shape(x))}")


# ----------------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------------


def mlp_init(key, sizes: Sequence[int] = (784, 512, 512, 10), dtype=jnp.float32) -> Params:
    """MLP params ``{'dense_k': {'kernel': (sizes[k], sizes[k+1]), 'bias': (sizes[k+1],)}}``.

    Kernels are LeCun normal ``N(0, 1/fan_in)``, biases zero.
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ValueError(f"mlp_init: sizes must hold >= 2 positive ints, got {sizes}")
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense_{k}": _dense_init(keys[k], sizes[k], sizes[k + 1], dtype)
        for k in range(len(sizes) - 1)
    }


def mlp_apply(params: Params, x) -> jnp.ndarray:
    """MLP logits ``z = W_L tanh(... tanh(W_1 x + b_1) ...) + b_L``.

    Args:
      params: from :func:`mlp_init`.
      x: ``(N, D_in)`` inputs.
    Returns:
      ``z``: ``(N, V)`` logits.
    """
    n_layers = len(params)
    _check_ndim("mlp_apply", x, 2, "x of shape (N, D_in)")
    d_in = params["dense_0"]["kernel"].shape[0]
    if x.shape[-1] != d_in:
        raise ValueError(f"mlp_apply: x has {x.shape[-1]} features, dense_0 expects {d_in}")
    h = x
    for k in range(n_layers):
        h = _dense(params[f"dense_{k}"], h)
        if k < n_layers - 1:
            h = jnp.tanh(h)
    return h


# ----------------------------------------------------------------------------------------------
# LeNet (paper's MNIST model)
# ----------------------------------------------------------------------------------------------

_LENET_DN = ("NHWC", "HWIO", "NHWC")


def lenet_init(key, dtype=jnp.float32) -> Params:
    """LeNet params.

    ``conv_0``: kernel ``(5, 5, 1, 6)``, bias ``(6,)``; ``conv_1``: kernel ``(5, 5, 6, 16)``, bias
    ``(16,)``; ``dense_0`` ``(400, 60)``, ``dense_1`` ``(60, 42)``, ``dense_2`` ``(42, 10)``.
    """
    k = jax.random.split(key, 5)
    return {
        "conv_0": {
            "kernel": _lecun_normal(k[0], (5, 5, 1, 6), 5 * 5 * 1, dtype),
            "bias": jnp.zeros((6,), dtype),
        },
        "conv_1": {
            "kernel": _lecun_normal(k[1], (5, 5, 6, 16), 5 * 5 * 6, dtype),
            "bias": jnp.zeros((16,), dtype),
        },
        "dense_0": _dense_init(k[2], 400, 60, dtype),
        "dense_1": _dense_init(k[3], 60, 42, dtype),
        "dense_2": _dense_init(k[4], 42, 10, dtype),
    }


def _conv(p, x, padding):
    y = lax.conv_general_dilated(
        x, p["kernel"], window_strides=(1, 1), padding=padding, dimension_numbers=_LENET_DN
    )
    return y + p["bias"]


def _avgpool2(x):
    """2x2 average pool, stride 2, ``(N, H, W, C) -> (N, H/2, W/2, C)`` (H, W even)."""
    n, h, w, c = x.shape
    return jnp.mean(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def lenet_apply(params: Params, x) -> jnp.ndarray:
    """LeNet logits.

    conv 1->6 5x5 SAME, tanh, avgpool 2 -> ``(N, 14, 14, 6)``; conv 6->16 5x5 VALID, tanh,
    avgpool 2 -> ``(N, 5, 5, 16)``; flatten (NHWC order) 400 -> 60 tanh -> 42 tanh -> 10.

    Args:
      params: from :func:`lenet_init`.
      x: ``(N, 28, 28, 1)`` images, NHWC.
    Returns:
      ``z``: ``(N, 10)`` logits.
    """
    _check_ndim("lenet_apply", x, 4, "x of shape (N, 28, 28, 1) (NHWC)")
    if tuple(x.shape[1:]) != (28, 28, 1):
        raise ValueError(f"lenet_apply: expected x of shape (N, 28, 28, 1), got {tuple(x.shape)}")
    h = _avgpool2(jnp.tanh(_conv(params["conv_0"], x, "SAME")))
    h = _avgpool2(jnp.tanh(_conv(params["conv_1"], h, "VALID")))
    h = h.reshape(h.shape[0], -1)
    h = jnp.tanh(_dense(params["dense_0"], h))
    h = jnp.tanh(_dense(params["dense_1"], h))
    return _dense(params["dense_2"], h)


# ----------------------------------------------------------------------------------------------
# Decoder-only transformer
# ----------------------------------------------------------------------------------------------


def transformer_init(
    key,
    vocab: int = 256,
    d_model: int = 128,
    n_heads: int = 4,
    n_layers: int = 2,
    max_len: int = 64,
    d_ff: int | None = None,
    dtype=jnp.float32,
) -> Params:
    """Decoder-only pre-LN transformer params.

    Layout::

      embed      (vocab, d)        token embedding, N(0, 0.02^2)
      pos_embed  (max_len, d)      learned positions, N(0, 0.02^2)
      block_k    {'ln_1': {scale (d,), bias (d,)},
                  'attn': {'query'|'key'|'value'|'out': {kernel (d, d), bias (d,)}},
                  'ln_2': {...},
                  'mlp':  {'fc_1': {kernel (d, d_ff), bias}, 'fc_2': {kernel (d_ff, d), bias}}}
      ln_f       {scale (d,), bias (d,)}
      unembed    {kernel (d, vocab), bias (vocab,)}   (untied)

    ``n_heads`` is not stored in ``params``; pass the same value to :func:`transformer_apply`.
    """
    d_ff = 4 * d_model if d_ff is None else int(d_ff)
    if d_model % n_heads:
        raise ValueError(f"transformer_init: d_model={d_model} not divisible by n_heads={n_heads}")
    keys = jax.random.split(key, 3 + n_layers)
    params: Params = {
        "embed": 0.02 * jax.random.normal(keys[0], (vocab, d_model), dtype),
        "pos_embed": 0.02 * jax.random.normal(keys[1], (max_len, d_model), dtype),
    }
    for layer in range(n_layers):
        kq, kk, kv, ko, k1, k2 = jax.random.split(keys[3 + layer], 6)
        params[f"block_{layer}"] = {
            "ln_1": _ln_init(d_model, dtype),
            "attn": {
                "query": _dense_init(kq, d_model, d_model, dtype),
                "key": _dense_init(kk, d_model, d_model, dtype),
                "value": _dense_init(kv, d_model, d_model, dtype),
                "out": _dense_init(ko, d_model, d_model, dtype),
            },
            "ln_2": _ln_init(d_model, dtype),
            "mlp": {
                "fc_1": _dense_init(k1, d_model, d_ff, dtype),
                "fc_2": _dense_init(k2, d_ff, d_model, dtype),
            },
        }
    params["ln_f"] = _ln_init(d_model, dtype)
    params["unembed"] = _dense_init(keys[2], d_model, vocab, dtype)
    return params


def _causal_self_attention(p, h, n_heads):
    """Multi-head causal self-attention, ``h (N, T, d) -> (N, T, d)``."""
    n, t, d = h.shape
    dh = d // n_heads
    q = _dense(p["query"], h).reshape(n, t, n_heads, dh)
    k = _dense(p["key"], h).reshape(n, t, n_heads, dh)
    v = _dense(p["value"], h).reshape(n, t, n_heads, dh)
    s = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(dh)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
    a = _softmax(s, axis=-1)
    o = jnp.einsum("nhqk,nkhd->nqhd", a, v).reshape(n, t, d)
    return _dense(p["out"], o)


def transformer_apply(params: Params, tokens, n_heads: int = 4) -> jnp.ndarray:
    """Causal LM logits.

    ``h_0 = embed[tokens] + pos_embed[:T]``; per block ``h += attn(ln_1(h))``,
    ``h += fc_2(gelu(fc_1(ln_2(h))))``; ``z = unembed(ln_f(h))``.

    Args:
      params: from :func:`transformer_init`.
      tokens: ``(N, T)`` int token ids in ``[0, vocab)``, ``T <= max_len``. Ids are not checked
        (they may be traced); an out-of-range id yields NaN logits (``jnp.take`` fill mode).
      n_heads: number of attention heads (static; must match the value used at init; default 4
        matches :func:`transformer_init`'s default).
    Returns:
      ``z``: ``(N, T, V)`` logits, ``z[n, t]`` predicts token ``t + 1``.
    """
    _check_ndim("transformer_apply", tokens, 2, "int tokens of shape (N, T)")
    if not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
        raise ValueError(f"transformer_apply: tokens must be integers, got dtype {tokens.dtype}")
    n, t = tokens.shape
    max_len, d = params["pos_embed"].shape
    if t > max_len:
        raise ValueError(f"transformer_apply: sequence length T={t} exceeds max_len={max_len}")
    if d % n_heads:
        raise ValueError(f"transformer_apply: d_model={d} not divisible by n_heads={n_heads}")
    h = jnp.take(params["embed"], tokens, axis=0) + params["pos_embed"][:t]
    n_layers = sum(1 for k in params if k.startswith("block_"))
    for layer in range(n_layers):
        p = params[f"block_{layer}"]
        h = h + _causal_self_attention(p["attn"], layer_norm(p["ln_1"], h), n_heads)
        m = gelu_tanh(_dense(p["mlp"]["fc_1"], layer_norm(p["ln_2"], h)))
        h = h + _dense(p["mlp"]["fc_2"], m)
    return _dense(params["unembed"], layer_norm(params["ln_f"], h))


# ----------------------------------------------------------------------------------------------
# npz exchange (numpy only)
# ----------------------------------------------------------------------------------------------


def _flatten(tree: Mapping, prefix: str, out: dict) -> None:
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"save_npz: params must be nested dicts of arrays; found "
            f"{type(tree).__name__} at '{prefix.rstrip('/')}'"
        )
    if not tree:
        raise ValueError(
            f"save_npz: empty dict at '{prefix.rstrip('/') or 'params'}' cannot be stored"
        )
    for k, v in tree.items():
        if not isinstance(k, str) or not k or "/" in k:
            raise ValueError(
                f"save_npz: params key {k!r} under '{prefix}' must be a non-empty str without '/'"
            )
        if isinstance(v, Mapping):
            _flatten(v, prefix + k + "/", out)
        else:
            out[prefix + k] = np.asarray(v)


def save_npz(path, params: Params, **arrays) -> None:
    """Write ``params`` (nested dict of arrays) and extra named ``arrays`` to one ``.npz``.

    Param leaves are stored under ``'params/<k1>/<k2>/...'``; each extra array under its own name
    (names must not start with ``'params/'``). Strings (e.g. versions) are stored as numpy unicode
    arrays, so no pickling is needed to read them back.
    """
    flat: dict = {}
    _flatten(params, _PARAMS_PREFIX, flat)
    for name, a in arrays.items():
        if name.startswith(_PARAMS_PREFIX) or name == "params":
            raise ValueError(f"save_npz: extra array name {name!r} clashes with the params prefix")
        a = np.asarray(a)
        if a.dtype == object:
            raise ValueError(f"save_npz: array {name!r} has dtype object; store numbers or str")
        flat[name] = a
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "wb") as f:  # file handle: numpy must not append '.npz' to the name
        np.savez(f, **flat)


def load_npz(path) -> tuple[Params, dict[str, np.ndarray]]:
    """Read a file written by :func:`save_npz`.

    Returns:
      ``(params, arrays)``: ``params`` nested dict of numpy arrays, ``arrays`` dict of the extra
      numpy arrays (0-d string arrays are returned as 0-d numpy arrays; use ``str(a)``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_npz: no such file: {path}")
    params: Params = {}
    arrays: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as z:
        for name in z.files:
            a = z[name]
            if name.startswith(_PARAMS_PREFIX):
                parts = name[len(_PARAMS_PREFIX) :].split("/")
                node = params
                for p in parts[:-1]:
                    node = node.setdefault(p, {})
                    if not isinstance(node, dict):
                        raise ValueError(f"load_npz: {path}: key '{name}' conflicts with a leaf")
                if parts[-1] in node:
                    raise ValueError(f"load_npz: {path}: key '{name}' conflicts with a subtree")
                node[parts[-1]] = a
            else:
                arrays[name] = a
    if not params:
        raise ValueError(
            f"load_npz: {path} holds no 'params/...' entries (fields: {sorted(arrays)})"
        )
    return params, arrays
