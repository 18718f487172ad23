"""The training loop: learning, checkpoints, exact resume after SIGKILL, corruption fallback, bad steps."""
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama3np.training import TrainConfig, TrainingError, load_run, train
from llama3np.training import run_folder as ckpt
# the module (the package's `train` attribute is the function of the same name)
from llama3np.training import loop as train_mod

ROOT = Path(__file__).resolve().parents[1]
# a model small enough that a step takes milliseconds; vocab 600 = 256 bytes + 88 merges + 256 specials
MICRO = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=600, max_seq_len=64)
MICRO_ARGS = [f"--override={k}={v}" for k, v in MICRO.items()]


def micro_config(out, **kw):
    base = dict(out=str(out), model_overrides=dict(MICRO), batch_size=4, seq_len=32, steps=8, save_every=4,
                eval_every=4, lr=1e-2, val_stories=8, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def quiet(msg):
    pass


def test_training_lowers_the_loss_and_writes_the_run_folder(tmp_path):
    model = train(micro_config(tmp_path, steps=30, save_every=15, eval_every=15), log=quiet)
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 30 and [r["step"] for r in recs if "loss" in r] == list(range(1, 31))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [15, 30] and vals[1]["val_loss"] > vals[1]["floor"] > 0
    for name in ("config.json", "data.npz", "latest", "loss.png", "ckpt_00000030.npz", "ckpt_00000015.npz"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "latest").read_text().strip() == "ckpt_00000030.npz"
    loaded = load_run(tmp_path)
    assert loaded.tokenizer.n_words == 600 and loaded.train_step == 30
    for k, p in model.params.items():
        assert np.array_equal(loaded.params[k], p)


def test_training_on_your_own_text_folder(tmp_path):
    """--data: a folder of text files, split into train/validation documents; no entropy floor there."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 200)) + ".\n")
    model = train(micro_config(tmp_path / "run", data=str(corpus), steps=4, save_every=4), log=quiet)
    recs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "floor" not in recs[-1] and recs[-1]["val_loss"] > 0
    assert model.tokenizer.decode(model.tokenizer.encode("the cat", bos=False, eos=False)) == "the cat"


def test_llama3np_load_reads_a_run_folder(tmp_path):
    import llama3np

    train(micro_config(tmp_path, steps=2, save_every=2), log=quiet)
    model = llama3np.load(tmp_path)
    assert model.tokenizer is not None and model.args.dim == 32


def test_only_the_last_few_checkpoints_are_kept(tmp_path):
    train(micro_config(tmp_path, steps=10, save_every=2, keep=2), log=quiet)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000010.npz", "ckpt_00000008.npz"]


def test_evaluate_counts_every_token_of_the_stream_but_the_first(tmp_path):
    """The validation loss is the mean over ALL predicted tokens (full rows and the short tail)."""
    model = train(micro_config(tmp_path, steps=1, save_every=1, eval_every=1), log=quiet)
    stream = np.arange(1, 80, dtype=np.int32) % 500
    got = train_mod.evaluate(model, stream, seq_len=32, batch_size=2)
    # by hand: rows stream[0:33], stream[32:65] and the tail stream[64:79], each scored on its own
    expect_rows = []
    for start in (0, 32, 64):
        seg = stream[start:start + 33].astype(np.int64)
        lg = model.forward(seg[None, :-1]).astype(np.float64)[0]
        m = lg.max(-1, keepdims=True)
        lp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
        expect_rows.append(-lp[np.arange(len(seg) - 1), seg[1:]])
    expect = np.concatenate(expect_rows)
    assert len(expect) == 78  # 79 tokens, all but the first predicted
    assert got == pytest.approx(expect.mean(), rel=1e-6)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, monkeypatch):
    """The gradient of batch 4 in one step == batch 2 accumulated twice (the loader hands out the same rows).

    Compared on the gradients AdamW receives, not on the weights: Adam's first step moves each weight by
    about +-lr whatever the gradient's size, so a rounding-level difference in a ~0 gradient flips it.
    """
    seen = []

    class Recording(train_mod.AdamW):
        def step(self, grads, lr=None):
            seen.append({k: g.copy() for k, g in grads.items()})
            super().step(grads, lr)

    monkeypatch.setattr(train_mod, "AdamW", Recording)
    train(micro_config(tmp_path / "a", steps=1, save_every=1, batch_size=4, grad_clip=0), log=quiet)
    train(micro_config(tmp_path / "b", steps=1, save_every=1, batch_size=2, grad_accum=2, grad_clip=0), log=quiet)
    a, b = seen
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6 * np.abs(a[k]).max())


def test_resume_in_process_continues_bit_for_bit(tmp_path):
    """Stop after step 4 (by deleting the step-8 checkpoint), resume: same weights, log and random draws."""
    draws = {"full": {}, "first": {}, "part": {}}

    def recorder(name):
        def on_eval(step, model, val, rng):
            draws[name][step] = int(rng.integers(1 << 62))  # what a sampling callback would draw
        return on_eval

    full = train(micro_config(tmp_path / "full", steps=8), log=quiet, on_eval=recorder("full"))
    part = micro_config(tmp_path / "part", steps=8)
    train(micro_config(tmp_path / "part", steps=8, save_every=4), log=quiet, on_eval=recorder("first"))
    # throw away the final checkpoint: the run must continue from step 4
    (tmp_path / "part" / "ckpt_00000008.npz").unlink()
    part.resume = True
    resumed = train(part, log=quiet, on_eval=recorder("part"))
    for k in full.params:
        assert np.array_equal(full.params[k], resumed.params[k]), k
    recs = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 9))  # no step logged twice
    assert draws["part"] == {8: draws["full"][8]}  # the run's generator state was restored too


def test_resume_refuses_changed_arguments_and_fresh_runs_refuse_used_folders(tmp_path):
    train(micro_config(tmp_path, steps=2, save_every=2), log=quiet)
    with pytest.raises(ValueError, match="already holds"):
        train(micro_config(tmp_path, steps=2), log=quiet)
    with pytest.raises(ValueError, match="lr"):
        train(micro_config(tmp_path, steps=2, lr=0.5, resume=True), log=quiet)


def test_a_corrupt_latest_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    train(micro_config(tmp_path, steps=8, save_every=4), log=quiet)
    newest = tmp_path / "ckpt_00000008.npz"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle
    newest.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged"):
        path, ck = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "ckpt_00000004.npz" and ck["meta"]["step"] == 4
    # a truncated file (a copy cut short) is caught as well
    newest.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert load_run(tmp_path).train_step == 4
    # and when nothing is usable, the error says so
    (tmp_path / "ckpt_00000004.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no usable checkpoint"):
        with pytest.warns(RuntimeWarning):
            ckpt.latest_checkpoint(tmp_path)


def test_a_checksum_catches_changes_the_zip_format_would_not(tmp_path):
    """Rewrite a checkpoint with one weight changed but a valid zip: only the sha256 notices."""
    train(micro_config(tmp_path, steps=2, save_every=2), log=quiet)
    path = tmp_path / "ckpt_00000002.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["param/norm.weight"] = arrays["param/norm.weight"] + 1
    np.savez(path, **arrays)
    with pytest.raises(ckpt.CorruptCheckpoint, match="checksum"):
        ckpt.read_checkpoint(path)


def _nan_at(steps_with_nan):
    real = train_mod.compute_loss_and_grads
    calls = {"n": 0}

    def fake(model, x, y, doc_ids=None):
        loss, grads = real(model, x, y, doc_ids)
        calls["n"] += 1
        if calls["n"] in steps_with_nan:
            grads["norm.weight"][0] = np.nan
        return loss, grads

    return fake


def test_document_masked_pretraining_passes_each_rows_documents_to_the_model(tmp_path, monkeypatch):
    """--doc-mask: every micro-batch's loss is taken with doc_ids that start a new document at each BOS
    (so a story never attends to the one before it), the run trains, and it differs from a plain run."""
    real, seen = train_mod.compute_loss_and_grads, []

    def spy(model, x, y, doc_ids=None):
        seen.append((x.copy(), doc_ids))
        return real(model, x, y, doc_ids)

    monkeypatch.setattr(train_mod, "compute_loss_and_grads", spy)
    masked = train(micro_config(tmp_path / "masked", doc_mask=True, steps=4, seq_len=64), log=quiet)
    bos = masked.tokenizer.bos_id
    for x, doc_ids in seen:
        assert doc_ids is not None and doc_ids.shape == x.shape
        starts = np.diff(doc_ids, axis=1, prepend=0) == 1  # where a new document begins
        np.testing.assert_array_equal(starts, x == bos)
    assert any((x[:, 1:] == bos).any() for x, _ in seen), "some row holds the start of a second story"
    plain = train(micro_config(tmp_path / "plain", steps=4, seq_len=64), log=quiet)
    assert any(not np.array_equal(masked.params[k], plain.params[k]) for k in plain.params)


def test_a_nan_gradient_skips_the_step_and_is_logged(tmp_path, monkeypatch):
    """Step 3's gradient holds a NaN: the weights do not move on that step, the log says why, training goes on."""
    monkeypatch.setattr(train_mod, "compute_loss_and_grads", _nan_at({3}))
    seen = {}

    def snapshot(step, model, val, rng):
        seen[step] = {k: v.copy() for k, v in model.params.items()}

    model = train(micro_config(tmp_path, steps=4, eval_every=1), log=quiet, on_eval=snapshot)
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in recs if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3] and "non-finite gradient" in skipped[0]["skipped"]
    assert all(np.array_equal(seen[2][k], seen[3][k]) for k in seen[2])
    assert not np.array_equal(seen[3]["norm.weight"], seen[4]["norm.weight"])
    assert all(np.isfinite(p).all() for p in model.params.values())


