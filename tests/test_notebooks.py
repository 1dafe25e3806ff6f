"""The notebooks run top to bottom in a fresh kernel (quick mode), and are committed clean."""

import json
import os
import shutil
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_walkthrough.ipynb", "02_numerics.ipynb", "03_performance.ipynb"]


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("NBGN_NOTEBOOK_QUICK", "1")  # the kernel inherits it: small sizes
    workdir = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, workdir)  # run from a copy of notebooks/, outputs not written back
    notebook = nbformat.read(workdir / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError on any error
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs_and_without_machine_paths(name):
    text = (NOTEBOOKS / name).read_text()
    for path in ("/work/", "/root/", "/home/", "/tmp/"):
        assert path not in text
    notebook = json.loads(text)
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["execution_count"] for cell in code_cells)
    images = [
        output
        for cell in code_cells
        for output in cell["outputs"]
        if "image/png" in output.get("data", {})
    ]
    assert images
    assert notebook["metadata"]["kernelspec"]["display_name"] == "Python 3"
    assert all(not cell.get("metadata") for cell in notebook["cells"])


@pytest.mark.parametrize("figure", ["01_walkthrough.png", "02_numerics.png", "03_performance.png"])
def test_readme_figures_exist(figure):
    assert (NOTEBOOKS / "figures" / figure).stat().st_size > 10_000
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    assert f"notebooks/figures/{figure}" in readme


def test_notebook_environment_is_not_leaking():
    assert os.environ.get("NBGN_NOTEBOOK_QUICK") in (None, "0", "1")
