"""`llama3np parallel train`: the command runs a grid, survives an injected kill, writes llama3np train's
run folder plus trace.json, gantt.png and parallel.json; bad grids end with exit code 2 and one line."""
import json

import pytest

from llama3np.parallel import cli
from llama3np.training import run_folder as ckpt

ARGS = ["--override", "dim=32", "--override", "n_layers=2", "--override", "n_heads=4", "--override", "n_kv_heads=2",
        "--override", "hidden_dim=64", "--vocab-size", "520", "--steps", "4", "--batch-size", "8", "--seq-len", "16",
        "--n-stories", "60", "--val-stories", "5", "--save-every", "2"]


@pytest.mark.timeout(120)
def test_parallel_train_recovers_from_a_kill_and_writes_its_reports(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--out", str(out), *ARGS, "--dp", "2", "--pp", "2", "--micro-batches", "2",
                     "--inject-fault", "kill:3@3"])
    assert code == 0
    err = capsys.readouterr().err
    # progress as it goes (the parent's bar: rank 0's steps and loss), then a readable summary, not a dict
    assert "parallel train" in err and "loss=" in err
    assert "done: step 4 of 4 on dp=2 x tp=1 x pp=2 (4 processes, 1f1b)" in err and "1 restart(s)" in err
    assert "validation loss" in err and "entropy floor" in err and "{'step'" not in err
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"  # the --out help promises it
    assert ckpt.read_checkpoint(ckpt.list_checkpoints(out)[0])["meta"]["step"] == 4
    report = json.loads((out / "parallel.json").read_text())
    assert report["restarts"] == 1 and report["failures"][0]["rank"] == 3
    assert [r["peak_activations"] for r in sorted(report["ranks"], key=lambda r: r["rank"])] == [2, 2, 1, 1]
    trace = json.loads((out / "trace.json").read_text())
    assert {e["cat"] for e in trace["traceEvents"]} >= {"F", "B", "allreduce"}  # allreduce: one per DDP bucket
    assert (out / "gantt.png").read_bytes()[:4] == b"\x89PNG"
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # the steps redone after the kill once
    assert lines[-1]["step"] == 4 and lines[-1]["val_loss"] > lines[-1]["floor"]  # validated at the end


@pytest.mark.parametrize("grid,match", [(["--tp", "3"], "divisible by 3"), (["--pp", "3"], "at least as many layers"),
                                        (["--inject-fault", "boom:0@1"], "bad fault"),
                                        (["--override", "dimension=3"], "not a ModelArgs field"),
                                        (["--data", "/no/such/corpus"], "corpus path not found")])
def test_bad_grids_exit_with_code_2_and_one_clear_line(tmp_path, capsys, grid, match):
    code = cli.main(["train", "--out", str(tmp_path / "bad"), *ARGS, *grid])
    assert code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()  # rejected before anything was written


def test_the_llama3np_command_routes_parallel_train_and_its_exit_code(tmp_path, capsys):
    """`llama3np parallel train` is the same command as `python -m llama3np.parallel.cli train`."""
    from llama3np import cli as main_cli

    code = main_cli.main(["parallel", "train", "--out", str(tmp_path / "bad"), *ARGS, "--tp", "3"])
    assert code == 2 and "divisible by 3" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_repeated_loss_spikes_stop_every_rank_with_the_last_good_weights_saved(tmp_path):
    """llama3np train's rule (max_bad_steps spikes in a row: save and stop), decided alike on all ranks."""
    from llama3np.parallel import engine as E
    from llama3np.training import TrainConfig

    cfg = TrainConfig(out=str(tmp_path / "spiky"), preset="tiny", steps=12, batch_size=8, seq_len=16, progress=False,
                      n_stories=60, val_stories=5, eval_every=1000, save_every=100, keep=10, lr=30.0, warmup_steps=1,
                      spike_window=2, max_bad_steps=1, grad_clip=0,
                      model_overrides=dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=520))
    cfg = E.prepare_run(cfg, log=lambda m: None)
    out = E.run_grid(cfg.out, cfg, E.ParallelConfig(dp=2, dtype="float64"), total_timeout=60)
    assert out[0]["stopped"] == out[1]["stopped"] and "bad steps in a row" in out[0]["stopped"]
    last = out[0]["records"][-1]  # lr=30 blows the loss up within a few steps (which one depends on rounding)
    assert "loss spike" in last["skipped"] and last["step"] < cfg.steps
    assert ckpt.read_checkpoint(ckpt.list_checkpoints(cfg.out)[0])["meta"]["step"] == last["step"]


@pytest.mark.timeout(120)
def test_a_finished_parallel_run_resumed_says_so_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "done"
    assert cli.main(["train", "--out", str(out), *ARGS, "--steps", "2", "--dp", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--dp", "2"]) == 0
    err = capsys.readouterr().err
    assert "is finished: step 2 of 2" in err and "goodput" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # parallel.json, log.jsonl: untouched


def test_parallel_train_refuses_doc_mask_in_one_line(tmp_path, capsys):
    """Document masks are a single-process option for now: parallel train says so instead of ignoring it."""
    from llama3np.cli import main

    rc = main(["parallel", "train", "--out", str(tmp_path / "p"), "--dp", "2", "--steps", "2", "--doc-mask"])
    assert rc == 2 and "--doc-mask" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
