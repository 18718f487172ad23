"""Failure detection and recovery: after an injected kill, hang or NaN the supervisor restarts the group
from the last checkpoint and the run ends with the bits of a run that never failed."""
import shutil

import numpy as np
import pytest

from llama3np.parallel import engine as E
from llama3np.parallel import launch
from llama3np.parallel import supervisor as S
from llama3np.training import TrainConfig
from llama3np.training import run_folder as ckpt

OVERRIDES = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=520)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "base"
    cfg = TrainConfig(out=str(out), preset="tiny", model_overrides=OVERRIDES, steps=4, batch_size=8, seq_len=16,
                      progress=False, n_stories=60, val_stories=5, eval_every=1000, save_every=2, keep=10)
    return E.prepare_run(cfg, log=lambda m: None)


def supervised(base, tmp_path, name, faults=(), **kw):
    run = tmp_path / name
    shutil.copytree(base.out, run)
    cfg = TrainConfig(**{**base.__dict__, "out": str(run)})
    # communication timeout well above the heartbeat limit: a hang is found by its silence first
    summary = S.supervise(run, cfg, E.ParallelConfig(dp=2, faults=list(faults), timeout=30),
                          heartbeat_timeout=4.0, total_timeout=60, log=lambda m: None, **kw)
    return ckpt.read_checkpoint(ckpt.list_checkpoints(run)[0])["params"], summary


@pytest.fixture(scope="module")
def clean(base, tmp_path_factory):
    params, summary = supervised(base, tmp_path_factory.mktemp("clean"), "clean")
    assert summary["restarts"] == 0 and summary["failures"] == []
    return params


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault,kind,restart_from", [
    (("kill", 1, 4), "dead", 2),  # killed in step 4: steps 3 (done, not saved) and 4 are redone
    (("hang", 0, 3), "hung", 2),  # silent in step 3: found by the missing heartbeat
    (("nan", 1, 2), "nan", 0),  # a NaN loss on rank 1 in step 2, before the first checkpoint after step 0
])
def test_after_a_fault_the_run_restarts_and_ends_with_the_fault_free_bits(base, clean, tmp_path, fault, kind,
                                                                       restart_from):
    params, summary = supervised(base, tmp_path, fault[0], [fault])
    for n in clean:
        np.testing.assert_array_equal(params[n], clean[n], err_msg=n)
    assert summary["restarts"] == 1
    f = summary["failures"][0]
    assert (f["kind"], f["rank"], f["restart_from"]) == (kind, fault[1], restart_from)
    assert f["detect_s"] is not None and f["detect_s"] < (12.0 if kind == "hung" else 5.0)
    if kind == "hung":
        assert f["detect_s"] >= 4.0  # not before the heartbeat limit
    assert 0 < summary["goodput"] < 1 and summary["useful_s"] > 0


@pytest.mark.timeout(120)
def test_the_restart_budget_is_enforced_with_a_clear_error(base, tmp_path):
    with pytest.raises(RuntimeError, match="restart budget exhausted"):
        supervised(base, tmp_path, "budget", [("kill", 0, 1)], max_restarts=0)


def _raise_on_rank_1(pg):
    if pg.rank == 1:
        raise ValueError("a bad thing on rank 1")
    pg.recv(1)  # waits for a message that never comes: the failure of rank 1 must end this


@pytest.mark.timeout(60)
def test_a_worker_exception_stops_the_group_and_names_the_rank_and_the_error():
    with pytest.raises(launch.GroupFailure, match="rank 1 error.*a bad thing on rank 1"):
        launch.run(_raise_on_rank_1, 2, timeout=20, total_timeout=30)
