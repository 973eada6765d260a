"""The one config style of ldjax: frozen dataclasses with a JSON round trip and named presets.

A config class is a ``@dataclasses.dataclass(frozen=True)`` that also inherits :class:`Config`.
Fields may be other config dataclasses (sections). Then:

* ``cfg.to_json(path)`` writes every field; ``Cls.load(path, base)`` reads a JSON file that may
  hold only the fields it changes (``{"sft": {"extend": true}}``) and merges it onto ``base``;
* ``cfg.replace(sft={"extend": True}, seed=3)`` replaces fields or fields of sections;
* an unknown field is an error that names it and lists the known ones;
* frozen configs are hashable, so they can key jit caches and checkpoint fingerprints.

Named presets are module-level instances collected in a ``PRESETS`` dict next to the class
(``ldjax.lm.config.PRESETS``, ``ldjax.mnist.train.PRESETS``, ...), picked by :func:`preset`.

Example:

>>> import dataclasses
>>> from ldjax.training.config import Config
>>> @dataclasses.dataclass(frozen=True)
... class Opt(Config):
...     lr: float = 0.1
...     steps: int = 10
>>> Opt().replace(lr=0.5)
Opt(lr=0.5, steps=10)
>>> Opt.from_dict({"steps": 3})
Opt(lr=0.1, steps=3)
>>> Opt.from_dict({"lrr": 1})
Traceback (most recent call last):
...
ValueError: config: unknown field(s) ['lrr']; known: ['lr', 'steps']
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["Config", "merge", "preset", "to_jsonable"]

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for frozen dataclass configs (module docstring)."""

    def to_dict(self) -> dict:
        """Every field as plain JSON types (tuples become lists)."""
        return to_jsonable(dataclasses.asdict(self))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text of the whole config (also written to ``path`` if given)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:  # atomically: a temporary file renamed over ``path``
            path = os.fspath(path)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls: type[C], d: Any, base: C | None = None) -> C:
        """``base`` (default: the class defaults) with the fields of ``d`` replaced."""
        return merge(cls, base if base is not None else cls(), d, "config")

    @classmethod
    def load(cls: type[C], path: str | os.PathLike, base: C | None = None) -> C:
        """Reads a JSON config, full or partial, and merges it onto ``base``."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file not found: {path}")
        if os.path.isdir(path):
            raise ValueError(f"{path}: is a folder, not a JSON config file")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        except OSError as e:
            raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from e
        try:
            return cls.from_dict(d, base)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def replace(self: C, **fields) -> C:
        """A copy with fields, or fields of sections, replaced: ``replace(sft={"lr": 1e-3})``."""
        return merge(type(self), self, fields, "config")


def to_jsonable(x: Any) -> Any:
    """Dicts, lists and tuples made plain (tuples become lists), for ``json.dumps``."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    return x


def merge(cls: type, base: Any, d: Any, where: str) -> Any:
    """``base`` (an instance of the dataclass ``cls``) with the fields in ``d`` replaced;
    nested dataclass fields merge recursively, JSON lists become tuples where the field is one."""
    if dataclasses.is_dataclass(d):
        d = dataclasses.asdict(d)
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kw = {}
    for name, value in d.items():
        cur = getattr(base, name)
        if dataclasses.is_dataclass(cur) and not dataclasses.is_dataclass(value):
            kw[name] = merge(type(cur), cur, value, f"{where}.{name}")
        elif isinstance(cur, tuple) and isinstance(value, list):
            kw[name] = tuple(value)
        else:
            kw[name] = value
    try:
        return dataclasses.replace(base, **kw)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


def preset(presets: Mapping[str, Any], name: str, what: str = "preset") -> Any:
    """``presets[name]`` with an error naming the choices."""
    if name not in presets:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(presets)}")
    return presets[name]
