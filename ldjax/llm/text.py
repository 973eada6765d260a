"""A real model's own tokenizer and chat template, and the probe/pair arrays of one HH record.

The sequence layout is :mod:`ldjax.data.preferences`' (``[BOS] + prompt + response + [EOS]``,
right-padded, ``mask`` on the positions that predict a response token), so every loss and
readout of ldjax reads these arrays as it reads the small LM's.

- :func:`load_tokenizer` ``("EleutherAI/pythia-410m")``: the model's HuggingFace tokenizer
  (``transformers.AutoTokenizer``, which also carries the chat template; or the ``tokenizers``
  library's ``tokenizer.json``). Downloads on Colab.
- :func:`load_tokenizer` ``("tiny-random")``: **offline fallback** for tests and CI, ldjax's
  :class:`ldjax.lm.tokenizer.ByteTokenizer` (V = 259) — not a real model's tokenizer.

The HH prompts are dialogues ``"\\n\\nHuman: …\\n\\nAssistant: …\\n\\nHuman: …\\n\\nAssistant:"``.
A tokenizer with a chat template (Gemma, Llama-chat, Qwen-chat) gets them as messages
(:func:`hh_messages`) through its template; one without (Pythia, a base model, as in the paper)
reads the raw dialogue text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ldjax.data.preferences import encode_batch, encode_example
from ldjax.data.probes import probe_types

__all__ = ["HFTokenizer", "hh_messages", "load_tokenizer", "pair_arrays", "probe_arrays"]

OFFLINE = "tiny-random"


def hh_messages(prompt: str) -> list[dict]:
    """An HH dialogue as chat messages ``[{"role": "user"|"assistant", "content": ...}, ...]``.

    >>> hh_messages("\\n\\nHuman: Hi?\\n\\nAssistant: Hello.\\n\\nHuman: Why?\\n\\nAssistant:")
    [{'role': 'user', 'content': 'Hi?'}, {'role': 'assistant', 'content': 'Hello.'}, \
{'role': 'user', 'content': 'Why?'}]
    """
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + prompt.lstrip("\n"))
    out = []
    for who, text in zip(parts[1::2], parts[2::2]):
        text = text.strip()
        if text:
            out.append({"role": "user" if who == "Human" else "assistant", "content": text})
    return out


class HFTokenizer:
    """A HuggingFace tokenizer with ldjax's tokenizer interface (``encode``, ``decode``,
    ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``) and its chat template.

    ``encode`` never adds special tokens (the data layout adds BOS and EOS). Models without a
    BOS (Pythia) use their end-of-text token for BOS, EOS and PAD, as their training did.

    Args:
      tok: a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``.
      name: for messages.
      vocab_size: the model's V when larger than the tokenizer's (Pythia pads 50,277 to 50,304).
    """

    def __init__(self, tok, name: str = "", vocab_size: int | None = None):
        self.tok, self.name = tok, name
        hf = hasattr(tok, "apply_chat_template")
        self.chat_template = getattr(tok, "chat_template", None) if hf else None
        if hf:
            eos = tok.eos_token_id
            bos = tok.bos_token_id if tok.bos_token_id is not None else eos
            pad = tok.pad_token_id if tok.pad_token_id is not None else eos
            n = len(tok)
        else:
            ids = [tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>")]
            eos = next((i for i in ids if i is not None), 0)
            bos = pad = eos
            n = tok.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = int(bos), int(eos), int(pad)
        self.vocab_size = max(int(n), int(vocab_size or 0))

    def encode(self, text: str) -> list[int]:
        if hasattr(self.tok, "apply_chat_template"):
            return list(self.tok.encode(text, add_special_tokens=False))
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def format_prompt(self, prompt: str) -> str:
        """The HH ``prompt`` through the chat template (generation prompt added, the template's
        own BOS removed: the layout adds it), or unchanged without a template."""
        if not self.chat_template:
            return prompt
        text = self.tok.apply_chat_template(
            hh_messages(prompt), tokenize=False, add_generation_prompt=True
        )
        bos = getattr(self.tok, "bos_token", None)
        return text[len(bos) :] if bos and text.startswith(bos) else text

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, V={self.vocab_size}, chat={bool(self.chat_template)})"


def load_tokenizer(name: str, vocab_size: int | None = None):
    """The tokenizer of model ``name`` (a HuggingFace id or folder), or for ``"tiny-random"`` the
    offline fallback :class:`ldjax.lm.tokenizer.ByteTokenizer`.

    Tries ``transformers.AutoTokenizer`` (chat templates), then ``tokenizers.Tokenizer``.
    """
    if name == OFFLINE:
        from ldjax.lm.tokenizer import ByteTokenizer  # noqa: PLC0415

        return ByteTokenizer()
    try:
        import transformers  # noqa: PLC0415

        return HFTokenizer(transformers.AutoTokenizer.from_pretrained(name), name, vocab_size)
    except ImportError:
        pass
    try:
        import tokenizers  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            f"loading the tokenizer of {name!r} needs transformers or tokenizers "
            f"(pip install tokenizers); offline use {OFFLINE!r}"
        ) from e
    return HFTokenizer(tokenizers.Tokenizer.from_pretrained(name), name, vocab_size)


def _prompt(tokenizer, prompt: str) -> str:
    fmt = getattr(tokenizer, "format_prompt", None)
    return fmt(prompt) if fmt else prompt


def probe_arrays(
    tokenizer,
    record: dict,
    types: Sequence[str] | None = None,
    *,
    max_len: int = 512,
    max_prompt_len: int = 256,
) -> tuple[list[str], dict]:
    """The probe responses of one record: ``(types, {tokens, targets, mask})``, each ``(K, T)``.

    Args:
      tokenizer: :func:`load_tokenizer`'s (or any ldjax tokenizer).
      record: one line of the HH probe file (``prompt`` and the 13 response fields).
      types: the fields to encode (default: every :data:`ldjax.data.probes.PROBE_TYPES` field
        present; an empty response is skipped).
      max_len, max_prompt_len: as :class:`ldjax.data.preferences.SeqConfig` (paper: 512, 256).
    """
    types = [t for t in (types or probe_types(record)) if record.get(t)]
    if not types:
        raise ValueError("record: no non-empty probe response field")
    p = _prompt(tokenizer, record["prompt"])
    arr = encode_batch(
        tokenizer,
        [p] * len(types),
        [record[t] for t in types],
        max_len=max_len,
        max_prompt_len=max_prompt_len,
    )
    return types, arr


def pair_arrays(
    tokenizer, record: dict, *, max_len: int = 512, max_prompt_len: int = 256
) -> tuple[dict, dict]:
    """``(chosen, rejected)``: the DPO pair of one record, ``{tokens, targets, mask}`` ``(1, T)``
    each."""
    p = _prompt(tokenizer, record["prompt"])
    kw = dict(max_len=max_len, max_prompt_len=max_prompt_len)
    out = []
    for f in ("chosen", "rejected"):
        if not isinstance(record.get(f), str):
            raise ValueError(f"record: field {f!r} is missing or not a string")
        ex = encode_example(tokenizer, p, record[f], **kw)
        out.append({k: np.asarray(v)[None] for k, v in ex.items()})
    return out[0], out[1]
