"""Batched autoregressive decoding with a KV cache (greedy or sampled).

Prompts of different lengths are left-padded to a common width P (rounded up to a multiple of
16 so that few shapes are compiled); padded slots get position -1 and are masked as keys, so each
prompt sees exactly its own tokens at positions ``0 .. L_i-1``. One jitted program runs the
prefill (all P slots in one forward pass, filling the cache) and a ``lax.while_loop`` of one-token
steps that stops when every row has emitted EOS or ``max_new_tokens`` tokens exist.

The greedy y* of the paper ("the response the model would give") is ``generate(...,
temperature=0.0)``.

Speed (default :class:`~ldjax.lm.model.LMConfig`, 100 prompts of 11-120 tokens x 128 new
tokens, 2 shared CPU cores): about 3-4 s greedy after a 4-8 s compile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldjax.lm.model import LMConfig, TransformerLM, init_cache, make_apply_fn

__all__ = ["generate", "left_pad", "naive_greedy_decode"]

_BUCKET = 16


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    """Left-pad token lists. Returns ``tokens (N, P)`` int32 and ``positions (N, P)`` int32,
    positions ``0..L_i-1`` on the real tokens and ``-1`` on padding."""
    lengths = [len(p) for p in prompts]
    width = max(lengths) if width is None else width
    if max(lengths) > width:
        raise ValueError(f"prompt of length {max(lengths)} does not fit width {width}")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for i, p in enumerate(prompts):
        if lengths[i]:
            tokens[i, width - lengths[i] :] = np.asarray(p, np.int32)
            positions[i, width - lengths[i] :] = np.arange(lengths[i])
    return tokens, positions


def _pick(logits, key, greedy: bool, temperature, top_k):
    """logits (N, V) -> token ids (N,). ``temperature`` and ``top_k`` (1..V) are traced values."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    kth = jnp.take(jnp.sort(logits, axis=-1), logits.shape[-1] - top_k, axis=-1)[:, None]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def _generate_padded(
    params,
    tokens,
    positions,
    lengths,
    key,
    temperature,
    top_k,
    eos_id,
    pad_id,
    *,
    config,
    max_new_tokens,
    greedy,
):
    """tokens/positions (N, P) left-padded; lengths (N,). Returns out (N, max_new_tokens)
    with pad_id after EOS (EOS itself kept). ``eos_id`` < 0: no EOS. Only the shapes, the
    config and greedy-vs-sampling are static, so one program serves all other settings."""
    model = TransformerLM(config)
    n, p = tokens.shape
    variables = {"params": params}
    cache = init_cache(config, n, p + max_new_tokens)
    logits, cache = model.apply(variables, tokens, positions, cache=cache, cache_index=0)
    key, sub = jax.random.split(key)
    tok = _pick(logits[:, -1], sub, greedy, temperature, top_k)
    done = tok == eos_id
    out = jnp.full((n, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, prev, done, out, key = state
        # feed the token chosen at step i-1 (position L + i - 1); finished rows feed padding.
        pos = jnp.where(done, -1, lengths + i - 1)[:, None]
        logits, cache = model.apply(
            variables, prev[:, None], pos, cache=cache, cache_index=p + i - 1
        )
        key, sub = jax.random.split(key)
        tok = _pick(logits[:, 0], sub, greedy, temperature, top_k)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(tok)
        done = done | (tok == eos_id)
        return i + 1, cache, tok, done, out, key

    state = (jnp.asarray(1, jnp.int32), cache, tok, done, out, key)
    return jax.lax.while_loop(cond, body, state)[4]


def _as_prompt_lists(prompts, lengths, padding_side) -> list[list[int]]:
    if lengths is None:
        if isinstance(prompts, (np.ndarray, jax.Array)):
            arr = np.asarray(prompts)
            if arr.ndim != 2:
                raise ValueError(f"prompt array must be (N, Tp), got shape {arr.shape}")
            return [list(map(int, row)) for row in arr]
        return [list(map(int, p)) for p in prompts]
    arr = np.asarray(prompts)
    lengths = np.asarray(lengths)
    if arr.ndim != 2 or lengths.shape != (arr.shape[0],):
        raise ValueError(
            f"prompts must be (N, Tp) with lengths (N,), got {arr.shape} and {lengths.shape}"
        )
    if np.any(lengths > arr.shape[1]) or np.any(lengths < 0):
        raise ValueError(f"lengths must lie in [0, {arr.shape[1]}], got {lengths.tolist()}")
    if padding_side == "right":
        return [list(map(int, arr[i, : lengths[i]])) for i in range(len(arr))]
    if padding_side == "left":
        return [list(map(int, arr[i, arr.shape[1] - lengths[i] :])) for i in range(len(arr))]
    raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")


def generate(
    params,
    config: LMConfig,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    lengths: Sequence[int] | None = None,
    padding_side: str = "right",
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    eos_id: int | None = 257,
    pad_id: int = 258,
    include_eos: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens with a KV cache.

    Args:
      params, config: the model (:func:`ldjax.lm.model.init_params`).
      prompts: a list of N token lists (lengths may differ; each >= 1 token — start them with
        BOS as in training, e.g. via :func:`ldjax.data.preferences.encode_prompt`), or an
        ``(N, Tp)`` array with ``lengths`` (N,): row i's prompt is its first ``lengths[i]``
        tokens (``padding_side="right"``) or its last ones (``"left"``).
      max_new_tokens: tokens to generate per prompt; ``L_i + max_new_tokens <= config.max_len``.
      temperature: 0 -> greedy argmax; > 0 -> sample from softmax(z / temperature)
        (``key`` required), restricted to the ``top_k`` largest logits if given (ties with the
        k-th largest are kept). Temperature, top_k, eos_id and pad_id are traced, so changing
        them does not recompile; greedy vs sampling, N, the padded prompt width (a multiple of
        16) and ``max_new_tokens`` do.
      eos_id: generation of a row stops at this id (None: never stop early). Defaults are the
        :class:`~ldjax.lm.tokenizer.ByteTokenizer` ids; pass ``tokenizer.eos_id`` otherwise.
      pad_id: id used for padding (never seen by the model, which masks by position).
      include_eos: keep the EOS token at the end of the returned lists.

    Returns:
      N lists of new token ids (prompt excluded), cut at the first EOS.
    """
    prompt_lists = _as_prompt_lists(prompts, lengths, padding_side)
    if not prompt_lists:
        return []
    lens = np.array([len(p) for p in prompt_lists], np.int32)
    if np.any(lens == 0):
        raise ValueError(f"empty prompt at index {int(np.argmin(lens))}; start prompts with BOS")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(lens.max()) + max_new_tokens > config.max_len:
        raise ValueError(
            f"prompt length {int(lens.max())} + max_new_tokens {max_new_tokens} exceeds "
            f"config.max_len={config.max_len}; truncate prompts (keep their end) "
            "or ask for fewer tokens"
        )
    for i, p in enumerate(prompt_lists):
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} has token ids outside [0, {config.vocab_size}): {bad[:5]}"
            )
    greedy = float(temperature) == 0.0
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, {config.vocab_size}], got {top_k}")
    if key is None:
        key = jax.random.PRNGKey(0)
    width = -(-int(lens.max()) // _BUCKET) * _BUCKET
    tokens, positions = left_pad(prompt_lists, pad_id, width)
    out = _generate_padded(
        params,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        jnp.asarray(lens),
        key,
        jnp.asarray(max(float(temperature), 1e-6), jnp.float32),
        jnp.asarray(config.vocab_size if top_k is None else int(top_k), jnp.int32),
        jnp.asarray(-1 if eos_id is None else int(eos_id), jnp.int32),
        jnp.asarray(pad_id, jnp.int32),
        config=config,
        max_new_tokens=int(max_new_tokens),
        greedy=greedy,
    )
    out = np.asarray(out)
    results = []
    for row in out:
        row = row.tolist()
        if eos_id is not None and eos_id in row:
            cut = row.index(eos_id)
            row = row[: cut + 1] if include_eos else row[:cut]
        results.append(row)
    return results


def naive_greedy_decode(
    params,
    config: LMConfig,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: int | None = 257,
    pad_id: int = 258,
) -> list[int]:
    """Slow reference: greedy decoding that recomputes the full forward pass every step
    (one prompt, no cache; the sequence is right-padded to ``config.max_len`` so one program is
    compiled, which causal attention makes harmless). For tests of :func:`generate`.
    EOS is not returned."""
    apply_fn = make_apply_fn(config)
    seq = list(map(int, prompt))
    width = config.max_len
    if len(seq) + max_new_tokens > width:
        raise ValueError(
            f"prompt length {len(seq)} + {max_new_tokens} exceeds config.max_len={width}"
        )
    new = []
    for _ in range(max_new_tokens):
        padded = np.full((1, width), pad_id, np.int32)
        padded[0, : len(seq)] = seq
        logits = apply_fn(params, jnp.asarray(padded))
        tok = int(jnp.argmax(logits[0, len(seq) - 1]))
        if eos_id is not None and tok == eos_id:
            break
        new.append(tok)
        seq.append(tok)
    return new
