"""Real LLMs from penzai (``pip install ldjax[llm]``) as ``(apply_fn, params)`` for the engine.

`penzai <https://github.com/google-deepmind/penzai>`_ builds decoder-only transformers in pure
JAX — GPT-NeoX (the Pythia suite, the paper's model) and the Llama-like family (Llama, Mistral;
Gemma-, Qwen-style configurations) — and converts HuggingFace checkpoints to them
(``gpt_neox_from_huggingface_model``, ``llama_from_huggingface_model``, ...). It installs in
seconds beside jax 0.10 (``treescope`` and ``ordered-set`` are its only new dependencies), which
is why ldjax adapts it rather than ``gemma`` (whose resolver pulls kauldron, xmanager and cloud
SDKs).

:func:`from_penzai` turns a penzai model into the engine's two arguments::

    apply_fn(params, tokens (N, T) int) -> logits (N, T, V)
    params: {parameter label: array}   (a plain dict: every engine path differentiates it)

so :func:`ldjax.decompose`, :func:`ldjax.actual_step`, :func:`ldjax.entk_vp`,
:func:`ldjax.influence` and :func:`ldjax.entk` (``implementation="projected"`` included) run on it
unchanged. Positions are ``0..T-1`` (right padding, the layout of :mod:`ldjax.data.preferences`;
causal attention means padding never changes an earlier position's logits).

Builders: :func:`gpt_neox_config` (the Pythia shapes, or a tiny random one), :func:`build_gpt_neox`
(random init, offline), :func:`load_pretrained` (HuggingFace weights through penzai's converters;
needs ``transformers`` and ``torch``, and downloads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "PYTHIA_SHAPES",
    "abstract_gpt_neox",
    "build_gpt_neox",
    "from_penzai",
    "gpt_neox_config",
    "load_pretrained",
]


def _require_penzai():
    try:
        import penzai  # noqa: F401, PLC0415
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "ldjax.llm needs penzai: pip install 'ldjax[llm]' (or pip install penzai==0.2.5)"
        ) from e


# hidden, layers, heads, mlp (the HuggingFace configs of EleutherAI/pythia-*; V = 50304,
# rotary_pct 0.25, rotary_emb_base 10000, layer_norm_eps 1e-5, gelu)
PYTHIA_SHAPES = {
    "pythia-14m": (128, 6, 4, 512),
    "pythia-70m": (512, 6, 8, 2048),
    "pythia-160m": (768, 12, 12, 3072),
    "pythia-410m": (1024, 24, 16, 4096),
    "pythia-1b": (2048, 16, 8, 8192),
}
"""Pythia architectures by name: ``(hidden, layers, heads, mlp_hidden)``; vocabulary 50,304."""


def gpt_neox_config(
    name: str = "tiny",
    *,
    vocab_size: int | None = None,
    dtype: Any = jnp.float32,
    use_layer_stack: bool = False,
    **overrides,
):
    """A penzai ``GPTNeoXTransformerConfig``: a Pythia architecture by name, or ``"tiny"``.

    Args:
      name: a key of :data:`PYTHIA_SHAPES` (with or without ``EleutherAI/``), or ``"tiny"``
        (2 layers, width 16, 2 heads, MLP 32: for tests and CI).
      vocab_size: V (default 50,304 for Pythia, 259 — ldjax's byte tokenizer — for ``"tiny"``).
      dtype: parameter and activation dtype (``jnp.float64`` under ``jax_enable_x64``).
      use_layer_stack: the blocks as one ``jax.lax.scan`` (penzai's ``LayerStack``) instead of
        a Python loop: one block compiled once (fast compiles at depth).
      overrides: any other field of the config (``num_decoder_blocks=4``, ...).
    """
    _require_penzai()
    from penzai.models.transformer.variants import gpt_neox  # noqa: PLC0415

    key = name.split("/")[-1].lower()
    if key == "tiny":
        d, layers, heads, mlp, v = 16, 2, 2, 32, 259
    elif key in PYTHIA_SHAPES:
        (d, layers, heads, mlp), v = PYTHIA_SHAPES[key], 50304
    else:
        raise ValueError(f"unknown architecture {name!r}: 'tiny' or one of {sorted(PYTHIA_SHAPES)}")
    head = d // heads
    fields = dict(
        num_attention_heads=heads,
        embedding_dim=d,
        projection_dim=head,
        mlp_hidden_dim=mlp,
        num_decoder_blocks=layers,
        vocab_size=v if vocab_size is None else int(vocab_size),
        activation_fn="gelu_exact",
        rope_subset_size=max(2, int(0.25 * head)),
        rope_wavelength=10000.0,
        layernorm_epsilon=1e-5,
        parameter_dtype=dtype,
        activation_dtype=dtype,
        use_layer_stack=use_layer_stack,
    )
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown GPTNeoXTransformerConfig fields {sorted(unknown)}")
    fields.update(overrides)
    return gpt_neox.GPTNeoXTransformerConfig(**fields)


def build_gpt_neox(config=None, seed: int | jax.Array = 0):
    """A randomly initialised penzai GPT-NeoX model (no weights downloaded).

    Args:
      config: a ``GPTNeoXTransformerConfig`` (default ``gpt_neox_config("tiny")``).
      seed: the init RNG seed (or a JAX key).
    """
    _require_penzai()
    from penzai.models.transformer.variants import gpt_neox  # noqa: PLC0415

    config = gpt_neox_config("tiny") if config is None else config
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return gpt_neox.build_gpt_neox_transformer(config, init_base_rng=key)


def from_penzai(model, *, dtype: Any = None) -> tuple[Callable, dict]:
    """A penzai language model as ``(apply_fn, params)``.

    Args:
      model: a penzai ``TransformerLM`` (or any penzai layer mapping a named ``tokens`` array
        with axes ``batch``, ``seq`` to logits with axes ``batch``, ``seq``, ``vocabulary``).
      dtype: cast every floating parameter to it (penzai's GPT-NeoX builder keeps the MLP and
        the LM head in float32 whatever ``parameter_dtype`` says; Pythia's checkpoints are
        float16): ``jnp.float64`` for exactness checks, ``jnp.float32`` for the decomposition.
    Returns:
      ``apply_fn(params, tokens) -> (N, T, V)`` logits for ``tokens`` ``(N, T)`` int, and
      ``params``: ``{label: array}``, every ``pz.Parameter`` of the model as a positional array
      (its named axes in the model's order). Everything else in the model is closed over.
    Raises:
      ValueError: the model has no parameters.

    Examples:
      >>> import jax.numpy as jnp, ldjax.llm as llm
      >>> apply_fn, params = llm.from_penzai(llm.build_gpt_neox())
      >>> apply_fn(params, jnp.zeros((2, 5), jnp.int32)).shape
      (2, 5, 259)
    """
    _require_penzai()
    from penzai import pz  # noqa: PLC0415

    unbound, values = pz.unbind_params(model, freeze=True)
    if not values:
        raise ValueError("model: no pz.Parameter to differentiate (already unbound or frozen?)")
    axes = {v.label: tuple(v.value.named_shape) for v in values}
    params = {v.label: v.value.unwrap(*axes[v.label]) for v in values}
    if dtype is not None:
        params = {
            k: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
            for k, a in params.items()
        }
    return _apply_fn(unbound, axes), params


def _apply_fn(unbound, axes: dict) -> Callable:
    """``apply_fn(params, tokens)`` of a penzai model with its parameters unbound (slots), the
    named axes of each parameter in ``axes`` (label -> names, the order of its positional
    array)."""
    from penzai import pz  # noqa: PLC0415

    def apply_fn(params, tokens):
        values = [
            pz.ParameterValue(label=k, value=pz.nx.wrap(params[k]).tag(*names))
            for k, names in axes.items()
        ]
        bound = pz.bind_variables(unbound, values)
        out = bound(pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"))
        return out.unwrap("batch", "seq", "vocabulary")

    return apply_fn


def abstract_gpt_neox(config) -> tuple[Callable, dict]:
    """``(apply_fn, param_shapes)`` of a GPT-NeoX model without allocating its parameters:
    ``param_shapes`` is ``{label: jax.ShapeDtypeStruct}``, for ``jax.jit(...).lower(...)`` and
    XLA's compiled memory and cost analysis of a model that need not fit in memory
    (``benchmarks/bench_llm_memory.py``). ``apply_fn`` is :func:`from_penzai`'s for the same
    model, so the real params of :func:`build_gpt_neox` run through it.
    """
    _require_penzai()
    from penzai import pz  # noqa: PLC0415
    from penzai.models.transformer.variants import gpt_neox  # noqa: PLC0415

    unbound = gpt_neox.build_gpt_neox_transformer(config, init_base_rng=None)  # slots only
    axes = {}

    def init(key):
        _, values = pz.unbind_params(build_gpt_neox(config, key), freeze=True)
        axes.update({v.label: tuple(v.value.named_shape) for v in values})
        return {v.label: v.value.unwrap(*axes[v.label]) for v in values}

    shapes = jax.eval_shape(init, jax.random.key(0))
    return _apply_fn(unbound, axes), shapes


def load_pretrained(name: str, *, dtype: Any = None, use_layer_stack: bool = False):
    """A pretrained HuggingFace causal LM as a penzai model, by penzai's own converters.

    ``gpt_neox`` (Pythia) goes through ``gpt_neox_from_huggingface_model``, ``llama`` and
    ``mistral`` through theirs (penzai's Llama-like family). Needs ``transformers`` and
    ``torch``; downloads the weights (on Colab; never in ldjax's tests).

    Args:
      name: a HuggingFace model id, e.g. ``"EleutherAI/pythia-410m"``, or a local folder.
      dtype: cast the parameters to this dtype (default: as stored; Pythia's are float16 —
        pass ``jnp.float32`` for the decomposition).
      use_layer_stack: the blocks as one ``lax.scan`` (faster compiles).
    Returns:
      The penzai model (give it to :func:`from_penzai`).
    Raises:
      ImportError: ``transformers`` (or torch) is not installed.
      ValueError: a model type penzai cannot convert.
    """
    _require_penzai()
    try:
        import transformers  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            "load_pretrained needs transformers and torch (pip install transformers torch); "
            "offline, build a random model with build_gpt_neox(gpt_neox_config(name))"
        ) from e
    from penzai.models.transformer.variants import (  # noqa: PLC0415
        gpt_neox,
        llama,
        mistral,
    )

    hf = transformers.AutoModelForCausalLM.from_pretrained(name)
    if dtype is not None:
        import torch  # noqa: PLC0415

        hf = hf.to({jnp.float32: torch.float32, jnp.float64: torch.float64}.get(dtype, dtype))
    converters = {
        "gpt_neox": gpt_neox.gpt_neox_from_huggingface_model,
        "llama": llama.llama_from_huggingface_model,
        "mistral": mistral.mistral_from_huggingface_model,
    }
    kind = hf.config.model_type
    if kind not in converters:
        raise ValueError(
            f"{name}: model type {kind!r}; penzai converts {sorted(converters)} "
            "(Gemma: penzai.models.transformer.variants.gemma from a Gemma checkpoint)"
        )
    return converters[kind](hf, use_layer_stack=use_layer_stack)
