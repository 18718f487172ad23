"""The pre-training loop: data -> model -> loss -> gradients -> AdamW, with checkpoints and exact resume.

    from llama3np.training import TrainConfig, train, resume_config
    model = train(TrainConfig(out="runs/tiny", preset="tiny", steps=300))
    model = train(resume_config("runs/tiny", steps=400))        # continue it, 100 steps more

One step (Llama 3's recipe, scaled down):
    lr    = warmup then cosine (optim.get_lr)
    loss, grads = model.loss_and_grads(x, y)        averaged over `grad_accum` micro-batches
    skip the step if the loss or the gradient is NaN/Inf, or the loss spikes far above the recent mean
    clip the global gradient norm, AdamW update in place
The rules after the loss and gradient (skip, clip, count) are step.py's, shared with the parallel
engine. `start_run` makes the run folder or continues the one in cfg.out (the parallel engine
prepares its folder with it too), and `Run.save` writes a checkpoint through run_folder.save_run, as
the engine's workers do.

Exact resume: everything that decides the future of the run is in the checkpoint (weights, AdamW
moments and step count, the loader's position, the recent losses the spike detector compares against,
the data itself in data.npz, and the state of the run's random generator, which the loop hands to
callbacks that sample text; the batch order needs no generator state: it is a function of (seed,
epoch)). Nothing depends on the wall clock, so a run resumed from step k does the same arithmetic in
the same order as one that never stopped, and ends with bitwise identical weights (for a fixed
BLAS/kernel thread count). Raising `steps` on resume is the one allowed change that alters the
arithmetic from there on (the cosine is stretched); it is logged.
"""
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import data as data_mod
from ..data import stories
from ..fileio import atomic_write_bytes
from ..model import Transformer
from ..ops import token_nll
from ..optim import AdamW, get_lr, global_grad_norm
from . import run_folder as ckpt
from .config import (TrainConfig, build_args, default_tokenizer, fill_from_saved, read_run_config,  # noqa: F401
                     resume_changes)
from .step import RunState, bad_step_reason, clip_to_max_norm

# what a run folder holds, for --overwrite (other files in the folder are left alone)
RUN_FILES = ("config.json", "data.npz", "log.jsonl", "loss.png", "latest", "parallel.json", "trace.json", "gantt.png")


class TrainingError(RuntimeError):
    """The run stopped on purpose (repeated bad steps); a checkpoint of the last good state was saved."""


# ---------------------------------------------------------------------------------------------------
# data and tokenizer
def _make_tokenizer(cfg, vocab_size, sample_text):
    from ..tokenizer import Tokenizer

    choice = cfg.tokenizer
    if choice == "auto":
        choice = default_tokenizer(vocab_size)
    if choice == "llama3":
        return Tokenizer()
    if choice == "bpe":
        return data_mod.train_bpe(sample_text, vocab_size)
    return Tokenizer(choice)  # a path to a .model file


def prepare_data(cfg, args_vocab, log=print):
    """-> (tokenizer, arrays for data.npz): the tokenised train/val streams and, for stories, the floor."""
    arrays = {}
    if cfg.data is None:
        # train the tokenizer on a sample, then generate enough stories for every step to see new ones
        sample, _ = stories.corpus(2000, seed=2 * cfg.seed)
        tok = _make_tokenizer(cfg, args_vocab, "\n\n".join(sample))
        tokens_per_story = np.mean([len(tok.encode(s, bos=False, eos=False)) + 2 for s in sample[:500]])
        tokens_needed = cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len
        n_train = cfg.n_stories or int(1.05 * tokens_needed / tokens_per_story) + 100
        train_docs, train_logp = stories.corpus(n_train, seed=2 * cfg.seed)
        val_docs, val_logp = stories.corpus(cfg.val_stories, seed=2 * cfg.seed + 1)
        train_stream, train_lens = data_mod.tokenize_documents(tok, train_docs)
        val_stream, val_lens = data_mod.tokenize_documents(tok, val_docs)
        arrays["train_floor"] = np.float64(stories.entropy_per_token(train_logp, train_lens))
        arrays["val_floor"] = np.float64(stories.entropy_per_token(val_logp, val_lens))
        log(f"corpus: {n_train:,} generated stories ({len(train_stream):,} tokens), {len(val_docs)} for "
            f"validation; entropy floor {float(arrays['val_floor']):.4f} nats/token on the validation tokens "
            f"(every token after the first is predicted, EOS included; a BOS after an EOS costs 0)")
    else:
        docs = data_mod.read_documents(cfg.data)
        train_docs, val_docs = data_mod.train_val_split(docs, cfg.val_fraction)
        tok = _make_tokenizer(cfg, args_vocab, "\n\n".join(train_docs))
        train_stream, _ = data_mod.tokenize_documents(tok, train_docs)
        val_stream, _ = data_mod.tokenize_documents(tok, val_docs)
        log(f"corpus: {len(docs)} documents from {cfg.data}: {len(train_stream):,} training tokens, "
            f"{len(val_stream):,} validation tokens")
    arrays["train"], arrays["val"] = train_stream, val_stream
    return tok, arrays


