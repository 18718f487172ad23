"""The MPI backend runs the same program under mpiexec: same ring, same numbers as the mp backend.

Skipped with the reason when mpi4py or mpiexec is missing (the `[mpi]` extra installs both).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama3np.parallel import engine as E
from llama3np.training import run_folder as ckpt

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--override", "dim=32", "--override", "n_layers=2", "--override", "n_heads=4", "--override", "n_kv_heads=2",
        "--override", "hidden_dim=64", "--vocab-size", "520", "--steps", "3", "--batch-size", "8", "--seq-len", "16",
        "--n-stories", "60", "--val-stories", "5", "--save-every", "3", "--dtype", "float64"]  # keeps step 0 too


def _mpiexec():
    pytest.importorskip("mpi4py", reason="the mpi backend needs mpi4py: pip install -e '.[mpi]'")
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found: pip install -e '.[mpi]' installs MPICH's")
    return exe


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", LLAMA3NP_NUM_THREADS="1")
    return env


def _final(run):
    return ckpt.read_checkpoint(ckpt.list_checkpoints(run)[0])["params"]


@pytest.mark.timeout(120)
def test_mpiexec_pp2_gives_the_bits_of_the_mp_backend(tmp_path):
    mpiexec = _mpiexec()
    grid = ["--pp", "2", "--micro-batches", "2"]
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "llama3np.parallel.cli", "train", "--comm", "mpi",
                        "--out", str(tmp_path / "mpi"), *ARGS, *grid], env=_env(), capture_output=True, text=True,
                       timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "llama3np.parallel.cli", "train", "--comm", "mp",
                        "--out", str(tmp_path / "mp"), *ARGS, *grid], env=_env(), capture_output=True, text=True,
                       timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _final(tmp_path / "mpi"), _final(tmp_path / "mp")
    for n in b:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


@pytest.mark.timeout(60)
def test_mpiexec_with_the_wrong_number_of_processes_says_how_many_it_needs(tmp_path):
    mpiexec = _mpiexec()
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "llama3np.parallel.cli", "train", "--comm", "mpi",
                        "--out", str(tmp_path / "x"), *ARGS, "--dp", "2", "--tp", "2"], env=_env(),
                       capture_output=True, text=True, timeout=50)
    assert r.returncode != 0 and r.stderr.count("mpiexec -n 4") == 1  # printed once, by rank 0


@pytest.mark.timeout(120)
def test_mpiexec_dp2_tp2_trains_to_the_single_process_weights(tmp_path):
    """The equivalence table's (2,2,1) under MPI: within 1e-12 of one process in float64."""
    from threadpoolctl import threadpool_limits

    mpiexec = _mpiexec()
    out = tmp_path / "mpi"
    r = subprocess.run([mpiexec, "-n", "4", sys.executable, "-m", "llama3np.parallel.cli", "train", "--comm", "mpi",
                        "--out", str(out), *ARGS, "--dp", "2", "--tp", "2"], env=_env(), capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    with threadpool_limits(1):
        reference = E.reference_train(out, 3, np.float64).params
    ours = _final(out)
    assert E.relative_error(ours, reference) < 1e-12
