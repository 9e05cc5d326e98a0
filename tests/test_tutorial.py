"""The tutorial notebook (docs/tutorial.ipynb, paired with docs/tutorial.py by jupytext) runs from start to end
in a Jupyter kernel, and its two forms hold the same cells."""
import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK, SCRIPT = ROOT / "docs" / "tutorial.ipynb", ROOT / "docs" / "tutorial.py"


def _cells(notebook):
  return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_the_notebook_and_its_script_hold_the_same_cells():
  ipynb, script = jupytext.read(NOTEBOOK), jupytext.read(SCRIPT)
  assert _cells(ipynb) == _cells(script), ("docs/tutorial.ipynb and docs/tutorial.py differ: after editing one, "
                                           "run jupytext --sync docs/tutorial.py")
  assert all(not c.get("outputs") for c in nbformat.read(NOTEBOOK, 4).cells if c.cell_type == "code"), \
      "commit the notebook without outputs (CI makes them)"


def test_the_tutorial_runs_start_to_end(tmp_path, monkeypatch):
  monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path / "work"))
  notebook = nbformat.read(NOTEBOOK, 4)
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT / "docs")}})
  client.execute()  # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(images) == 3  # Training curves, the probe's comparison, the attention and Grad-CAM maps.
  assert "all 209 rows are usable" in text and "210: " in text  # The checker: the bad row, then a clean manifest.
  assert "| image to report |" in text and "zero-shot balanced accuracy" in text
  assert {p.name for p in (tmp_path / "work").iterdir()} >= {"weights", "refine", "probe", "retrieval", "explain.png"}
