"""The lab notebooks (notebooks/*.ipynb) run headless at the tiny size, are committed without
outputs and match their .py pairs: the same checks as tests/test_tutorials.py, for every notebook.

Each notebook is executed with nbclient in a python3 kernel (the interpreter running the tests),
with DISTZO2_TUTORIAL_SIZE=tiny and every Jupyter / IPython directory in a temporary folder; the
kernel's working directory is a fresh temporary folder, so runs/ and caches land there.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TINY_BUDGET_S = 180  # each notebook is meant to take well under 60 s at the tiny size; CI machines vary


def _ids(paths):
    return [p.stem for p in paths]


def test_the_layout_tuner_is_there():
    assert "layout_tuner.ipynb" in [p.name for p in NOTEBOOKS]


@pytest.fixture
def jupyter_env(tmp_path, monkeypatch):
    for var in ("IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        d = tmp_path / var.lower()
        d.mkdir()
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("DISTZO2_TUTORIAL_SIZE", "tiny")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    work = tmp_path / "work"
    work.mkdir()
    return work


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes_at_tiny_size(path, jupyter_env):
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(jupyter_env)}}).execute()
    elapsed = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    text = _stdout(nb)
    assert "False" not in text, f"a check the notebook prints came out False:\n{text}"
    assert elapsed < TINY_BUDGET_S, f"{path.name} took {elapsed:.0f} s at the tiny size"


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
