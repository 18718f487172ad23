"""What a new user trips on (issue 14), each checked: resume that takes the run's own config, extends
it and survives a moved folder; finished runs left alone; refused starts that leave nothing; big
checkpoints said, bounded and optionally weights-only; one-line messages; help with defaults."""
import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llama3np
from llama3np.cli import build_parser, main
from llama3np.training import TrainConfig, load_run, run_folder, start_run, train

ROOT = Path(__file__).resolve().parents[1]
MICRO = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=600, max_seq_len=64)
ARGS = [f"--override={k}={v}" for k, v in MICRO.items()] + [
    "--batch-size", "4", "--seq-len", "32", "--lr", "0.01", "--val-stories", "8", "--save-every", "2",
    "--eval-every", "2", "--no-progress"]


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A 4-step run made by the command (checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("usability") / "run4"
    assert main(["train", "--out", str(out), "--steps", "4", *ARGS]) == 0
    return out


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def _copy_without_last_checkpoint(run, dest):
    shutil.copytree(run, dest)
    run_folder.list_checkpoints(dest)[0].unlink()
    return run_folder.read_checkpoint(run_folder.list_checkpoints(run)[0])


# ---- resume ----------------------------------------------------------------------------------------
def test_resume_alone_takes_the_runs_own_config_even_in_a_moved_folder(run4, tmp_path):
    """`--resume` with no other training argument, in a copy of the folder elsewhere: the same bits."""
    final = _copy_without_last_checkpoint(run4, tmp_path / "moved")
    assert main(["train", "--out", str(tmp_path / "moved"), "--resume", "--no-progress"]) == 0
    ck = run_folder.read_checkpoint(run_folder.list_checkpoints(tmp_path / "moved")[0])
    assert ck["meta"]["step"] == 4
    for name, a in final["params"].items():
        assert np.array_equal(a, ck["params"][name]), name


def test_a_resumed_model_keeps_its_weights_in_the_models_one_block(run4, tmp_path):
    _copy_without_last_checkpoint(run4, tmp_path / "r")
    run = start_run(TrainConfig.from_json(json.loads((tmp_path / "r" / "config.json").read_text()),
                                          out=str(tmp_path / "r"), resume=True), log=quiet)
    bases = {id(w.base) for w in run.model.params.values()}
    assert len(bases) == 1 and run.model.params["norm.weight"].base is not None  # one memory map, all of them


def test_raising_steps_on_resume_extends_the_run_and_logs_the_change(run4, tmp_path, capsys):
    shutil.copytree(run4, tmp_path / "ext")
    assert main(["train", "--out", str(tmp_path / "ext"), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert "steps 4 -> 6" in capsys.readouterr().err
    recs = [json.loads(line) for line in (tmp_path / "ext" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any(r.get("event", "").startswith("steps 4 -> 6") and r["step"] == 4 for r in recs)
    assert json.loads((tmp_path / "ext" / "config.json").read_text())["steps"] == 6  # the next resume continues so
    assert run_folder.read_checkpoint(run_folder.list_checkpoints(tmp_path / "ext")[0])["meta"]["step"] == 6


@pytest.mark.parametrize("change", [["--lr", "0.5"], ["--seed", "3"], ["--override", "dim=64"], ["--seq-len", "16"]])
def test_changes_that_would_make_it_another_run_are_refused(run4, capsys, change):
    before = _snapshot(run4)
    assert main(["train", "--out", str(run4), "--resume", *change]) == 2
    err = capsys.readouterr().err
    assert "would make it another run" in err and change[0].lstrip("-").split("-")[0] in err
    assert _snapshot(run4) == before


def test_a_finished_run_resumed_says_so_and_changes_nothing(run4, capsys):
    before = _snapshot(run4)
    assert main(["train", "--out", str(run4), "--resume", "--no-progress"]) == 0
    assert "is finished: step 4 of 4" in capsys.readouterr().err
    assert _snapshot(run4) == before


def test_the_log_is_trimmed_to_its_last_complete_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3}')  # the last append cut
    assert run_folder.trim_log(path, 10) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


# ---- refused starts leave nothing -------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "100000"], "longer than the model's context of 64 tokens"),
    (["--warmup-steps", "-1"], "warmup_steps must be an integer >= 0"),
    (["--override", "rope_theta=nan"], "rope_theta must be a finite number > 0"),
    (["--lr", "inf"], "lr must be > 0"),
])
def test_bad_values_are_refused_before_any_file_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert main(["train", "--out", str(out), *ARGS, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_too_little_data_leaves_no_folder_behind(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("one two three.")
    assert main(["train", "--out", str(tmp_path / "bad"), "--data", str(tmp_path / "tiny.txt"), *ARGS]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ---- checkpoints: size, --keep, weights-only; overwrite -------------------------------------------
def test_checkpoint_size_is_said_keep_bounds_them_and_the_final_one_can_be_weights_only(tmp_path, capsys):
    said = []
    cfg = TrainConfig(out=str(tmp_path / "w"), model_overrides=MICRO, batch_size=4, seq_len=32, steps=4, save_every=1,
                      eval_every=4, keep=2, final_weights_only=True, val_stories=8, progress=False)
    model = train(cfg, log=said.append)
    assert any(m.startswith("saved ckpt_00000001.npz: ") and "MB" in m and "AdamW moments" in m for m in said)
    kept = run_folder.list_checkpoints(tmp_path / "w")
    assert [p.name for p in kept] == ["ckpt_00000004.npz", "ckpt_00000003.npz"]
    last, before = (run_folder.read_checkpoint(p) for p in kept)
    assert last["opt_state"] is None and before["opt_state"] is not None
    assert kept[0].stat().st_size < 0.5 * kept[1].stat().st_size  # weights only: about a third
    assert all(np.array_equal(load_run(tmp_path / "w").params[k], p) for k, p in model.params.items())
    assert main(["train", "--out", str(tmp_path / "w"), "--resume", "--steps", "6"]) == 2
    assert "weights only" in capsys.readouterr().err


def test_train_and_demo_refuse_a_used_folder_unless_told_to_overwrite(run4, tmp_path, capsys):
    shutil.copytree(run4, tmp_path / "used")
    assert main(["train", "--out", str(tmp_path / "used"), "--steps", "2", *ARGS]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "used"), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "used" / "ckpt_00000004.npz").exists()
    assert main(["train", "--out", str(tmp_path / "used"), "--steps", "2", "--overwrite", *ARGS]) == 0
    assert [p.name for p in run_folder.list_checkpoints(tmp_path / "used")] == ["ckpt_00000002.npz"]


# ---- messages ---------------------------------------------------------------------------------------
def test_a_damaged_checkpoint_is_reported_in_one_readable_line(run4, tmp_path, capsys):
    shutil.copytree(run4, tmp_path / "dmg")
    newest = run_folder.list_checkpoints(tmp_path / "dmg")[0]
    newest.write_bytes(newest.read_bytes()[:1000])
    assert main(["generate", "--model", str(tmp_path / "dmg"), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llama3np: warning: skipping damaged checkpoint")


def test_a_run_folder_without_a_checkpoint_is_named_as_such(run4, tmp_path, capsys):
    shutil.copytree(run4, tmp_path / "early")
    for p in run_folder.list_checkpoints(tmp_path / "early"):
        p.unlink()
    (tmp_path / "early" / "latest").unlink()
    assert main(["generate", "--model", str(tmp_path / "early"), "--prompt", "Once"]) == 2
    assert "training run folder with no checkpoint yet" in capsys.readouterr().err


def test_a_negative_max_new_tokens_is_refused_before_the_prompt_is_printed(run4, capsys):
    assert main(["generate", "--model", str(run4), "--prompt", "Once", "--max-new-tokens", "-3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--max-new-tokens must be >= 0" in err


def test_generate_says_when_it_stopped_at_the_context_limit(run4, capsys):
    tok = load_run(run4).tokenizer
    words = []
    while len(tok.encode(" ".join(words + ["once"]), bos=True, eos=False)) <= 62:  # leave 2 positions free
        words.append("once")
    prompt = " ".join(words)
    room = 64 - len(tok.encode(prompt, bos=True, eos=False))
    assert main(["generate", "--model", str(run4), "--prompt", prompt, "--max-new-tokens", "500",
                 "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"stopped after {room} of 500 new tokens: the model's context of 64 tokens is full" in err
    assert "Warning" not in err


def test_chat_says_what_piped_input_it_did_not_answer(run4, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"tell me story {i}\n" for i in range(12))))
    assert main(["chat", "--model", str(run4), "--max-new-tokens", "4", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "no longer fits the context" in err and "Not answered:" in err and "message(s), from 'tell me story" in err


def test_the_hint_after_training_on_your_own_text_uses_your_text(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        (corpus / f"d{i}.txt").write_text("Zebras graze " + " ".join(rng.choice(["near", "the", "river"], 150)))
    assert main(["train", "--out", str(tmp_path / "own"), "--data", str(corpus), "--steps", "1", *ARGS]) == 0
    hint = capsys.readouterr().err.splitlines()[-1]
    assert hint.startswith("try: llama3np generate") and "Once upon a time" not in hint and "Zebras graze" in hint


def test_every_flag_has_help_and_shows_its_default():
    def commands(parser, name=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from commands(sub, f"{name} {sub_name}".strip())
        yield name, parser

    checked = 0
    for name, parser in commands(build_parser()):
        if name not in ("train", "generate", "chat", "demo", "parallel train"):
            continue  # the sub-commands of other packages have their own tests
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = f"{name} {action.option_strings[0]}"
            assert action.help, f"{flag} has no help"
            if action.default not in (None, False, []) and not action.required:
                assert "default" in action.help, f"{flag} does not show its default {action.default!r}"
            checked += 1
    assert checked > 50


def test_backend_means_the_compute_kernels_in_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["parallel", "train", "--out", "x", "--backend", "mpi"])
    assert "the communication backend of `parallel train` is --comm mpi" in capsys.readouterr().err
    for argv in (["train", "--out", "x"], ["generate", "--model", "m", "--prompt", "p"], ["demo"],
                 ["parallel", "train", "--out", "x", "--comm", "mpi"]):
        assert build_parser().parse_args(argv + ["--backend", "numpy"]).backend == "numpy"


def test_dir_lists_the_lazily_imported_names():
    assert {"Tokenizer", "ChatFormat", "load", "save", "generate", "AdamW", "Transformer"} <= set(dir(llama3np))


@pytest.mark.timeout(120)
def test_plots_leave_the_processs_matplotlib_backend_alone(tmp_path):
    """loss.png and gantt.png are drawn on Figures of their own: a notebook's backend is not switched."""
    code = f"""
import matplotlib
matplotlib.use("svg")
from llama3np.training.loop import plot_losses
from llama3np.parallel.trace import Trace
plot_losses({str(tmp_path)!r}, [{{"step": 1, "loss": 2.0}}, {{"step": 2, "val_loss": 1.5}}], floor=1.0)
t = Trace()
t.add(0, "F", 0, 0.0, 1.0)
t.gantt({str(tmp_path / 'g.png')!r})
print(matplotlib.get_backend())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=100)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "svg"
    for name in ("loss.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
