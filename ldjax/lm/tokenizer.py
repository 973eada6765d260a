"""Tokenizers for the small LM: a byte-level default and an optional trained BPE.

Both share one interface:

- ``bos_id``, ``eos_id``, ``pad_id``: the three special ids; ``vocab_size`` = V.
- ``encode(text) -> list[int]``: ids of ``text`` only, never any special id.
- ``decode(ids) -> str``: drops special ids; byte sequences that are not valid UTF-8 become
  U+FFFD (``errors="replace"``), so ``decode`` never raises on model output.

``decode(encode(s)) == s`` for every ``str`` ``s`` (that has no lone surrogates).

Sequence layout (see :mod:`ldjax.data.preferences`): ``[BOS] + prompt + response + [EOS]``,
padded with PAD. Special ids are added by the data code, never by ``encode``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

__all__ = ["ByteTokenizer", "BPETokenizer", "get_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, BOS=256, EOS=257, PAD=258, V=259.

    Needs no training and no files; the default tokenizer of ldjax.
    """

    name = "byte"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """``text`` -> its UTF-8 bytes as ints (no BOS/EOS)."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; special ids (>= 256) are dropped, invalid UTF-8 -> U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i >= self.vocab_size or i < 0:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401, PLC0415  # optional dependency (ldjax[bpe])
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "BPETokenizer needs the `tokenizers` package: pip install 'ldjax[bpe]' "
            "(or pip install tokenizers). The default ByteTokenizer needs nothing."
        ) from e
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``), same interface as :class:`ByteTokenizer`.

    Special ids: BOS=0, EOS=1, PAD=2 (added first, at training time). Byte-level pre-tokenization
    without an added prefix space, so ``decode(encode(s)) == s`` exactly.

    Build with :meth:`train` or :meth:`load`; save with :meth:`save` (one JSON file).
    """

    name = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        ids = [hf_tokenizer.token_to_id(s) for s in _SPECIALS]
        if any(i is None for i in ids):
            raise ValueError(
                f"tokenizer lacks the special tokens {_SPECIALS}; build it with BPETokenizer.train"
            )
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._special = set(ids)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
    ) -> BPETokenizer:
        """Train a byte-level BPE with ``vocab_size`` tokens (incl. 256 bytes and 3 specials)."""
        tk = _require_tokenizers()
        if vocab_size < 259:
            raise ValueError(
                f"vocab_size must be >= 259 (256 bytes + 3 specials), got {vocab_size}"
            )
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(_SPECIALS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((t for t in texts), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        """``text`` -> BPE ids (no BOS/EOS)."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode expects str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; special ids dropped, invalid UTF-8 -> U+FFFD."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        ids = [i for i in ids if i not in self._special]
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file (``tokenizers`` format)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self._tok.to_str())

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a JSON file written by :meth:`save`."""
        tk = _require_tokenizers()
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON tokenizer file: {e}") from e
        return cls(tk.Tokenizer.from_str(text))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def get_tokenizer(name_or_path: str | os.PathLike = "byte"):
    """``"byte"`` -> :class:`ByteTokenizer`; a path to a saved JSON -> :class:`BPETokenizer`."""
    if isinstance(name_or_path, (ByteTokenizer, BPETokenizer)):
        return name_or_path
    if str(name_or_path) == "byte":
        return ByteTokenizer()
    if os.path.exists(name_or_path):
        return BPETokenizer.load(name_or_path)
    raise FileNotFoundError(
        f"unknown tokenizer {str(name_or_path)!r}: use 'byte' or the path of a JSON file "
        "written by BPETokenizer.save"
    )
