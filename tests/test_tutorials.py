"""The tutorials and the lab notebooks run headless at the tiny size, are committed without outputs,
and match their .py pairs.

Each tutorials/*.ipynb and notebooks/*.ipynb is executed top to bottom with nbclient in a python3 kernel (the one of the
interpreter running the tests) with DISTZO2_TUTORIAL_SIZE=tiny and every Jupyter / IPython
directory redirected into a temporary folder, so nothing in the user's home is read or written.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb")) + sorted((ROOT / "notebooks").glob("*.ipynb"))
TINY_BUDGET_S = 180  # each is meant to take well under 60 s at the tiny size; CI machines vary


def _ids(paths):
    return [p.stem for p in paths]


def test_tutorials_and_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert {"01_zo_basics.ipynb", "07_road_to_opt175b.ipynb", "08_beyond_mezo.ipynb"} <= set(names), names
    assert {"layout_tuner.ipynb", "overlap_profiler.ipynb", "sst2_finetune.ipynb"} <= set(names), names


@pytest.fixture
def jupyter_env(tmp_path, monkeypatch):
    """Tiny sizes and a private Jupyter / IPython home; returns the kernel's working directory."""
    for var in ("IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        d = tmp_path / var.lower()
        d.mkdir()
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("DISTZO2_TUTORIAL_SIZE", "tiny")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning of ipykernel
    work = tmp_path / "work"
    work.mkdir()
    return work


def _execute(nb, cwd: Path):
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_python3_kernel_is_this_interpreter(jupyter_env):
    """The "python3" kernel nbclient starts must be the interpreter running the tests (the venv's)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, sys, distzo2_lab; print(sys.prefix); print(os.environ['DISTZO2_TUTORIAL_SIZE'])")])
    prefix, size = _stdout(_execute(nb, jupyter_env)).split()
    assert prefix == sys.prefix, f"kernel python3 runs in {prefix}, the tests in {sys.prefix}"
    assert size == "tiny"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_tutorial_executes_at_tiny_size(path, jupyter_env):
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    _execute(nb, jupyter_env)
    elapsed = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    text = _stdout(nb)
    assert "False" not in text, f"a check the notebook prints came out False:\n{text}"
    assert elapsed < TINY_BUDGET_S, f"{path.name} took {elapsed:.0f} s at the tiny size"
    print(f"{path.name}: {elapsed:.1f} s at the tiny size")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata, "widget state saved in the notebook metadata"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs"
            assert cell.execution_count is None, f"cell {i} has an execution count"
        assert "execution" not in cell.metadata, f"cell {i} has execution timing metadata"
        assert "widgets" not in cell.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_matches_its_py_pair(path):
    pair = path.with_suffix(".py")
    assert pair.exists(), f"{path.name} has no paired {pair.name}"
    nb, py = jupytext.read(path), jupytext.read(pair)
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    assert [c.cell_type for c in nb.cells] == [c.cell_type for c in py.cells], "cell lists differ"
    for i, (a, b) in enumerate(zip(nb.cells, py.cells)):
        assert a.source == b.source, f"cell {i} differs between {path.name} and {pair.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_one_parameters_cell_reads_the_size(path):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    assert "DISTZO2_TUTORIAL_SIZE" in params[0].source
    assert sum("DISTZO2_TUTORIAL_SIZE" in c.source for c in nb.cells if c.cell_type == "code") == 1
