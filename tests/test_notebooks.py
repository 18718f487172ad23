"""Every notebook in notebooks/ runs top to bottom, and its .ipynb and .py (jupytext) twins agree.

The notebooks are executed in a fresh kernel with LLAMA3NP_NOTEBOOK_FAST=1 (tiny sizes, short runs),
inside a temporary folder so that nothing they write lands in the repository.
"""
import os
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _cells(nb):
    return [(c["cell_type"], c["source"].strip()) for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_matches_its_py_twin(path):
    jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[test]'")
    twin = path.with_suffix(".py")
    assert twin.exists(), f"{path.name} has no jupytext twin {twin.name}"
    assert _cells(jupytext.read(path)) == _cells(jupytext.read(twin)), \
        f"{path.name} and {twin.name} differ: run `jupytext --sync {twin}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    import json

    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, \
                f"{path.name} holds outputs: strip them (jupytext --to ipynb from the .py twin)"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]'")
    repo = str(path.parent.parent)
    monkeypatch.setenv("LLAMA3NP_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()


# The twins that start processes: the ones a script run can break (spawn re-imports the main script).
# The others run the same cells as their .ipynb, which test_notebook_runs already executes.
SCRIPTS = [p for p in sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("[0-9]*.py"))
           if any(word in p.read_text() for word in ("llama3np.parallel", "multiprocessing", "workers"))]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_notebook_twin_runs_as_a_script(path, tmp_path):
    """`python3 notebooks/NN_name.py` works too: the twins that start processes must not re-run
    themselves inside their children (spawn imports the main script; launch.run hides it)."""
    import subprocess
    import sys

    repo = str(path.parent.parent)
    env = {**os.environ, "LLAMA3NP_NOTEBOOK_FAST": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=230)
    assert r.returncode == 0, f"{path.name} failed as a script:\n{r.stderr[-3000:]}"
