"""The notebooks in notebooks/*.ipynb: committed executed, and still executable.

* fast: ``notebooks/execute.py --check`` on every committed notebook: the SHA-256 of its code
  cells equals the one stored when ``python notebooks/execute.py`` executed it, every code cell
  ran (counts 1..n), no output is an error, and it has inline figures. Reads JSON only (< 2 s).
* slow: each notebook executed from a temporary copy by the same runner (kernel ``python3`` in a
  temporary folder, this checkout first on PYTHONPATH, the inline matplotlib backend): no cell
  fails, no error output, at least one ``image/png`` output.
"""

import importlib.util
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNNER = ROOT / "notebooks" / "execute.py"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _runner():
    spec = importlib.util.spec_from_file_location("ldjax_notebooks_execute", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


execute = _runner()


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == [p.name for p in execute.notebooks()]
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_matches_its_execution(path):
    t0 = time.time()
    problems = execute.check_notebook(path)
    assert not problems, (
        f"{path.name}: "
        + "; ".join(problems)
        + f"\nre-execute it: python notebooks/execute.py {path.stem}"
    )
    assert time.time() - t0 < 2.0


def test_check_detects_a_code_edit(tmp_path):
    """A copy whose code changed (or whose outputs were cleared) fails --check, named."""
    import json

    src = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    edited = json.loads(json.dumps(src))
    cell = next(c for c in edited["cells"] if c["cell_type"] == "code")
    cell["source"] = ["".join(cell["source"]) + "\n# edited\n"]
    (tmp_path / "edited.ipynb").write_text(json.dumps(edited), encoding="utf-8")
    assert any(
        "changed since it was executed" in p
        for p in execute.check_notebook(tmp_path / "edited.ipynb")
    )
    cleared = json.loads(json.dumps(src))
    for c in cleared["cells"]:
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
    (tmp_path / "cleared.ipynb").write_text(json.dumps(cleared), encoding="utf-8")
    assert execute.check_notebook(tmp_path / "cleared.ipynb")
    errored = json.loads(json.dumps(src))
    cell = next(c for c in errored["cells"] if c["cell_type"] == "code")
    cell["outputs"].append(
        {"output_type": "error", "ename": "ValueError", "evalue": "x", "traceback": []}
    )
    (tmp_path / "errored.ipynb").write_text(json.dumps(errored), encoding="utf-8")
    assert any("error output" in p for p in execute.check_notebook(tmp_path / "errored.ipynb"))
    # the command line names the failing notebook and exits non-zero
    r = subprocess.run(
        [sys.executable, str(RUNNER), "--check", str(tmp_path / "edited.ipynb")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "edited.ipynb" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    try:
        nb, _ = execute.execute_notebook(copy)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no inline figure"
    assert not execute.check_notebook(copy)