def test_repeated_bad_steps_stop_the_run_with_a_usable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "compute_loss_and_grads", _nan_at(set(range(3, 100))))
    with pytest.raises(TrainingError, match="bad steps in a row"):
        train(micro_config(tmp_path, steps=20, save_every=100, max_bad_steps=3), log=quiet)
    model = load_run(tmp_path)
    assert model.train_step == 5 and all(np.isfinite(p).all() for p in model.params.values())


def test_a_loss_spike_far_above_the_recent_mean_is_skipped(tmp_path, monkeypatch):
    real = train_mod.compute_loss_and_grads
    calls = {"n": 0}

    def spiky(model, x, y, doc_ids=None):
        loss, grads = real(model, x, y, doc_ids)
        calls["n"] += 1
        return (loss * 10 if calls["n"] == 7 else loss), grads

    monkeypatch.setattr(train_mod, "compute_loss_and_grads", spiky)
    train(micro_config(tmp_path, steps=8, spike_window=4), log=quiet)
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in recs if r.get("skipped")]
    assert [r["step"] for r in skipped] == [7] and "spike" in skipped[0]["skipped"]


# ---- SIGKILL at random moments, then --resume: the final weights are bitwise identical -------------
def _cli(out, *extra):
    return [sys.executable, "-m", "llama3np.cli", "train", "--out", str(out), "--steps", "40", "--save-every", "3",
            "--eval-every", "20", "--batch-size", "4", "--seq-len", "32", "--lr", "0.01", "--val-stories", "8",
            "--no-progress", *MICRO_ARGS, *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               LLAMA3NP_NUM_THREADS="1")
    return env


