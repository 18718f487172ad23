"""`llama3np eval mmlu` / `eval robustness`: results file, per-subject table, resume, clear errors."""
import json

import numpy as np
import pytest

import llama3np
from llama3np.eval import cli, scoring
from test_eval import TOK, write_csv


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with the byte tokenizer, saved in our format (tokenizer.model beside it)."""
    args = llama3np.ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=TOK.n_words,
                              hidden_dim=32, max_seq_len=4096)
    model = llama3np.Transformer(args, seed=0)
    model.tokenizer = TOK
    folder = tmp_path_factory.mktemp("evalmodel")
    llama3np.save(model, folder, format="llama3np")
    return folder


def run(*argv):
    return cli.main(["eval", *map(str, argv)])


BASE = ("--n-per-subject", 4, "--shots", 1, "--subjects", "story_remedies", "pronouns", "--no-progress")


def test_mmlu_writes_the_results_file_and_prints_the_table(model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run("mmlu", "--model", model_dir, *BASE, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "story_remedies" in printed and "macro (mean of subjects)" in printed
    r = json.loads(out.read_text())
    assert r["done"] and len(r["items"]) == 8 and set(r["subjects"]) == {"story_remedies", "pronouns"}
    assert r["convention"]["style"] == "harness" and r["convention"]["bos"] is True
    assert r["micro"] == np.mean([it["correct"] for it in r["items"]])


def test_an_interrupted_run_resumes_where_it_stopped_and_ends_with_the_same_results(model_dir, tmp_path,
                                                                                    monkeypatch):
    whole = tmp_path / "whole.json"
    assert run("mmlu", "--model", model_dir, *BASE, "--out", whole) == 0
    calls = {"n": 0}
    original = scoring.PrefixCache.loglikelihoods

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    part = tmp_path / "part.json"
    monkeypatch.setattr(scoring.PrefixCache, "loglikelihoods", interrupted)
    assert run("mmlu", "--model", model_dir, *BASE, "--out", part) == 130
    saved = json.loads(part.read_text())
    assert not saved["done"] and len(saved["items"]) == 3
    monkeypatch.setattr(scoring.PrefixCache, "loglikelihoods", original)
    assert run("mmlu", "--model", model_dir, *BASE, "--out", part) == 2  # exists: --resume needed
    assert run("mmlu", "--model", model_dir, *BASE, "--out", part, "--resume") == 0
    a, b = json.loads(whole.read_text()), json.loads(part.read_text())
    assert b["resumed_from"] == 3
    assert a["items"] == b["items"] and a["micro"] == b["micro"] and a["subjects"] == b["subjects"]


def test_resume_with_other_arguments_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run("mmlu", "--model", model_dir, *BASE, "--out", out) == 0
    assert run("mmlu", "--model", model_dir, *BASE, "--out", out, "--resume", "--style", "original") == 2
    assert "style" in capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(model_dir, tmp_path, capsys):
    assert run("mmlu", "--model", tmp_path / "none", "--out", tmp_path / "x.json") == 2
    assert "not found" in capsys.readouterr().err
    assert run("mmlu", "--model", model_dir, "--subjects", "astrology", "--out", tmp_path / "y.json") == 2
    assert "astrology" in capsys.readouterr().err
    assert run("mmlu", "--model", model_dir, "--data", tmp_path / "missing", "--out", tmp_path / "z.json") == 2


def test_a_hendrycks_folder_from_the_command_line(model_dir, tmp_path):
    for split in ("dev", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        write_csv(tmp_path / "data" / split / f"anatomy_{split}.csv",
                  [["Which bone?", "femur", "ulna", "skull", "rib", "C"], ["Which organ?", "a", "b", "c", "d", "A"]])
    out = tmp_path / "r.json"
    assert run("mmlu", "--model", model_dir, "--data", tmp_path / "data", "--no-progress", "--out", out) == 0
    r = json.loads(out.read_text())
    assert [it["answer"] for it in r["items"]] == [2, 0] and r["items"][0]["n_shots"] == 2


def test_the_real_cot_dev_questions_with_leave_one_out_shots(model_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="the real MMLU dev questions ship in lm-eval: pip install --no-deps lm-eval")
    out = tmp_path / "r.json"
    assert run("mmlu", "--model", model_dir, "--data", "lm-eval-cot", "--subjects", "anatomy", "--limit", 2,
               "--shots", 2, "--no-progress", "--out", out) == 0
    r = json.loads(out.read_text())
    assert r["config"]["leave_one_out"] and len(r["items"]) == 2
    assert "not the test set" in r["notes"][0]


def test_robustness_writes_its_json_and_plot(model_dir, tmp_path, capsys):
    assert run("robustness", "--model", model_dir, *BASE, "--limit", 2, "--out", tmp_path / "rob") == 0
    rep = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert set(rep["label_sets"]) == {"A B C D", "1 2 3 4", "$ & # @", "œ § з ü"}
    assert (tmp_path / "rob" / "robustness.png").stat().st_size > 1000
    assert "spread" in capsys.readouterr().out
