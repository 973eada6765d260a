"""The layout holds: the engine knows nothing above it, layers import downward only, no private
names cross module boundaries, the public face is declared, and old import paths still work."""

import ast
import importlib
import pathlib

import pytest

import ldjax
from ldjax import _moved

ROOT = pathlib.Path(ldjax.__file__).parent

# what each part of the package may import from ldjax (prefixes of dotted module names)
ENGINE = ("ldjax._src",)
ALLOWED = {
    "ldjax._src": ENGINE,
    "ldjax.losses": ENGINE,
    "ldjax.zoo": (),
    "ldjax._moved": (),
    "ldjax.__main__": ("ldjax.experiments",),
    "ldjax.data": ENGINE + ("ldjax.data",),
    "ldjax.training": ENGINE + ("ldjax.training",),
    "ldjax.mnist": ENGINE + ("ldjax.losses", "ldjax.data", "ldjax.training", "ldjax.mnist"),
    "ldjax.lm": ENGINE + ("ldjax.losses", "ldjax.data", "ldjax.training", "ldjax.lm"),
    "ldjax.llm": ENGINE + ("ldjax.losses", "ldjax.data", "ldjax.lm", "ldjax.llm"),
    "ldjax.experiments": None,  # the top: anything in ldjax
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _ldjax_imports(tree):
    """``(imported module, names)`` of every ``import ldjax...`` / ``from ldjax... import``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "ldjax" or a.name.startswith("ldjax."):
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ldjax" or node.module.startswith("ldjax."):
                yield node.module, [a.name for a in node.names], node.lineno


def _layer(name):
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def test_every_module_belongs_to_a_layer_and_imports_downward_only():
    bad = []
    for name, path in _modules():
        if name == "ldjax":
            continue
        layer = _layer(name)
        assert layer is not None, f"{name} belongs to no layer of the layout"
        allowed = ALLOWED[layer]
        if allowed is None:
            continue
        for mod, names, line in _ldjax_imports(ast.parse(path.read_text(encoding="utf-8"))):
            targets = [mod] if mod != "ldjax" else [f"ldjax.{n}" for n in names]
            for target in targets:
                if not any(target == a or target.startswith(a + ".") for a in allowed):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_module_boundary():
    bad = []
    for _, path in _modules():
        for mod, names, line in _ldjax_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for n in names:
                if (
                    n.startswith("_")
                    and not n.startswith("__")
                    and mod != "ldjax._src"
                    and f"{mod}.{n}" != "ldjax._moved"
                ):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {mod}.{n}")
    assert not bad, "\n".join(bad)


def test_no_library_module_picks_a_matplotlib_backend():
    users = [str(p) for _, p in _modules() if "matplotlib.use(" in p.read_text(encoding="utf-8")]
    assert not users


def test_public_face_is_declared():
    assert set(ldjax.__all__) <= set(dir(ldjax))
    for name in ("A", "G", "entk", "entk_vp", "decompose", "actual_step", "compare", "losses"):
        assert name in ldjax.__all__
    assert all(not n.startswith("_") for n in ldjax.__all__)


@pytest.mark.parametrize("old,new", sorted(_moved.MOVED.items()))
def test_old_import_paths_give_the_moved_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_documented_old_names_still_import():
    from ldjax.experiments.lm.tracking import ProbeTracker as P2
    from ldjax.lm.config import QUICK, PipelineConfig  # noqa: F401
    from ldjax.lm.tracking import ProbeTracker
    from ldjax.mnist.analysis import StepTracker
    from ldjax.reproduce.claims import CLAIMS
    from ldjax.squeeze.lm import lm_squeeze, load_lm, plot_lm_squeeze, pretrain_tiny, save_lm  # noqa: F401

    assert ProbeTracker is P2 and StepTracker.__module__ == "ldjax.experiments.mnist.analysis"
    assert len(CLAIMS) >= 18


def test_the_engine_imports_without_the_experiments_extra():
    """``pip install ldjax`` (jax, numpy, optax) is enough for the engine and the data."""
    import subprocess
    import sys

    code = (
        "import sys, ldjax, ldjax.zoo, ldjax.data.mnist, ldjax.data.preferences; "
        "print(sorted(m for m in ('flax', 'orbax', 'matplotlib', 'tqdm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