def _final_arrays(run_dir):
    _, ck = ckpt.latest_checkpoint(run_dir, warn=False)
    assert ck["meta"]["step"] == 40
    return ck


def _steps_logged(run):
    try:
        return sum('"loss"' in line for line in (run / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _kill_when(proc, run, target_step, rng, during_write=False):
    """SIGKILL `proc` once `target_step` steps are logged (plus 0-30 ms), or, with during_write, as soon
    as a temporary checkpoint file exists (a kill in the middle of writing a checkpoint)."""
    while proc.poll() is None:
        if during_write and any(run.glob(".ckpt_*.tmp")):
            proc.send_signal(signal.SIGKILL)
            return "mid-write"
        if _steps_logged(run) >= target_step:
            time.sleep(rng.uniform(0, 0.03))
            proc.send_signal(signal.SIGKILL)
            return f"after step {target_step}"
        time.sleep(0.001)
    return None


@pytest.mark.timeout(240)
def test_sigkill_at_random_moments_then_resume_gives_bitwise_identical_weights(tmp_path):
    """Kill `llama3np train` with SIGKILL 4 times (at random steps, one of them while a checkpoint is being
    written), resume each time with --resume: the final weights, the AdamW state and every logged loss
    equal those of an uninterrupted run, bit for bit."""
    ref = subprocess.run(_cli(tmp_path / "ref"), env=_env(), capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    ref_log = [json.loads(x) for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]

    rng = random.Random(1234)
    run = tmp_path / "killed"
    plan = [(rng.randint(2, 10), False), (0, True), (rng.randint(15, 25), False), (rng.randint(28, 37), False)]
    kills = []
    for attempt, (target, during_write) in enumerate(plan):
        # --resume from the second attempt on (with no checkpoint yet it simply starts afresh)
        proc = subprocess.Popen(_cli(run, "--resume") if attempt else _cli(run), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills.append(_kill_when(proc, run, target or 10**9, rng, during_write))
        proc.wait()
    assert all(kills), kills  # every attempt was killed before it finished
    final = subprocess.run(_cli(run, "--resume"), env=_env(), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert "resuming" in final.stderr
    a, b = _final_arrays(tmp_path / "ref"), _final_arrays(run)
    for k in a["params"]:
        assert np.array_equal(a["params"][k], b["params"][k]), k
        assert np.array_equal(a["opt_state"]["m"][k], b["opt_state"]["m"][k]), k
        assert np.array_equal(a["opt_state"]["v"][k], b["opt_state"]["v"][k]), k
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 41))
    assert [r["loss"] for r in recs if "loss" in r] == [r["loss"] for r in ref_log if "loss" in r]
