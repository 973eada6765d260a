"""A small decoder-only transformer LM (flax linen), as pure functions of ``params``.

The logit network of the paper, z = h_θ(χ) ∈ R^{T×V}: for tokens χ of shape ``(N, T)`` it returns
logits ``(N, T, V)``; logits at position t give π(· | χ_{≤t}), i.e. they predict token t+1
(teacher forcing; see :func:`ldjax.data.preferences.encode_example`).

Architecture (GPT-2 style, no dropout so the network is a deterministic function of θ):
learned token + position embeddings; ``n_layers`` pre-LayerNorm blocks, each
``x + Attn(LN(x))`` then ``x + MLP(LN(x))``; causal multi-head self-attention with four separate
``Dense`` projections (``query``, ``key``, ``value``, ``out``: plain ``(d_model, d_model)`` kernels
plus biases, so their Jacobians are Dense-structured); MLP ``Dense(d_ff) -> GELU (tanh approx.)
-> Dense(d_model)``; a final LayerNorm; an untied output ``Dense(V)`` (``lm_head``).

Padding and masking
-------------------
* Right padding (what :mod:`ldjax.data.preferences` produces) needs no attention mask: under
  the causal mask a real token never attends to a later PAD, so the logits of every real position
  are exactly those of the unpadded sequence. Logits *at* PAD positions are meaningless and must
  be dropped by the loss mask.
* Left padding (batched generation) is expressed with ``positions``: an ``(N, T)`` int array giving
  each token's position in its own sequence, with ``-1`` marking padding. Keys at padded slots are
  masked out for every query (each slot also always sees itself, so no softmax row is empty),
  and real tokens get position embeddings ``0, 1, ...``. Logits at real positions then match
  the unpadded computation (up to float rounding).
* PAD *token ids* are never inspected: only ``positions`` decides what is padding.

Masked scores are set to the dtype's most negative finite value, so their softmax weights are
exactly 0 and changing a future token never changes earlier logits, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "LMConfig",
    "TransformerLM",
    "init_params",
    "make_apply_fn",
    "init_cache",
    "count_params",
]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Shape of :class:`TransformerLM`. Frozen (hashable), so it can be a static jit argument.

    Attributes:
      vocab_size: V (259 for :class:`ldjax.lm.tokenizer.ByteTokenizer`).
      d_model: residual width; must be divisible by ``n_heads``.
      n_heads: attention heads.
      n_layers: transformer blocks.
      d_ff: MLP hidden width.
      max_len: number of learned positions (longest sequence).
      dtype: dtype of parameters and computation.
      init_std: std of the normal initialiser (GPT-2: 0.02); residual output projections
        (``attn/out``, ``mlp/fc_out``) use ``init_std / sqrt(2 n_layers)``.
      ln_eps: LayerNorm epsilon.
    """

    vocab_size: int = 259
    d_model: int = 128
    n_heads: int = 2
    n_layers: int = 2
    d_ff: int = 512
    max_len: int = 256
    dtype: Any = jnp.float32
    init_std: float = 0.02
    ln_eps: float = 1e-5

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LMConfig.{f} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LMConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _dense(features: int, std: float, dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head attention with separate q, k, v, o projections and an optional KV cache."""

    config: LMConfig

    @nn.compact
    def __call__(self, x, mask, cache=None, cache_index=None):
        """x: (N, C, D); mask: (N, C, S) bool, True where query c may attend key slot s.

        Without ``cache`` S == C (keys are this chunk). With ``cache`` = {'k','v': (N, H, S, Dh)}
        this chunk's keys/values are written at slots ``cache_index .. cache_index+C-1`` and the
        queries attend all S slots (under ``mask``). Returns (N, C, D) and the new cache (or None).
        """
        cfg = self.config
        n, c, d = x.shape
        h, dh = cfg.n_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        # heads-major layout (N, H, C, Dh): the cache is then used without any transpose.
        split = lambda t: t.reshape(n, c, h, dh).transpose(0, 2, 1, 3)
        q = split(_dense(d, cfg.init_std, cfg.dtype, "query")(x))
        k = split(_dense(d, cfg.init_std, cfg.dtype, "key")(x))
        v = split(_dense(d, cfg.init_std, cfg.dtype, "value")(x))
        new_cache = None
        if cache is not None:
            k = jax.lax.dynamic_update_slice(
                cache["k"], k.astype(cache["k"].dtype), (0, 0, cache_index, 0)
            )
            v = jax.lax.dynamic_update_slice(
                cache["v"], v.astype(cache["v"].dtype), (0, 0, cache_index, 0)
            )
            new_cache = {"k": k, "v": v}
        scores = jnp.einsum("nhqd,nhkd->nhqk", q, k) / jnp.sqrt(jnp.asarray(dh, q.dtype))
        scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("nhqk,nhkd->nhqd", weights, v).transpose(0, 2, 1, 3).reshape(n, c, d)
        return _dense(d, out_std, cfg.dtype, "out")(y), new_cache


class MLP(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        x = _dense(cfg.d_ff, cfg.init_std, cfg.dtype, "fc_in")(x)
        x = nn.gelu(x, approximate=True)
        return _dense(cfg.d_model, out_std, cfg.dtype, "fc_out")(x)


class Block(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x, mask, cache=None, cache_index=None):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(
            epsilon=cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name
        )
        a, new_cache = CausalSelfAttention(cfg, name="attn")(
            ln("ln_1")(x), mask, cache, cache_index
        )
        x = x + a
        x = x + MLP(cfg, name="mlp")(ln("ln_2")(x))
        return x, new_cache


class TransformerLM(nn.Module):
    """Decoder-only LM. ``__call__(tokens (N, C), positions=None, cache=None, cache_index=None)``.

    Without ``cache``: returns logits (N, C, V).
    With ``cache`` (from :func:`init_cache`): the C tokens occupy cache slots
    ``cache_index .. cache_index+C-1``; returns ``(logits (N, C, V), new_cache)``.

    ``positions`` (N, C) int: position of each token in its sequence, ``-1`` = padding (masked
    as a key everywhere). Default: ``arange(C)`` (plus ``cache_index`` with a cache).
    """

    config: LMConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, cache_index=None):
        cfg = self.config
        n, c = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (n, c))
        positions = jnp.asarray(positions, jnp.int32)
        valid = positions >= 0  # (N, C)
        embed = lambda num, name: nn.Embed(
            num,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.dtype,
            embedding_init=nn.initializers.normal(cfg.init_std),
            name=name,
        )
        x = embed(cfg.vocab_size, "tok_embed")(tokens) + embed(cfg.max_len, "pos_embed")(
            jnp.maximum(positions, 0)
        )

        if cache is None:
            q_slot = jnp.arange(c)
            k_slot = q_slot
            key_valid = valid
        else:
            q_slot = cache_index + jnp.arange(c)
            k_slot = jnp.arange(cache["valid"].shape[1])
            key_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, cache_index))
        causal = k_slot[None, :] <= q_slot[:, None]  # (C, S)
        itself = k_slot[None, :] == q_slot[:, None]
        mask = (causal[None] & key_valid[:, None, :]) | itself[None]  # (N, C, S)

        new_layers = []
        for i in range(cfg.n_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            x, lc = Block(cfg, name=f"block_{i}")(x, mask, layer_cache, cache_index)
            new_layers.append(lc)
        x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.dtype, name="ln_f")(x)
        logits = _dense(cfg.vocab_size, cfg.init_std, cfg.dtype, "lm_head")(x)
        if cache is None:
            return logits
        return logits, {"valid": key_valid, "layers": tuple(new_layers)}


def init_cache(config: LMConfig, batch: int, slots: int) -> dict:
    """Empty KV cache for :class:`TransformerLM`: ``{'valid': (N, S) bool, 'layers': (
    {'k': (N, H, S, Dh), 'v': (N, H, S, Dh)}, ...)}`` with all slots invalid."""
    shape = (batch, config.n_heads, slots, config.head_dim)
    layer = lambda: {"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}
    return {
        "valid": jnp.zeros((batch, slots), bool),
        "layers": tuple(layer() for _ in range(config.n_layers)),
    }


def _leaf_init(path: tuple, config: LMConfig):
    """(kind, std) of the initialiser the modules declare for the leaf at ``path``."""
    name = path[-1]
    if name == "bias":
        return "zeros", 0.0
    if name == "scale":
        return "ones", 0.0
    if path[-2:] in (("out", "kernel"), ("fc_out", "kernel")):
        return "normal", config.init_std / math.sqrt(2 * config.n_layers)
    if name in ("kernel", "embedding"):
        return "normal", config.init_std
    raise ValueError(f"no initialiser rule for parameter {'/'.join(path)}")  # pragma: no cover


def init_params(config: LMConfig, key: jax.Array) -> dict:
    """Random parameters θ (the flax ``'params'`` collection) for ``config``.

    Same tree and same distributions as ``TransformerLM(config).init(key, tokens)['params']``
    (normal(init_std) kernels and embeddings, residual output kernels scaled by
    1/sqrt(2 n_layers), zero biases, unit LayerNorm scales), but all random leaves come from
    ONE normal draw: XLA then compiles one RNG op instead of one per leaf, which is several
    times faster on CPU. Deterministic in ``key``.
    """
    model = TransformerLM(config)
    dummy = jnp.zeros((1, min(8, config.max_len)), jnp.int32)
    shapes = jax.eval_shape(lambda k: model.init(k, dummy)["params"], key)
    flat = flax.traverse_util.flatten_dict(shapes)
    paths = sorted(flat)
    rules = {p: _leaf_init(p, config) for p in paths}
    sizes = [flat[p].size if rules[p][0] == "normal" else 0 for p in paths]

    @jax.jit
    def build(key):
        z = jax.random.normal(key, (sum(sizes),), config.dtype)
        out, offset = {}, 0
        for p, size in zip(paths, sizes):
            kind, std = rules[p]
            shape, dtype = flat[p].shape, flat[p].dtype
            if kind == "normal":
                out[p] = (std * z[offset : offset + size]).reshape(shape).astype(dtype)
                offset += size
            else:
                out[p] = (jnp.zeros if kind == "zeros" else jnp.ones)(shape, dtype)
        return flax.traverse_util.unflatten_dict(out)

    return build(key)


@functools.lru_cache(maxsize=32)
def _jitted_forward(config: LMConfig) -> Callable:
    # jit inside: eager callers get one compiled program instead of op-by-op dispatch, shared by
    # every apply_fn of this config; under outer transformations (jit, vmap, jacrev, ...) the
    # inner jit is transparent.
    model = TransformerLM(config)
    return jax.jit(
        lambda params, tokens, positions: model.apply({"params": params}, tokens, positions)
    )


def make_apply_fn(config: LMConfig) -> Callable:
    """Pure logit function ``apply_fn(params, tokens, positions=None) -> logits``.

    ``tokens``: ``(N, T)`` int (or ``(T,)``, giving ``(T, V)``), T <= ``config.max_len``;
    ``positions``: optional ``(N, T)`` int, ``-1`` marks (left) padding; see the module docstring.
    Returns ``(N, T, V)`` logits z; ``z[:, t]`` predicts ``tokens[:, t+1]``.
    """
    forward = _jitted_forward(config)

    def apply_fn(params, tokens, positions: jax.Array | None = None):
        tokens = jnp.asarray(tokens)
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        single = tokens.ndim == 1
        if single:
            tokens = tokens[None]
            positions = None if positions is None else jnp.asarray(positions)[None]
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (N, T) or (T,), got {tokens.shape}")
        if positions is None and tokens.shape[1] > config.max_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds LMConfig.max_len={config.max_len}"
            )
        if positions is not None and jnp.shape(positions) != tokens.shape:
            raise ValueError(
                f"positions shape {jnp.shape(positions)} != tokens shape {tokens.shape}"
            )
        logits = forward(params, tokens, positions)
        return logits[0] if single else logits

    apply_fn.config = config
    return apply_fn


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