# ---------------------------------------------------------------------------------------------------
# evaluation
def evaluate(model, stream, seq_len, batch_size=8):
    """Mean next-token loss (nats) over EVERY token of the stream but the first (the tail as a short row)."""
    total, count = 0.0, 0
    n_full = data_mod.n_rows(len(stream), seq_len)
    for x, y in data_mod.eval_batches(stream, seq_len, batch_size):
        total += _sum_nll(model, x, y)
        count += y.size
    tail = np.asarray(stream[n_full * seq_len:], dtype=np.int64)
    if len(tail) > 1:  # the last, shorter row, so every token is counted once
        total += _sum_nll(model, tail[None, :-1], tail[None, 1:])
        count += len(tail) - 1
    return total / max(count, 1)


def _sum_nll(model, x, y):
    logits = model.forward(x, keep=False).astype(np.float64)  # (B, T, V); no activations kept: no backward
    return float(token_nll(logits, y)[0].sum())


def compute_loss_and_grads(model, x, y, doc_ids=None):
    """One micro-batch's mean loss and gradients (a separate function so tests can inject faults)."""
    return model.loss_and_grads(x, y, doc_ids=doc_ids)


# ---------------------------------------------------------------------------------------------------
# the loss plot
def plot_losses(run_dir, records, floor=None):
    """loss.png beside the checkpoints: training loss per step, validation loss, the entropy floor.

    Drawn on a matplotlib Figure of its own (not pyplot), so the process's backend is left as it was:
    plt.show() in a notebook still shows its plots after training. Written atomically."""
    import io

    from matplotlib.figure import Figure

    from ..fileio import atomic_write_bytes

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("skipped")]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    if train:
        s, l = zip(*train)
        ax.plot(s, l, lw=0.8, alpha=0.5, label="train loss")
        if len(l) >= 10:
            w = max(2, len(l) // 30)
            smooth = np.convolve(l, np.ones(w) / w, mode="valid")
            ax.plot(s[w - 1:], smooth, lw=1.5, label=f"train loss ({w}-step mean)")
    if val:
        s, l = zip(*val)
        ax.plot(s, l, "o-", lw=1.5, label="validation loss")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"entropy floor {floor:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if train or val:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path = Path(run_dir) / "loss.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------------
# starting a run (fresh or resumed) and saving it


@dataclass
class Run:
    """A run ready to take its next step: what start_run returns and Run.save writes back."""
    cfg: TrainConfig  # resolved
    model: Transformer
    tokenizer: object
    opt: AdamW
    loader: data_mod.DataLoader
    arrays: dict  # data.npz: train, val (and the entropy floors of the built-in stories)
    state: RunState
    records: list = field(default_factory=list)  # log.jsonl up to state.step
    resumed_from: Path = None  # the checkpoint, for a resumed run

    @property
    def finished(self):
        return self.state.step >= self.cfg.steps

    def save(self, log=None, weights_only=False):
        """Write the checkpoint of the current step (run_folder.save_run) -> its path."""
        return ckpt.save_run(self.cfg.out, params=self.model.params,
                             opt_state=None if weights_only else self.opt.state_dict(),
                             tokenizer_bytes=self.tokenizer.to_bytes(), model_args=self.model.args,
                             loader_state=self.loader.state_dict(), state=self.state, keep=self.cfg.keep, log=log)


def start_run(cfg, log=print):
    """A fresh run in cfg.out, or (cfg.resume) the continuation of the one there -> Run.

    Every argument is checked before anything is written; a start refused later (e.g. too little
    data) removes what it wrote. A folder that already holds a run is refused unless cfg.resume
    (continue it: its config.json decides, see config.resume_changes) or cfg.overwrite (replace it).
    """
    run_dir = Path(cfg.out)
    saved = read_run_config(run_dir) if run_dir.is_dir() else None
    if cfg.resume and saved is not None:
        cfg = fill_from_saved(cfg, saved)
    cfg = cfg.resolved()
    existing = ckpt.list_checkpoints(run_dir)
    if existing and cfg.overwrite:
        log(f"--overwrite: replacing the run in {run_dir} ({existing[0].name})")
        for p in existing:
            p.unlink()
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        existing = []
    if existing and not cfg.resume:
        raise ValueError(f"{run_dir} already holds a training run ({existing[0].name}); pass --resume to continue "
                         "it, --overwrite to replace it, or choose another --out folder")
    if run_dir.is_dir():
        for stale in run_dir.glob(".*.tmp*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    if existing:
        return _resume(cfg, saved, log)
    return _fresh(cfg, log)  # also a --resume of a run killed before its first checkpoint


def _fresh(cfg, log):
    run_dir = Path(cfg.out)
    base_vocab = build_args(cfg).vocab_size
    tok, arrays = prepare_data(cfg, base_vocab, log)
    args = build_args(cfg, tok)
    loader = data_mod.DataLoader(arrays["train"], cfg.seq_len, cfg.batch_size, seed=cfg.seed)  # too little data?
    if args.vocab_size != base_vocab:
        log(f"vocabulary: {args.vocab_size} ids (the {cfg.preset} preset has {base_vocab}; the tokenizer "
            f"has {tok.n_words}" + (", every word of the grammar is already one token)" if cfg.data is None else ")"))
    model = Transformer(args, seed=cfg.seed)
    opt = AdamW(model.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "log.jsonl").unlink(missing_ok=True)
        data_mod.save_arrays_atomic(run_dir / "data.npz", **arrays)
        atomic_write_bytes(run_dir / "config.json",
                           json.dumps(dict(cfg.to_json(), model_args=args.to_dict()), indent=2).encode())
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)  # only what we just made
        raise
    return Run(cfg, model, tok, opt, loader, arrays, RunState.fresh(cfg.seed))


def _resume(cfg, saved, log):
    from ..tokenizer import Tokenizer

    run_dir = Path(cfg.out)
    if saved is None:
        raise FileNotFoundError(f"{run_dir} has checkpoints but no config.json: it cannot be resumed "
                                "(llama3np generate --model still reads it)")
    changes = resume_changes(saved, cfg)  # refuses changes that would make it another run
    r = ckpt.restore_run(run_dir, warn=log)  # the newest that passes its checksum (says so otherwise)
    if cfg.steps < r.state.step:
        raise ValueError(f"--steps {cfg.steps} is below the step the run has reached ({r.state.step})")
    if r.opt_state is None and cfg.steps > r.state.step:
        raise ValueError(f"{r.path.name} was saved with the weights only (--final-weights-only): without AdamW's "
                         "moments the run cannot be continued; start a new run from it instead")
    tok = Tokenizer.from_bytes(r.tokenizer_bytes, name="checkpoint tokenizer")
    with np.load(run_dir / "data.npz") as z:
        arrays = {k: z[k] for k in z.files}
    model = Transformer(r.model_args, init=False)
    ckpt.fill_params(model, r.params, r.path)  # in place: the weights stay in the model's one block
    opt = AdamW(model.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if r.opt_state is not None:
        opt.load_state_dict(r.opt_state)
    loader = data_mod.DataLoader(arrays["train"], cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    loader.load_state_dict(r.loader_state)
    run = Run(cfg, model, tok, opt, loader, arrays, r.state, resumed_from=r.path)
    if run.finished:  # nothing to do: nothing is written
        run.records = ckpt.read_log(run_dir / "log.jsonl", r.state.step)
        return run
    run.records = records = ckpt.trim_log(run_dir / "log.jsonl", r.state.step)
    log(f"resuming {run_dir} from {r.path.name} (step {r.state.step})")
    if changes:
        # the folder's config.json follows: the next --resume continues with these values
        atomic_write_bytes(run_dir / "config.json", json.dumps(dict(cfg.to_json(), model_args=saved["model_args"]),
                                                               indent=2).encode())
        log("changed on resume: " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    if "steps" in changes and r.state.step < cfg.steps:
        old, new = changes["steps"]
        event = {"step": r.state.step, "event": f"steps {old} -> {new}: the learning-rate schedule is stretched to "
                                               f"{new} steps from here on"}
        with open(run_dir / "log.jsonl", "a") as f:
            ckpt.append_log(f, event)
        records.append(event)
        log(event["event"])
    return run


def finished_message(run):
    return (f"{run.cfg.out} is finished: step {run.state.step} of {run.cfg.steps}; nothing to do (a larger --steps "
            "with --resume extends it)")


def train(cfg: TrainConfig, log=None, on_eval=None, on_start=None):
    """Run (or resume) training as configured; returns the trained model (tokenizer attached).

    log(msg) receives progress messages (default: print to stderr). on_start(model) is called once
    before the first step; on_eval(step, model, val_loss, rng) after every validation, e.g. to print
    samples drawn with `rng`, the run's random generator (checkpointed, so a resumed run draws the
    same). Raises TrainingError after max_bad_steps bad steps in a row (after saving a checkpoint
    of the last good weights). A finished run resumed changes nothing (model.train_records: its log).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run = start_run(cfg, log)
    cfg, model, state, loader, opt = run.cfg, run.model, run.state, run.loader, run.opt
    model.tokenizer = run.tokenizer
    run_dir = Path(cfg.out)
    model.train_records = records = run.records
    if run.finished:
        log(finished_message(run))
        return model
    floor = float(run.arrays["val_floor"]) if "val_floor" in run.arrays else None
    log_path = run_dir / "log.jsonl"
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    if on_start is not None:
        on_start(model)

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    say = (lambda m: bar.write(m)) if bar is not None else log
    logf = open(log_path, "a")
    t_last = time.perf_counter()
    try:
        while state.step < cfg.steps:
            lr = get_lr(state.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
            loss, grads = 0.0, None
            for _ in range(cfg.grad_accum):
                x, y = loader.next_batch()
                doc_ids = data_mod.document_ids(x, run.tokenizer.bos_id) if cfg.doc_mask else None
                l, g = compute_loss_and_grads(model, x, y, doc_ids)
                loss += float(l) / cfg.grad_accum
                if grads is None:
                    grads = g
                else:
                    for k in grads:
                        grads[k] += g[k]
            if cfg.grad_accum > 1:
                for g in grads.values():
                    g /= cfg.grad_accum
            norm = global_grad_norm(grads)
            reason = bad_step_reason(loss, norm, state.recent, cfg)
            if reason is None:
                clip_to_max_norm(grads, norm, cfg.grad_clip)
                opt.step(grads, lr=lr)
            else:
                log(f"step {state.step + 1}: skipped ({reason})")
            rec = state.end_step(cfg, loss, norm, lr, reason)
            now = time.perf_counter()
            rec["tok_per_s"] = round(tokens_per_step / max(now - t_last, 1e-9), 1)
            t_last = now
            ckpt.append_log(logf, rec)
            records.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_per_s']:.0f}", refresh=False)
                bar.update(1)
            if state.bad_in_row >= cfg.max_bad_steps:
                path = run.save(log=say)
                raise TrainingError(
                    f"{state.bad_in_row} bad steps in a row (last: {reason}) at step {state.step}: stopping. "
                    f"The weights before them are saved in {path}; lower --lr or check the data.")
            done = state.step == cfg.steps
            if state.step % cfg.eval_every == 0 or done:
                val = evaluate(model, run.arrays["val"], cfg.seq_len)
                vrec = {"step": state.step, "val_loss": val}
                if floor is not None:
                    vrec["floor"] = floor
                ckpt.append_log(logf, vrec)
                records.append(vrec)
                msg = f"step {state.step}: val loss {val:.4f}"
                if floor is not None:
                    msg += f" (entropy floor {floor:.4f}, {val - floor:+.4f} above it)"
                say(msg)
                if on_eval is not None:
                    on_eval(state.step, model, val, state.rng)
            if state.step % cfg.save_every == 0 or done:
                run.save(log=say, weights_only=done and cfg.final_weights_only)
            if state.step % cfg.eval_every == 0 or done:
                plot_losses(run_dir, records, floor)  # with the validation point just added
    finally:
        logf.close()
        if bar is not None:
            bar.close()
    return model
