"""Real LLMs through penzai: ``(apply_fn, params)`` for the engine, the model's own tokenizer, and
the probe/pair arrays of the paper's HH layout (``pip install ldjax[llm]``).

>>> import ldjax.llm as llm
>>> apply_fn, params = llm.from_penzai(llm.build_gpt_neox())   # tiny random GPT-NeoX, offline
>>> sorted(params)[0]
'transformer/block_0/attention/key/AddBias.bias'
"""

from ldjax.llm.penzai_adapter import (
    PYTHIA_SHAPES,
    abstract_gpt_neox,
    build_gpt_neox,
    from_penzai,
    gpt_neox_config,
    load_pretrained,
)
from ldjax.llm.text import HFTokenizer, hh_messages, load_tokenizer, pair_arrays, probe_arrays

__all__ = [
    "HFTokenizer",
    "PYTHIA_SHAPES",
    "abstract_gpt_neox",
    "build_gpt_neox",
    "from_penzai",
    "gpt_neox_config",
    "hh_messages",
    "load_pretrained",
    "load_tokenizer",
    "pair_arrays",
    "probe_arrays",
]
