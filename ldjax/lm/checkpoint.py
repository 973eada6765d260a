"""The LM's weights on disk: one format, the orbax checkpoints of :mod:`ldjax.training.checkpoint`.

:func:`save_lm` writes parameters with their :class:`~ldjax.lm.model.LMConfig` (and any JSON
``info``) as a one-step checkpoint folder; :func:`load_lm` reads that, and also every checkpoint
the LM's training writes: a phase's ``ckpt`` folder (the newest step), or an ``ldjax lm`` run
folder (its SFT model, else the pretrained one). Checksums are verified on every load.

Where the config comes from, first found: the ``lm_config`` that :func:`save_lm` stored; the
``model`` that a training phase recorded in its fingerprint; the run's ``config.json`` (searched in
the folder and up to four parents); else the parameter shapes plus ``n_heads``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldjax.lm.config import load_config
from ldjax.lm.model import LMConfig, init_params
from ldjax.training.checkpoint import Checkpoints, save_params

__all__ = ["save_lm", "load_lm", "config_to_dict", "config_from_dict"]

_RUN_PHASES = ("sft", "sft_extend", "pretrain")


def config_to_dict(config: LMConfig) -> dict:
    """An :class:`LMConfig` as JSON types (the dtype by name)."""
    d = dataclasses.asdict(config)
    d["dtype"] = np.dtype(config.dtype).name
    return d


def config_from_dict(d: dict) -> LMConfig:
    """The inverse of :func:`config_to_dict`; unknown fields are an error."""
    d = dict(d)
    if "dtype" in d:
        d["dtype"] = getattr(jnp, str(d["dtype"]))
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"LM config has unknown field(s) {unknown}")
    return LMConfig(**d)


def save_lm(path, params: Any, config: LMConfig, info: dict | None = None) -> str:
    """Writes ``params`` with their ``config`` (and ``info``) as a checkpoint folder at ``path``;
    returns the path. :func:`load_lm` reads it back."""
    save_params(
        path, jax.device_get(params), {"lm_config": config_to_dict(config), "info": info or {}}
    )
    return str(path)


def _infer_config(params: dict, n_heads: int | None, where: str, dtype=None) -> LMConfig:
    try:
        V, d = np.shape(params["tok_embed"]["embedding"])
        max_len = np.shape(params["pos_embed"]["embedding"])[0]
        n_layers = sum(1 for k in params if k.startswith("block_"))
        d_ff = np.shape(params["block_0"]["mlp"]["fc_in"]["kernel"])[1]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{where}: not the parameters of ldjax.lm.model.TransformerLM "
            f"(missing or malformed {e})"
        ) from e
    if n_heads is None:
        raise ValueError(
            f"{where}: the number of attention heads cannot be read from parameter "
            "shapes and no config was saved with them; pass n_heads (--lm-heads)"
        )
    dtype = dtype or jnp.asarray(params["tok_embed"]["embedding"]).dtype
    return LMConfig(
        vocab_size=int(V),
        d_model=int(d),
        n_heads=int(n_heads),
        n_layers=int(n_layers),
        d_ff=int(d_ff),
        max_len=int(max_len),
        dtype=dtype,
    )


def _find_pipeline_config(path: Path) -> Path | None:
    for p in [path] + list(path.parents)[:4]:
        if (p / "config.json").is_file():
            return p / "config.json"
    return None


def _checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder (numbered steps) at ``path``: itself, or a run folder's phase."""

    def has_steps(d: Path) -> bool:
        return d.is_dir() and any(c.is_dir() and c.name.isdigit() for c in d.iterdir())

    if has_steps(path):
        return path
    for phase in _RUN_PHASES:  # a run folder of `ldjax lm`: the SFT model first
        if has_steps(path / phase / "ckpt"):
            return path / phase / "ckpt"
    raise FileNotFoundError(
        f"{path}: no checkpoint found (expected a folder written by save_lm, a "
        "phase's ckpt folder, or an `ldjax lm` run folder with sft/ckpt or "
        "pretrain/ckpt)"
    )


def load_lm(path, n_heads: int | None = None) -> tuple:
    """Parameters and config of a saved LM: ``(params, config, info)`` (module docstring).

    ``info`` has ``path``, ``checkpoint`` (the step folder read), ``config_source`` and, from
    :func:`save_lm`, ``saved_info``; with a run's ``config.json``, ``pipeline_seq`` (its sequence
    lengths).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"load_lm: no such folder: {p}")
    if p.is_file():
        raise ValueError(
            f"load_lm: {p} is a file; LM weights are an orbax checkpoint folder "
            "(ldjax.lm.checkpoint.save_lm)"
        )
    folder = _checkpoint_folder(p)
    with Checkpoints(folder) as ck:
        step = ck.latest()
        if step is None:
            raise FileNotFoundError(f"load_lm: {folder} holds no complete checkpoint")
        state, meta = ck.restore(step)
    if not isinstance(state, dict) or "params" not in state:
        raise ValueError(f"load_lm: {folder / str(step)} holds no 'params'")
    params = state["params"]
    info: dict = {"path": str(p), "checkpoint": str(folder / str(step))}
    cfg_path = _find_pipeline_config(p)
    if "lm_config" in meta:
        config = config_from_dict(meta["lm_config"])
        info.update(config_source="saved with the weights", saved_info=meta.get("info", {}))
    elif isinstance(meta.get("fingerprint"), dict) and "model" in meta["fingerprint"]:
        config = config_from_dict(meta["fingerprint"]["model"])
        info["config_source"] = "the training phase's fingerprint"
    elif cfg_path is not None:
        pc = load_config(cfg_path)
        V = int(np.shape(params["tok_embed"]["embedding"])[0])
        config = pc.model.lm_config(pc.data.max_len, vocab_size=V)
        info["config_source"] = str(cfg_path)
    else:
        config = _infer_config(params, n_heads, str(p))
        info["config_source"] = "parameter shapes and n_heads"
    if cfg_path is not None:
        pc = load_config(cfg_path)
        info["config_json"] = str(cfg_path)
        info["pipeline_seq"] = dict(max_len=pc.data.max_len, max_prompt_len=pc.data.max_prompt_len)
    like = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
    got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
    want = jax.tree_util.tree_map(lambda s: tuple(s.shape), like)
    is_shape = lambda x: isinstance(x, tuple)
    if jax.tree_util.tree_structure(got, is_leaf=is_shape) != jax.tree_util.tree_structure(
        want, is_leaf=is_shape
    ) or jax.tree_util.tree_leaves(got, is_leaf=is_shape) != jax.tree_util.tree_leaves(
        want, is_leaf=is_shape
    ):
        if "tok_embed" not in params:
            _infer_config(params, n_heads or 1, str(p))  # raises: not TransformerLM parameters
        raise ValueError(
            f"load_lm: the parameters in {p} do not match the model {config} "
            "(different tree or shapes)"
        )
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, config.dtype), params)
    info["config"] = config_to_dict(config)
    return params, config, info
