"""The model the follow-up analyses share: an SFT'd small LM (cached), its last hidden states, and
per-sequence parameter gradients.

:func:`sft_model` trains :class:`~ldjax.experiments.followups.config.SFTModelConfig`'s model
from scratch by SFT on the synthetic data (:func:`ldjax.lm.train.sft`, the one training loop) and
caches it under ``<cache>/followups_sft/<hash of the config>``; :func:`hidden_and_logits` returns
the last hidden state (the input of ``lm_head``, after the final LayerNorm) with the logits;
:func:`sequence_grads` the flattened ``∇θ log π(y|x)`` of each row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ldjax import losses
from ldjax.data.arithmetic import arithmetic_records
from ldjax.data.synthetic import generate_preferences
from ldjax.lm import train as T
from ldjax.lm.checkpoint import load_lm, save_lm
from ldjax.lm.config import SFTConfig
from ldjax.lm.model import TransformerLM, count_params, init_params
from ldjax.training.checkpoint import CheckpointError

__all__ = ["sft_records", "sft_model", "hidden_and_logits", "sequence_grads", "flat_params"]


def sft_records(cfg) -> list[dict]:
    """The SFT data of ``cfg`` (a :class:`FollowupsConfig`): ``n_records`` synthetic records of
    every topic (seed 0) and ``n_arith`` arithmetic records (seed 1)."""
    s = cfg.sft
    return generate_preferences(s.n_records, 0) + arithmetic_records(s.n_arith, 1)


def _cache_key(cfg) -> str:
    d = {"sft": cfg.sft.to_dict(), "seed": cfg.seed, "version": 1}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def sft_model(cfg, *, cache_dir: Path | None = None, progress: bool = False) -> tuple:
    """``(params, lm_config, info)``: the SFT model of ``cfg``, from the cache when this config
    was trained before (an unreadable entry is trained again, said on stderr)."""
    lm = cfg.lm_config()
    s = cfg.sft
    key = _cache_key(cfg)
    path = None if cache_dir is None else Path(cache_dir) / "followups_sft" / key
    if path is not None and path.exists():
        try:
            params, _, loaded = load_lm(path)
            return params, lm, dict(loaded["saved_info"], from_cache=str(path))
        except (FileNotFoundError, CheckpointError) as e:
            print(f"ldjax: SFT cache entry {path} unusable, training again: {e}", file=sys.stderr)
    p0 = init_params(lm, jax.random.PRNGKey(cfg.seed))
    phase = SFTConfig(
        optimizer="adam",
        lr=s.lr,
        warmup=s.warmup,
        schedule="cosine",
        batch_size=s.batch_size,
        steps=s.steps,
        epochs=0.0,
        eval_every=10**9,
        ckpt_every=10**9,
        seed=cfg.seed,
    )
    t0 = time.time()
    r = T.sft(p0, lm, sft_records(cfg), phase, max_prompt_len=s.max_prompt_len, progress=progress)
    loss = np.asarray(r.history["loss"], np.float64)
    w = max(1, loss.size // 10)
    info = {
        "cache_key": key,
        "n_params": count_params(r.params),
        "steps": int(r.step),
        "seconds": time.time() - t0,
        "loss_first": float(loss[:w].mean()),
        "loss_last": float(loss[-w:].mean()),
        "from_cache": None,
    }
    if path is not None:
        save_lm(path, r.params, lm, info)
    return r.params, lm, info


@functools.lru_cache(maxsize=8)
def _hidden_fn(lm):
    model = TransformerLM(lm)

    @jax.jit
    def f(params, tokens):
        z, state = model.apply(
            {"params": params},
            tokens,
            capture_intermediates=lambda mdl, _: mdl.name == "ln_f",
        )
        return state["intermediates"]["ln_f"]["__call__"][0], z

    return f


def hidden_and_logits(params, lm, tokens) -> tuple:
    """``(h (N, T, D), z (N, T, V))``: the last hidden state (input of ``lm_head``) and the
    logits of ``tokens`` (N, T)."""
    return _hidden_fn(lm)(params, jnp.asarray(tokens))


@functools.lru_cache(maxsize=8)
def _grad_fn(lm):
    model = TransformerLM(lm)

    def logp(params, tokens, targets, mask):
        z = model.apply({"params": params}, tokens[None])
        return losses.sequence_logprob(z, targets[None], mask[None])[0]

    @jax.jit
    def f(params, tokens, targets, mask):
        g = jax.vmap(jax.grad(logp), in_axes=(None, 0, 0, 0))(params, tokens, targets, mask)
        return jax.vmap(lambda t: ravel_pytree(t)[0])(g)

    return f


def sequence_grads(params, lm, data: dict, batch: int = 16) -> np.ndarray:
    """``(N, P)`` float64: ``∇θ log π(y|x)`` (flattened like :func:`flat_params`) of every row of
    ``data`` (``tokens``, ``targets``, ``mask``), in chunks of ``batch`` rows."""
    f = _grad_fn(lm)
    n = data["tokens"].shape[0]
    out = []
    for s in range(0, n, batch):
        c = [np.asarray(data[k][s : s + batch]) for k in ("tokens", "targets", "mask")]
        m = c[0].shape[0]
        if m < batch:  # pad the last chunk: one compiled shape
            c = [np.concatenate([a, np.repeat(a[-1:], batch - m, 0)]) for a in c]
        out.append(np.asarray(f(params, *c), np.float64)[:m])
    return np.concatenate(out)


def flat_params(params) -> tuple:
    """``(flat (P,), unravel)`` of a parameter tree (:func:`jax.flatten_util.ravel_pytree`)."""
    return ravel_pytree(params)
