"""Import paths that moved when the experiments left the library, kept working as aliases.

``import ldjax.squeeze.lm`` (and every other path below) still works and gives the module at its
new place, the very same object, so scripts written against ldjax 0.1 keep running. ``python -m``
works through the aliases too. New code should import the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "ldjax.squeeze": "ldjax.experiments.squeeze",
    "ldjax.squeeze.lm": "ldjax.experiments.squeeze.lm",
    "ldjax.squeeze.toy": "ldjax.experiments.squeeze.toy",
    "ldjax.squeeze.plots": "ldjax.experiments.squeeze.plots",
    "ldjax.squeeze.cli": "ldjax.experiments.squeeze.cli",
    "ldjax.reproduce": "ldjax.experiments.reproduce",
    "ldjax.reproduce.claims": "ldjax.experiments.reproduce.claims",
    "ldjax.reproduce.cli": "ldjax.experiments.reproduce.cli",
    "ldjax.mnist.analysis": "ldjax.experiments.mnist.analysis",
    "ldjax.mnist.plots": "ldjax.experiments.mnist.plots",
    "ldjax.mnist.cli": "ldjax.experiments.mnist.cli",
    "ldjax.lm.tracking": "ldjax.experiments.lm.tracking",
    "ldjax.lm.one_step": "ldjax.experiments.lm.one_step",
    "ldjax.lm.plots": "ldjax.experiments.lm.plots",
    "ldjax.lm.cli": "ldjax.experiments.lm.cli",
    "ldjax.cli": "ldjax.experiments.cli",
}
"""Old dotted path -> new dotted path."""


def new_name(name: str):
    """The new dotted path of ``name`` (a moved module, or a module inside a moved package)."""
    if name in MOVED:
        return MOVED[name]
    for old, new in MOVED.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the module at its new path."""

    def find_spec(self, name, path=None, target=None):
        new = new_name(name)
        if new is None:
            return None
        spec = importlib.util.find_spec(new)
        return importlib.util.spec_from_loader(
            name, self, is_package=spec.submodule_search_locations is not None
        )

    def create_module(self, spec):
        return importlib.import_module(new_name(spec.name))

    def exec_module(self, module):
        pass

    def get_code(self, name):
        """The new module's code, so that ``python -m <old path>`` runs it."""
        new = new_name(name)
        return importlib.util.find_spec(new).loader.get_code(new)


def install() -> None:
    """Puts the alias finder first on ``sys.meta_path`` (once): it answers only for old paths,
    and must answer before the path finder would load a second copy of a moved module."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
