"""Preference data: JSONL loading and teacher-forcing encoding of (prompt, response) pairs.

Sequence layout (the paper's χ = [x; y], the reference code appends EOS to every response)::

    tokens  = [BOS] + prompt_ids[-max_prompt_len:] + response_ids[:budget] + [EOS] + [PAD]*...
    targets = tokens shifted left by one   (targets[t] = tokens[t+1], PAD at the end)
    mask[t] = True  iff  targets[t] is a response token (the EOS included)

**The mask selects logit positions, not tokens**: position t's logits z_t = h_θ(χ_{≤t}) predict
``targets[t] = tokens[t+1]``, and ``mask[t]`` is True exactly when that predicted token belongs
to the response y. So ``sum_t mask[t] * log_softmax(z_t)[targets[t]]`` is log π(y | x), the
sequence log-probability tracked in the paper; the last prompt token's position is the first
masked one, and the EOS position itself is not masked (nothing after it is scored).

Truncation: the prompt keeps its END (the most recent turns, as in the paper's code); the
response keeps its START and its EOS is always kept (the response is cut before the EOS so that
``len(sequence) <= max_len``). Everything is right-padded to exactly ``max_len``.

Lengths are parameters. Defaults are :data:`DEFAULT_SEQ` (max_len 256, prompt <= 128); the
paper used :data:`PAPER_SEQ` (max_len 512, prompt <= 256).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "SeqConfig",
    "DEFAULT_SEQ",
    "PAPER_SEQ",
    "load_jsonl",
    "encode_prompt",
    "encode_example",
    "encode_batch",
    "encode_field",
]


def _check_lengths(max_prompt_len: int, max_len: int) -> None:
    if max_prompt_len < 0:
        raise ValueError(f"max_prompt_len must be >= 0, got {max_prompt_len}")
    if max_len < max_prompt_len + 2:
        raise ValueError(
            f"max_len={max_len} must be >= max_prompt_len + 2 = {max_prompt_len + 2} "
            "(BOS and EOS always fit)"
        )


@dataclasses.dataclass(frozen=True)
class SeqConfig:
    """Sequence lengths, in tokens: ``max_len`` for the whole [BOS]+prompt+response+[EOS]
    sequence, ``max_prompt_len`` for the prompt (without BOS)."""

    max_len: int = 256
    max_prompt_len: int = 128

    def __post_init__(self):
        _check_lengths(self.max_prompt_len, self.max_len)


DEFAULT_SEQ = SeqConfig(max_len=256, max_prompt_len=128)
PAPER_SEQ = SeqConfig(max_len=512, max_prompt_len=256)


def _no_duplicate_keys(pairs: list) -> dict:
    """``object_pairs_hook`` of :func:`json.loads` that refuses an object with a key twice
    (plain :func:`json.loads` keeps the last value silently)."""
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def load_jsonl(
    path: str | os.PathLike,
    required: Sequence[str] = ("prompt", "chosen", "rejected"),
    nonempty: Sequence[str] = ("prompt", "chosen", "rejected"),
) -> list[dict]:
    """Read a JSON-lines file of records (one JSON object per line; blank lines are skipped).

    Every error names the file, and the line where there is one (``"<path>:<line>: ..."``).

    Args:
      path: the file (UTF-8).
      required: fields every record must have, as strings.
      nonempty: fields of ``required`` that must not be the empty string ``""`` (whitespace is
        kept: ``" "`` is a response of one token). Probe fields such as ``chosen_initial`` may be
        empty (21 records of the paper's probe file have an empty one), so they are not listed.

    Returns:
      The records, in file order (at least one).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is a folder or cannot be read; a line is not UTF-8 (a binary or
        Latin-1 file), not valid JSON, not an object, or repeats a key in one object; a field in
        ``required`` is missing or not a string, or one in ``nonempty`` is ``""``; the file holds
        no record.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"preference file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a JSON-lines file")
    records = []
    try:
        f = open(path, "rb")  # bytes: a line that is not UTF-8 is reported with its number
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from e
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                    f"{e.start + 1} of the line); a binary or Latin-1 file?"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except _DuplicateKey as e:
                raise ValueError(
                    f"{path}:{lineno}: duplicate key {e.key!r} in one JSON object"
                ) from None
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})"
                ) from e
            if not isinstance(rec, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            for field in required:
                if field not in rec:
                    raise ValueError(f"{path}:{lineno}: missing required field {field!r}")
                if not isinstance(rec[field], str):
                    raise ValueError(
                        f"{path}:{lineno}: field {field!r} must be a string, "
                        f"got {type(rec[field]).__name__}"
                    )
                if field in nonempty and rec[field] == "":
                    raise ValueError(f"{path}:{lineno}: field {field!r} is an empty string")
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records (the file is empty or holds only blank lines)")
    return records


def encode_prompt(
    tokenizer, prompt: str, *, max_prompt_len: int = DEFAULT_SEQ.max_prompt_len
) -> list[int]:
    """``[BOS] + encode(prompt)[-max_prompt_len:]``: the context a response is generated from
    (feed to :func:`ldjax.lm.decode.generate`)."""
    ids = tokenizer.encode(prompt)
    ids = ids[-max_prompt_len:] if max_prompt_len > 0 else []
    return [tokenizer.bos_id] + ids


def encode_example(
    tokenizer,
    prompt: str,
    response: str,
    *,
    max_prompt_len: int = DEFAULT_SEQ.max_prompt_len,
    max_len: int = DEFAULT_SEQ.max_len,
) -> dict:
    """Encode one (x, y) pair for teacher forcing (layout in the module docstring).

    Returns a dict of numpy arrays, each of shape ``(max_len,)``::

      tokens  int32: [BOS] + prompt + response + [EOS], right-padded with PAD.
      targets int32: ``targets[t] = tokens[t+1]``; PAD at the last position and in padding.
      mask    bool:  True at the positions t whose target is a response token (incl. EOS);
        ``mask.sum() == len(encode(response)) + 1`` unless the response was truncated.
    """
    _check_lengths(max_prompt_len, max_len)
    p = encode_prompt(tokenizer, prompt, max_prompt_len=max_prompt_len)
    r = tokenizer.encode(response)
    budget = max_len - len(p) - 1  # room for response tokens before the EOS
    r = r[:budget] + [tokenizer.eos_id]
    seq = p + r
    tokens = np.full((max_len,), tokenizer.pad_id, np.int32)
    tokens[: len(seq)] = seq
    targets = np.full((max_len,), tokenizer.pad_id, np.int32)
    targets[:-1] = tokens[1:]
    mask = np.zeros((max_len,), bool)
    mask[len(p) - 1 : len(seq) - 1] = True  # positions whose next token is in r
    return {"tokens": tokens, "targets": targets, "mask": mask}


def encode_batch(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_prompt_len: int = DEFAULT_SEQ.max_prompt_len,
    max_len: int = DEFAULT_SEQ.max_len,
) -> dict:
    """:func:`encode_example` over pairs; returns ``tokens``, ``targets`` int32 and ``mask``
    bool arrays of shape ``(N, max_len)``."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ValueError(
            "encode_batch expects sequences of strings; use encode_example for one pair"
        )
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    _check_lengths(max_prompt_len, max_len)
    rows = [
        encode_example(tokenizer, p, r, max_prompt_len=max_prompt_len, max_len=max_len)
        for p, r in zip(prompts, responses)
    ]
    if not rows:
        return {
            "tokens": np.zeros((0, max_len), np.int32),
            "targets": np.zeros((0, max_len), np.int32),
            "mask": np.zeros((0, max_len), bool),
        }
    return {k: np.stack([row[k] for row in rows]) for k in ("tokens", "targets", "mask")}


def encode_field(
    tokenizer,
    records: Iterable[dict],
    field: str,
    *,
    max_prompt_len: int = DEFAULT_SEQ.max_prompt_len,
    max_len: int = DEFAULT_SEQ.max_len,
) -> dict:
    """Encode ``(record['prompt'], record[field])`` for every record, e.g. ``field='rejected'``
    or any probe type; ``(N, max_len)`` arrays as in :func:`encode_batch`."""
    records = list(records)
    for i, rec in enumerate(records):
        for f in ("prompt", field):
            if not isinstance(rec.get(f), str):
                raise ValueError(f"record {i}: field {f!r} is missing or not a string")
    return encode_batch(
        tokenizer,
        [r["prompt"] for r in records],
        [r[field] for r in records],
        max_prompt_len=max_prompt_len,
        max_len=max_len,
    )
