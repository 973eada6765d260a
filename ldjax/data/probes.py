"""Probe sets: many responses y per training prompt x_u, whose log π(y | x_u) the paper tracks.

The paper's probe file (``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl``) holds 13 response
types per prompt (:data:`PROBE_TYPES`, in the file's order). Some of them need another LLM to
write (GPT rephrases, self-rephrases); the four that need no other model can be made from any
preference data by :func:`build_probes`:

- ``irr_train``  y_{j≠u}^+ : the chosen response of another training prompt;
- ``irr_test``   y_test^+  : the chosen response of a held-out prompt;
- ``random_permute`` y_rnd' : the words of ``chosen``, shuffled;
- ``random_nonhum``  y_rnd  : shuffled words of an unrelated response (the ``irr_test`` response,
  as in the reference probe file).

The greedy-decoding response y* is not stored: decode it from the model under study
(:func:`ldjax.lm.decode.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "PROBE_TYPES",
    "PAPER_SYMBOLS",
    "probe_types",
    "split_held_out",
    "build_probes",
    "shuffle_words",
]

PROBE_TYPES = (
    "chosen",
    "chosen_initial",
    "chosen_selfr",
    "chosen_gptsemantic",
    "chosen_gptformat",
    "rejected",
    "reject_gptsemantic",
    "reject_gptformat",
    "irr_train",
    "irr_test",
    "irr_hum",
    "random_permute",
    "random_nonhum",
)
"""The 13 response fields of the paper's probe file, in the file's order."""

PAPER_SYMBOLS = {
    "chosen": "y_u^+",
    "chosen_initial": "y_u^+ (initial)",
    "chosen_selfr": "y_u^+ (self-rephrase)",
    "chosen_gptsemantic": "y_gpts^+",
    "chosen_gptformat": "y_gptf^+",
    "rejected": "y_u^-",
    "reject_gptsemantic": "y_gpts^-",
    "reject_gptformat": "y_gptf^-",
    "irr_train": "y_{j≠u}^+",
    "irr_test": "y_test^+",
    "irr_hum": "y_hum",
    "random_permute": "y_rnd'",
    "random_nonhum": "y_rnd",
}
"""Field -> the paper's symbol, for plot legends."""


def probe_types(record: dict) -> list[str]:
    """The response fields of :data:`PROBE_TYPES` present (as strings) in ``record``, in order."""
    return [t for t in PROBE_TYPES if isinstance(record.get(t), str)]


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    """The whitespace-separated words of ``text`` in a random order, joined by single spaces."""
    words = text.split()
    return " ".join(words[i] for i in rng.permutation(len(words)))


def split_held_out(
    records: Sequence[dict], n_test: int, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Deterministic split: ``n_test`` records (chosen by ``seed``) held out; the rest keep their
    order. Returns ``(train, test)``."""
    n = len(records)
    if not 0 < n_test < n:
        raise ValueError(f"n_test must be in [1, {n - 1}] for {n} records, got {n_test}")
    held = set(np.random.default_rng(seed).permutation(n)[:n_test].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    test = [records[i] for i in sorted(held)]
    return train, test


def _check(records: Sequence[dict], what: str, fields=("prompt", "chosen")) -> None:
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{what}[{i}] is a {type(rec).__name__}, not a dict")
        for f in fields:
            if not isinstance(rec.get(f), str):
                raise ValueError(f"{what}[{i}]: field {f!r} is missing or not a string")


def build_probes(
    records: Sequence[dict],
    *,
    seed: int = 0,
    n_test: int | None = None,
    test_records: Sequence[dict] | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Add the model-free probe types to preference records.

    Args:
      records: dicts with at least ``prompt`` and ``chosen`` (strings); any other fields
        (``rejected``, the paper's GPT rephrases, ...) are kept unchanged.
      seed: all random choices derive from ``(seed, record index)``: same inputs, same output.
      n_test: when ``test_records`` is None, this many records are held out (deterministically,
        :func:`split_held_out`) to supply ``irr_test`` and are not returned as probes.
        Default ``max(1, len(records) // 10)``.
      test_records: held-out records to draw ``irr_test`` from instead; then every record in
        ``records`` is a probe (``n_test`` must be None).
      overwrite: replace probe fields already present (default: keep them).

    Returns:
      New dicts (copies), one per probe prompt, with ``irr_train``, ``irr_test``,
      ``random_permute``, ``random_nonhum`` added where absent.
    """
    records = list(records)
    _check(records, "records")
    if test_records is None:
        if n_test is None:
            n_test = max(1, len(records) // 10)
        train, test = split_held_out(records, n_test, seed)
    else:
        if n_test is not None:
            raise ValueError("give either n_test or test_records, not both")
        test = list(test_records)
        _check(test, "test_records")
        if not test:
            raise ValueError("test_records is empty")
        train = records
    if len(train) < 2:
        raise ValueError(f"need >= 2 probe records to draw irr_train, got {len(train)}")

    return [_add_probes(i, train, test, seed, overwrite) for i in range(len(train))]


def _add_probes(i: int, train: list[dict], test: list[dict], seed: int, overwrite: bool) -> dict:
    """A copy of ``train[i]`` with the probe fields of :func:`build_probes` filled in."""
    rec = train[i]
    n = len(train)
    rng = np.random.default_rng([seed, i])
    j = (i + int(rng.integers(1, n))) % n  # another training prompt, j != i
    t = int(rng.integers(len(test)))
    perm_rng, nonhum_rng = rng.spawn(2)
    new = dict(rec)

    def fill(field, make):
        if overwrite or not isinstance(new.get(field), str):
            new[field] = make()

    fill("irr_train", lambda: train[j]["chosen"])
    fill("irr_test", lambda: test[t]["chosen"])
    fill("random_permute", lambda: shuffle_words(rec["chosen"], perm_rng))
    fill("random_nonhum", lambda: shuffle_words(new["irr_test"], nonhum_rng))
    return new
