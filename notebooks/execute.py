#!/usr/bin/env python
"""Executes the notebooks in place (their outputs are committed), or checks the committed ones.

  python notebooks/execute.py [NAME ...]            # execute (default: every notebooks/*.ipynb)
  python notebooks/execute.py [NAME ...] --check    # execute nothing; verify what is committed

NAME is a notebook's path, file name, stem or unique prefix (``01``, ``02_squeezing_effect``, ...).

Executing: each notebook runs top to bottom with nbclient (kernel ``python3``) in a fresh
temporary folder, with this checkout first on ``PYTHONPATH`` (so the checkout's ``ldjax`` is the
one imported) and the inline matplotlib backend (figures become ``image/png`` outputs, whatever
``MPLBACKEND`` is set to outside). A cell error fails the run and leaves the notebook file as it
was. Per-cell execution timestamps are not recorded. Inline figures are stored as 256-colour
palette PNGs (as :func:`ldjax.experiments.common.save_figure` writes them; same pixel size and
dpi, about a third of the bytes). The notebook's metadata gets ``metadata["ldjax"]``:
``executed_code_sha256`` (see :func:`code_sha256`), the ldjax, jax and Python versions, whether
``LDJAX_DATA`` was set, the wall time and the kernel's CPU time.

Checking (CI, ``tests/test_notebooks.py``): for each notebook, the SHA-256 of its code cells must
equal the stored ``executed_code_sha256`` (so the committed outputs come from the committed
code), every code cell must carry an execution count (1, 2, ... in order: one top-to-bottom run),
no output may be an error, and at least one output must be an inline figure (``image/png``).
Markdown edits do not need a re-run; any code edit does. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat
from PIL import Image

NB_DIR = Path(__file__).resolve().parent
ROOT = NB_DIR.parent
KERNEL = "python3"
CELL_TIMEOUT_S = 900
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
META_KEY = "ldjax"


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def code_sha256(nb) -> str:
    """SHA-256 (hex) of the sources of the notebook's code cells, in order, joined by NUL bytes
    (a plain dict from ``json.load`` or an ``nbformat`` node; ``source`` as a string or lines)."""
    sources = [_source(c) for c in nb["cells"] if c.get("cell_type") == "code"]
    return hashlib.sha256("\0".join(sources).encode("utf-8")).hexdigest()


def notebooks(names=()) -> list[Path]:
    """The notebooks named (path, file name, stem or unique prefix), default all, sorted."""
    every = sorted(NB_DIR.glob("*.ipynb"))
    if not names:
        return every
    out = []
    for name in names:
        p = Path(name)
        if p.suffix == ".ipynb" and p.exists():
            out.append(p.resolve())
            continue
        stem = p.name[: -len(".ipynb")] if p.name.endswith(".ipynb") else p.name
        exact = [q for q in every if q.stem == stem]
        hits = exact or [q for q in every if q.stem.startswith(stem)]
        if len(hits) != 1:
            raise SystemExit(
                f"execute.py: {name!r} names {len(hits)} notebooks in {NB_DIR} "
                f"({', '.join(q.name for q in hits) or 'none'})"
            )
        out.append(hits[0])
    return out


# ----------------------------------------------------------------------------------------------
# --check
# ----------------------------------------------------------------------------------------------


def check_notebook(path) -> list[str]:
    """The problems of one committed notebook (empty: it passes). Reads JSON only, runs nothing."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"cannot read it as JSON ({e})"]
    problems = []
    meta = nb.get("metadata", {}).get(META_KEY, {})
    stored = meta.get("executed_code_sha256")
    now = code_sha256(nb)
    if not stored:
        problems.append(
            "no metadata.ldjax.executed_code_sha256: it was not executed with notebooks/execute.py"
        )
    elif stored != now:
        problems.append(
            f"its code cells changed since it was executed (code SHA-256 {now[:12]}…, "
            f"executed {stored[:12]}…)"
        )
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    counts = [c.get("execution_count") for c in code]
    if any(n is None for n in counts):
        missing = [i for i, n in enumerate(counts) if n is None]
        problems.append(f"code cells {missing} (0-based among code cells) were not executed")
    elif counts != list(range(1, len(code) + 1)):
        problems.append(
            f"execution counts {counts} are not 1..{len(code)}: not one top-to-bottom run"
        )
    n_out = n_png = 0
    for i, c in enumerate(code):
        for o in c.get("outputs", []):
            n_out += 1
            if o.get("output_type") == "error":
                problems.append(
                    f"code cell {i} has an error output: {o.get('ename')}: {o.get('evalue')}"
                )
            if "image/png" in o.get("data", {}):
                n_png += 1
    if n_out == 0:
        problems.append("no outputs: commit it executed (python notebooks/execute.py)")
    elif n_png == 0:
        problems.append("no inline figure (image/png output)")
    return problems


