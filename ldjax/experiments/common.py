"""What the experiments share: figure files, JSON, machine facts, data and cache locations, and the
command-line grammar of every ``ldjax`` command.

Figures: plotting functions in ``ldjax.experiments.*.plots`` return ``matplotlib`` figures and
never write files; :func:`save_figure` is the one writer, used by the command-line drivers.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image  # a matplotlib dependency

__all__ = [
    "save_figure",
    "jsonable",
    "write_json",
    "write_text",
    "atomic_path",
    "machine_info",
    "cache_dir",
    "shared_data",
    "add_common_arguments",
    "progress_enabled",
    "int_at_least",
    "positive_int",
    "nonneg_int",
    "positive_float",
    "check_writable",
    "staged_output",
]


# ----------------------------------------------------------------------------------------------
# Figures and JSON
# ----------------------------------------------------------------------------------------------


def save_figure(fig, path, *, dpi: int = 90, footer: str = "") -> str:
    """Writes ``fig`` to ``path`` as a 256-colour palette PNG (small enough for the repository),
    with an optional footer line (the command and machine that made it); folders are made as
    needed. Returns ``path`` as a string."""
    path = Path(path)
    if footer:  # below the figure's own area: it never covers an axis label
        width = max(40, int(fig.get_figwidth() * 21))  # characters per line at 6.5 pt
        fig.text(
            0.005,
            -0.005,
            textwrap.fill(footer, width),
            fontsize=6.5,
            color="#555555",
            ha="left",
            va="top",
        )
    buf = io.BytesIO()
    # "tight": the saved area grows to hold every text (the footer, a title wider than the axes)
    fig.savefig(buf, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.08)
    buf.seek(0)
    with Image.open(buf) as im, atomic_path(path) as tmp:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            tmp, format="PNG", optimize=True
        )
    return str(path)


def jsonable(v: Any) -> Any:
    """Nested dicts, lists, numpy arrays and scalars as plain JSON types; non-finite floats become
    None (JSON has no NaN), dict keys strings."""
    if isinstance(v, dict):
        return {(k if isinstance(k, str) else str(k)): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    return v


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary name next to ``path`` to write to; renamed over ``path`` when the block ends
    without error, removed otherwise. Readers see the old file or the new one, never a part.
    Folders are made as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return str(path)


def write_json(path, obj: Any, indent: int = 1) -> str:
    """Writes :func:`jsonable` ``obj`` to ``path`` atomically (:func:`atomic_path`)."""
    return write_text(path, json.dumps(jsonable(obj), indent=indent) + "\n")


def machine_info() -> dict:
    """Platform, processor, CPU count, jax version and backend, load average."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = os.cpu_count()
    return dict(
        platform=platform.platform(),
        processor=platform.machine(),
        cpu_count=os.cpu_count(),
        cpus_available=avail,
        jax=jax.__version__,
        backend=jax.default_backend(),
        loadavg=load,
    )


# ----------------------------------------------------------------------------------------------
# Data and cache locations
# ----------------------------------------------------------------------------------------------


def shared_data(*parts: str) -> str | None:
    """``$LDJAX_DATA/<parts>`` if ``LDJAX_DATA`` is set and that path exists, else None."""
    root = os.environ.get("LDJAX_DATA")
    if not root:
        return None
    p = Path(root, *parts)
    return str(p) if p.exists() else None


def cache_dir() -> Path:
    """``$LDJAX_CACHE``, else ``~/.cache/ldjax``."""
    return Path(os.environ.get("LDJAX_CACHE", Path.home() / ".cache" / "ldjax"))


# ----------------------------------------------------------------------------------------------
# The command-line grammar
# ----------------------------------------------------------------------------------------------


def _number(kind, lo, strict: bool, what: str):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or (v <= lo if strict else v < lo):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = what
    return parse


def int_at_least(n: int):
    """An argparse ``type``: an integer >= ``n`` (a usage error otherwise)."""
    return _number(int, n, False, f"an integer >= {n}")


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
positive_float = _number(float, 0.0, True, "a number > 0")

_COMMON = {
    "out": lambda p, d: p.add_argument("--out", default=d, help=f"output folder (default {d})"),
    "data": lambda p, d: p.add_argument("--data", default=None, help=d),
    "config": lambda p, d: p.add_argument(
        "--config", default=None, help="JSON config, full or partial, merged onto the preset"
    ),
    "quick": lambda p, d: p.add_argument(
        "--quick", action="store_true", help=d or "the quick preset: small and fast (CI)"
    ),
    "seed": lambda p, d: p.add_argument("--seed", type=nonneg_int, default=d, help="random seed"),
    "progress": lambda p, d: p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    ),
    "resume": lambda p, d: (
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue interrupted training from its newest checkpoint (a damaged one is an "
            "error)",
        ),
        p.add_argument(
            "--resume-older-checkpoint",
            action="store_true",
            help="with --resume: if the newest checkpoint fails its checks, resume from the "
            "newest older one that passes (printed on stderr; the rejected one is kept as "
            "<step>.rejected)",
        ),
    ),
    "figures_dir": lambda p, d: p.add_argument(
        "--figures-dir", default=None, help="also copy the figures here (e.g. benchmarks/results)"
    ),
    "no_plots": lambda p, d: p.add_argument(
        "--no-plots", action="store_true", help="skip the figures"
    ),
    "cache": lambda p, d: (
        p.add_argument(
            "--cache-dir",
            default=None,
            help="pretrained-model cache (default $LDJAX_CACHE or ~/.cache/ldjax)",
        ),
        p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache"),
    ),
}


def add_common_arguments(parser: argparse.ArgumentParser, **which) -> argparse.ArgumentParser:
    """Adds the flags every ``ldjax`` command spells the same way: ``add_common_arguments(p,
    out="out/mnist", data="help text", quick=None, seed=0, progress=None, ...)`` (the value is
    the default or the help text, by flag)."""
    for name, arg in which.items():
        if name not in _COMMON:
            raise ValueError(f"unknown common argument {name!r}")
        _COMMON[name](parser, arg)
    return parser


def progress_enabled(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress``, else whether stderr is a terminal."""
    p = getattr(args, "progress", None)
    return sys.stderr.isatty() if p is None else bool(p)


# ----------------------------------------------------------------------------------------------
# Output folders that survive failures
# ----------------------------------------------------------------------------------------------


def check_writable(path, flag: str = "--out") -> Path:
    """Fails at once, naming ``flag``, if ``path`` is not a folder that can be written, or cannot
    be created. Nothing is left behind: a temporary folder is made and removed inside ``path``,
    or, when ``path`` does not exist yet, inside its nearest existing parent."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p}: exists and is not a folder")
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {p}: cannot write there ({probe} is not a folder)")
    try:
        with tempfile.TemporaryDirectory(dir=probe, prefix=".ldjax-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {p}: cannot write there ({e.strerror or e})") from None
    return p


@contextmanager
def staged_output(out) -> Iterator[Path]:
    """A fresh staging folder (``out/.staging-*``) for a run's results; on success its files
    replace those in ``out`` (file by file, each by an atomic rename), on failure (an exception,
    Ctrl-C) it is removed and ``out`` keeps its previous results untouched. ``out`` is checked
    for writability first (:func:`check_writable`)."""
    out = check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for src in sorted(stage.rglob("*")):
        if src.is_file():
            dst = out / src.relative_to(stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    shutil.rmtree(stage, ignore_errors=True)
