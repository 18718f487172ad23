"""The `llama3np` command line: happy paths on a micro model, and clear errors (exit code 2) on bad input."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama3np.cli import main
from llama3np.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
MICRO = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=600, max_seq_len=64)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(out=str(out), model_overrides=MICRO, batch_size=4, seq_len=32, steps=20, save_every=20,
                      eval_every=20, lr=1e-2, val_stories=8, progress=False), log=lambda m: None)
    return out


def test_generate_streams_the_prompt_and_its_continuation(run_dir, capsys):
    assert main(["generate", "--model", str(run_dir), "--prompt", "Once upon a time", "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")


def test_greedy_generate_prints_the_same_text_twice(run_dir, capsys):
    args = ["generate", "--model", str(run_dir), "--prompt", "Once", "--max-new-tokens", "12", "--temperature", "0"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_chat_answers_each_line_until_an_empty_one(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you\n\n"))
    assert main(["chat", "--model", str(run_dir), "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_chat_uses_llama3_chat_template_with_a_hugging_face_folder(tmp_path, capsys, monkeypatch):
    """A (random, tiny) model with Meta's tokenizer saved as a Hugging Face folder: what a downloaded
    Llama 3 Instruct checkpoint looks like to `llama3np chat`."""
    import llama3np

    args = llama3np.ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, hidden_dim=64,
                              max_seq_len=128)
    model = llama3np.Transformer(args, seed=0)
    model.tokenizer = llama3np.Tokenizer()
    llama3np.save(model, tmp_path / "hf", format="hf")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n\n"))
    assert main(["chat", "--model", str(tmp_path / "hf"), "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 1


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "hi"], "model path not found"),
    (["chat", "--model", "/no/such/model"], "model path not found"),
    (["train", "--out", "OUT", "--steps", "0"], "steps must be a positive integer"),
    (["train", "--out", "OUT", "--data", "/no/such/corpus"], "corpus path not found"),
    (["train", "--out", "OUT", "--override", "dimension=3"], "not a ModelArgs field"),
    (["train", "--out", "OUT", "--override", "dim"], "KEY=VALUE"),
    (["train", "--out", "OUT", "--preset", "huge"], "unknown preset"),
    (["demo", "--out", "OUT", "--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_give_one_clear_line_and_exit_code_2(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_empty_prompt_or_one_longer_than_the_context_is_refused(run_dir, capsys):
    assert main(["generate", "--model", str(run_dir), "--prompt", "  "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--model", str(run_dir), "--prompt", "Once upon a time " * 30]) == 2
    assert "context is 64 tokens" in capsys.readouterr().err


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_the_installed_command_exits_2_without_a_traceback():
    """Through a real process: the exit code and stderr a user sees."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "llama3np.cli", "generate", "--model", "/no/such", "--prompt", "x"],
                       capture_output=True, text=True, env=env, timeout=100)
    assert r.returncode == 2 and "model path not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(200)
def test_a_short_demo_trains_samples_and_reports_the_entropy_gap(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "samples before training" in out and "samples after training" in out
    assert "the corpus's entropy is" in out and "checkpoint:" in out and "llama3np chat --model" in out
    assert (tmp_path / "demo" / "loss.png").exists() and (tmp_path / "demo" / "ckpt_00000002.npz").exists()


def test_every_room_has_its_command_and_python_m_works():
    """`python -m llama3np --help` lists the commands of every subsystem (one entry point for all)."""
    r = subprocess.run([sys.executable, "-m", "llama3np", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for command in ("train", "generate", "chat", "demo", "parallel", "data", "sft", "rm", "rs", "dpo", "ppo",
                    "average", "posttrain", "eval", "check", "exercises", "doctor"):
        assert f" {command} " in r.stdout or f"{{{command}," in r.stdout or f",{command}," in r.stdout, command
