"""Sphinx configuration of the ldjax docs (Sphinx + MyST-NB, furo theme).

Build from the repository root (warnings are errors, as in CI):

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

Nothing is executed or downloaded at build time. Before the sources are read this file

* copies ``notebooks/*.ipynb`` into ``docs/notebooks/`` (ignored by git; the copies are rendered
  with the outputs they were committed with, ``nb_execution_mode = "off"``), and
* writes the ``--help`` text of every ``ldjax`` command into ``docs/_generated/cli/`` (ignored),
  which ``guides/cli.md`` includes.

Both only rewrite a file whose content changed, so incremental builds stay incremental.
See ``docs/README.md``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(ROOT))  # document the ldjax of this checkout

import ldjax  # noqa: E402  (sets its XLA flag before anything else starts jax)

# -- project -----------------------------------------------------------------------------------

project = "ldjax"
author = "the ldjax authors"
copyright = "the ldjax authors; Apache-2.0"
release = ldjax.__version__
version = release

# -- extensions --------------------------------------------------------------------------------

extensions = [
    "myst_nb",  # MyST markdown pages and .ipynb notebooks (loads myst_parser itself)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
root_doc = "index"
smartquotes = False  # keep primes and quotes as written (y_rnd', the paper's)
exclude_patterns = ["_build", "_generated", "README.md", "requirements.txt", "**.ipynb_checkpoints"]
templates_path: list[str] = []

# -- MyST / MyST-NB ----------------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # never run a notebook while building; show the committed outputs

# -- autodoc -----------------------------------------------------------------------------------

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_class_signature = "separated"
autodoc_preserve_defaults = True
autosummary_generate = False  # explicit autosummary tables only; no stub files anywhere
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, so dataclass fields are not described twice

# -- HTML --------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"ldjax {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False

# -- build-time inputs (ignored folders) -------------------------------------------------------

NOTEBOOKS_SRC = ROOT / "notebooks"
NOTEBOOKS_DST = DOCS / "notebooks"  # ignored by git
GENERATED = DOCS / "_generated"  # ignored by git

# (file name, module whose main(argv) is the command, argv)
CLI_HELP = [
    ("ldjax.txt", "ldjax.experiments.cli", ["--help"]),
    ("mnist.txt", "ldjax.experiments.mnist.cli", ["--help"]),
    ("squeeze.txt", "ldjax.experiments.squeeze.cli", ["--help"]),
    ("lm.txt", "ldjax.experiments.lm.cli", ["--help"]),
    ("reproduce.txt", "ldjax.experiments.reproduce.cli", ["--help"]),
]


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def copy_notebooks() -> None:
    """``notebooks/*.ipynb`` -> ``docs/notebooks/``; removes copies whose source is gone."""
    NOTEBOOKS_DST.mkdir(exist_ok=True)
    sources = sorted(NOTEBOOKS_SRC.glob("*.ipynb"))
    names = {p.name for p in sources}
    for stale in NOTEBOOKS_DST.glob("*.ipynb"):
        if stale.name not in names:
            stale.unlink()
    for src in sources:
        _write_if_changed(NOTEBOOKS_DST / src.name, src.read_bytes())


def write_cli_help() -> None:
    """The ``--help`` text of each command, as argparse prints it (100 columns)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        for name, module, argv in CLI_HELP:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    importlib.import_module(module).main(list(argv))
                except SystemExit:
                    pass
            _write_if_changed(GENERATED / "cli" / name, buf.getvalue().encode())
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


copy_notebooks()
write_cli_help()


def _drop_builtin_type_docstring(app, what, name, obj, options, lines):
    """``autodata`` of a constant without a doc comment shows its type's docstring (a tuple's:
    "Built-in immutable sequence. ..."); drop it, the page describes the constant instead."""
    type_doc = type(obj).__doc__
    type_doc = type_doc.strip() if isinstance(type_doc, str) else ""  # a slot descriptor: none
    if (
        what == "data"
        and lines
        and type_doc
        and lines[0].strip() == type_doc.splitlines()[0].strip()
    ):
        lines[:] = []


def _check_api_coverage(app, env):
    """Every public module of ldjax must be on an API page (``docs/api/*.md``): a module added to
    the package without a page entry fails the build here instead of going missing silently."""
    import pkgutil

    from sphinx.util import logging

    documented = set(env.get_domain("py").modules)
    public = {"ldjax"} | {
        m.name
        for m in pkgutil.walk_packages(ldjax.__path__, "ldjax.")
        if not any(part.startswith("_") for part in m.name.split("."))
    }
    for name in sorted(public - documented):
        logging.getLogger(__name__).warning(
            "module %s is on no API page: add an automodule for it to the page of its package in "
            "docs/api/",
            name,
        )


def setup(app):
    app.connect("env-check-consistency", _check_api_coverage)
    app.connect("autodoc-process-docstring", _drop_builtin_type_docstring)
