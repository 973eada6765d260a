"""Every notebook in notebooks/*.ipynb runs top to bottom without an error (nbclient).

The kernel starts in a temporary folder (figures the notebooks write land there) and imports
ldjax from this checkout (the repository root is put first on PYTHONPATH).
"""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 900   # per cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(str(path), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell failed:\n{e}")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, f"{path.name}: error outputs {errors}"