def check(paths) -> int:
    """Checks every notebook in ``paths``; prints one line per problem. Returns the exit status."""
    bad = 0
    for p in paths:
        problems = check_notebook(p)
        for msg in problems:
            print(f"{Path(p).name}: {msg}", file=sys.stderr)
        if problems:
            bad += 1
        else:
            print(f"{Path(p).name}: ok", flush=True)
    if bad:
        print(
            f"{bad} notebook(s) fail the check; re-execute with: python notebooks/execute.py "
            "[names]",
            file=sys.stderr,
        )
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------
# execution
# ----------------------------------------------------------------------------------------------


def _versions() -> dict:
    m = re.search(
        r'^__version__\s*=\s*["\']([^"\']+)',
        (ROOT / "ldjax" / "__init__.py").read_text(),
        re.MULTILINE,
    )
    out = {"ldjax_version": m.group(1) if m else None}
    for pkg in ("jax", "jaxlib"):
        try:
            out[f"{pkg}_version"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[f"{pkg}_version"] = None
    out["python_version"] = platform.python_version()
    return out


def compact_png(b64: str) -> str:
    """A base64 PNG re-encoded as a 256-colour palette PNG on white (what ``save_figure`` writes),
    if that is smaller; else unchanged."""
    raw = base64.b64decode(b64)
    with Image.open(io.BytesIO(raw)) as im:
        im = im.convert("RGBA")
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
    buf = io.BytesIO()
    flat.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        buf, format="png", optimize=True
    )
    out = buf.getvalue()
    return base64.b64encode(out).decode("ascii") + "\n" if len(out) < len(raw) else b64


def kernel_env() -> dict:
    """The kernel's environment: this one, with the checkout first on PYTHONPATH and the inline
    matplotlib backend."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["MPLBACKEND"] = INLINE_BACKEND
    return env


def execute_notebook(src, dst=None, *, timeout: int = CELL_TIMEOUT_S):
    """Runs the notebook ``src`` top to bottom in a temporary folder and writes it, with its outputs
    and ``metadata.ldjax``, to ``dst`` (default: ``src``, in place). On a cell error raises
    ``nbclient.exceptions.CellExecutionError`` and writes nothing.

    Returns ``(notebook, seconds)``.
    """
    src = Path(src)
    dst = src if dst is None else Path(dst)
    nb = nbformat.read(str(src), as_version=4)
    kernelspec = nb.metadata.get("kernelspec")
    with tempfile.TemporaryDirectory(prefix="ldjax_nb_") as cwd:
        client = nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name=KERNEL,
            record_timing=False,
            resources={"metadata": {"path": cwd}},
        )
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        client.execute(env=kernel_env())  # the kernel exits (and is reaped) before it returns
        seconds = time.time() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps, if any nbclient left
        if cell.cell_type == "code":
            for o in cell.get("outputs", []):
                o.get("metadata", {}).pop("execution", None)
                if "image/png" in o.get("data", {}):
                    o["data"]["image/png"] = compact_png(o["data"]["image/png"])
    if kernelspec is not None:
        nb.metadata["kernelspec"] = kernelspec  # keep the plain "Python 3" spec (Colab's)
    nb.metadata[META_KEY] = {
        "executed_code_sha256": code_sha256(nb),
        **_versions(),
        "ldjax_data_set": bool(os.environ.get("LDJAX_DATA")),
        "wall_time_s": round(seconds, 1),
        "kernel_cpu_time_s": round(cpu, 1),
        "executed_by": "python notebooks/execute.py",
    }
    nbformat.validate(nb)
    tmp = dst.with_name(f".{dst.name}.tmp")
    nbformat.write(nb, str(tmp))
    os.replace(tmp, dst)
    return nb, seconds


def execute(paths) -> int:
    failed = 0
    for p in paths:
        print(f"{p.name}: executing ...", flush=True)
        try:
            nb, seconds = execute_notebook(p)
        except nbclient.exceptions.CellExecutionError as e:
            print(
                f"{p.name}: a cell failed (the notebook file is unchanged):\n{e}", file=sys.stderr
            )
            failed += 1
            continue
        size = p.stat().st_size
        cpu = nb.metadata[META_KEY]["kernel_cpu_time_s"]
        print(
            f"{p.name}: done in {seconds:.1f} s (kernel CPU {cpu:.1f} s), {size / 1e6:.2f} MB",
            flush=True,
        )
        problems = check_notebook(p)
        for msg in problems:
            print(f"{p.name}: {msg}", file=sys.stderr)
        failed += bool(problems)
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python notebooks/execute.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("names", nargs="*", help="notebooks (path, name, stem or prefix); default all")
    ap.add_argument(
        "--check",
        action="store_true",
        help="execute nothing: fail if a committed notebook's code differs from what was "
        "executed, or its outputs are missing or hold an error",
    )
    args = ap.parse_args(argv)
    paths = notebooks(args.names)
    if not paths:
        print(f"no notebooks in {NB_DIR}", file=sys.stderr)
        return 1
    return check(paths) if args.check else execute(paths)


if __name__ == "__main__":
    sys.exit(main())
