"""The pre-training loop: data -> model -> loss -> gradients -> AdamW, with checkpoints and exact resume.

    from llama3np.training import TrainConfig, train
    model = train(TrainConfig(out="runs/tiny", preset="tiny", steps=300))

One step (Llama 3's recipe, scaled down):
    lr    = warmup then cosine (optim.get_lr)
    loss, grads = model.loss_and_grads(x, y)        averaged over `grad_accum` micro-batches
    skip the step if the loss or the gradient is NaN/Inf, or the loss spikes far above the recent mean
    clip the global gradient norm, AdamW update in place

Exact resume: everything that decides the future of the run is in the checkpoint (weights, AdamW
moments and step count, the loader's position, the recent losses the spike detector compares against,
the data itself in data.npz, and the state of the run's random generator, which the loop hands to
callbacks that sample text; the batch order needs no generator state: it is a function of (seed, epoch)). Nothing depends on the wall clock, so a run resumed
from step k does the same arithmetic in the same order as one that never stopped, and ends with
bitwise identical weights (for a fixed BLAS/kernel thread count).
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np

from .. import data as data_mod
from ..data import stories
from ..args import preset as get_preset
from ..fileio import atomic_write_bytes
from ..model import Transformer
from ..optim import AdamW, clip_grad_norm, get_lr
from . import run_folder as ckpt

LLAMA3_VOCAB = 128256


class TrainingError(RuntimeError):
    """The run stopped on purpose (repeated bad steps); a checkpoint of the last good state was saved."""


@dataclass
class TrainConfig:
    out: str  # the run folder
    preset: str = "tiny"
    data: Optional[str] = None  # a text file or folder; None = the built-in stories
    tokenizer: str = "auto"  # "bpe" (trained on the corpus), "llama3" (Meta's), a .model path; auto: by vocab
    model_overrides: dict = field(default_factory=dict)  # ModelArgs fields, e.g. {"dim": 64, "n_layers": 2}
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step: the effective batch is batch_size * grad_accum rows
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: Optional[int] = None  # None: 10% of the steps (at most 100)
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    save_every: int = 100
    keep: int = 3  # checkpoints kept
    eval_every: int = 50
    val_fraction: float = 0.05  # for --data corpora
    n_stories: Optional[int] = None  # built-in corpus size; None: enough that no story is seen twice
    val_stories: int = 100
    seed: int = 0
    spike_factor: float = 2.0  # a loss above spike_factor * recent mean (and 1 nat above it) is a spike
    spike_window: int = 20
    max_bad_steps: int = 5  # this many bad steps in a row stop the run
    resume: bool = False
    progress: bool = True  # tqdm bar

    # fields that may differ between the first run and a --resume without changing the arithmetic
    _RUNTIME = ("resume", "progress")

    def resolved(self):
        """A copy with the defaults that depend on other fields filled in."""
        c = TrainConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        c.out = str(c.out)
        c.betas = tuple(float(b) for b in c.betas)
        if c.warmup_steps is None:
            c.warmup_steps = min(100, max(1, c.steps // 10))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "eval_every", "keep",
                     "max_bad_steps", "spike_window", "val_stories"):
            v = getattr(c, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not c.lr > 0:
            raise ValueError(f"lr must be > 0, got {c.lr}")
        return c

    def to_json(self):
        d = asdict(self)
        for k in self._RUNTIME:
            d.pop(k)
        d["betas"] = list(d["betas"])
        return d


# ---------------------------------------------------------------------------------------------------
# data and tokenizer
def _make_tokenizer(cfg, vocab_size, sample_text):
    from ..tokenizer import Tokenizer

    choice = cfg.tokenizer
    if choice == "auto":
        choice = "llama3" if vocab_size >= LLAMA3_VOCAB else "bpe"
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


def build_args(cfg, tokenizer=None):
    """The model's ModelArgs: the preset, its vocabulary fitted to the tokenizer, the overrides."""
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("max_seq_len", max(cfg.seq_len, get_preset(cfg.preset).max_seq_len))
    if tokenizer is not None:
        overrides["vocab_size"] = tokenizer.n_words
    return get_preset(cfg.preset, **overrides)


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
    logits = model.forward(x).astype(np.float64)  # (B, T, V)
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]  # (B, T)
    picked = np.take_along_axis(logits, y[..., None], -1)[..., 0]
    model._acts = None  # drop the activations kept for a backward that will not come
    return float((lse - picked).sum())


def compute_loss_and_grads(model, x, y):
    """One micro-batch's mean loss and gradients (a separate function so tests can inject faults)."""
    return model.loss_and_grads(x, y)


# ---------------------------------------------------------------------------------------------------
# logging
def _read_log(path, max_step):
    """The log's lines with step <= max_step (a killed run may have logged steps after its checkpoint)."""
    lines = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= max_step:
                lines.append(rec)
    return lines


def plot_losses(run_dir, records, floor=None):
    """loss.png beside the checkpoints: training loss per step, validation loss, the entropy floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("skipped")]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
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
    ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / "loss.png"
    tmp = path.with_name(f".loss.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------
def _is_spike(loss, recent, cfg):
    if len(recent) < cfg.spike_window:
        return False
    mean = float(np.mean(recent))
    return loss > cfg.spike_factor * mean and loss > mean + 1.0


def _setup(cfg, log):
    """A fresh run, or the continuation of the one in cfg.out -> (model, tokenizer, optimizer, loader,
    data arrays, loop state)."""
    run_dir = Path(cfg.out)
    existing = ckpt.list_checkpoints(run_dir)
    if run_dir.is_dir():
        for stale in run_dir.glob(".*.tmp*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    if existing and not cfg.resume:
        raise ValueError(f"{run_dir} already holds a training run ({existing[0].name}); "
                         "pass --resume to continue it or choose another --out folder")
    if existing:
        return _resume(cfg, run_dir, log)
    return _fresh(cfg, run_dir, log)  # also a --resume of a run killed before its first checkpoint


def _fresh(cfg, run_dir, log):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").unlink(missing_ok=True)
    base_vocab = build_args(cfg).vocab_size
    tok, arrays = prepare_data(cfg, base_vocab, log)
    args = build_args(cfg, tok)
    if args.vocab_size != base_vocab:
        log(f"vocabulary: {args.vocab_size} ids (the {cfg.preset} preset has {base_vocab}; the tokenizer "
            f"has {tok.n_words}" + (", every word of the grammar is already one token)" if cfg.data is None else ")"))
    data_mod.save_arrays_atomic(run_dir / "data.npz", **arrays)
    atomic_write_bytes(run_dir / "config.json",
                            json.dumps(dict(cfg.to_json(), model_args=args.to_dict()), indent=2).encode())
    model = Transformer(args, seed=cfg.seed)
    opt = AdamW(model.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    loader = data_mod.DataLoader(arrays["train"], cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    state = dict(step=0, recent=[], bad_in_row=0, n_skipped=0, tokens=0, rng=np.random.default_rng(cfg.seed))
    return model, tok, opt, loader, arrays, state


def _resume(cfg, run_dir, log):
    from ..args import ModelArgs
    from ..tokenizer import Tokenizer

    saved = json.loads((run_dir / "config.json").read_text())
    now = cfg.to_json()
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in now if saved.get(k) != now.get(k)]
    if diff:
        raise ValueError("--resume needs the arguments of the first run (to continue it exactly); "
                         "these differ: " + "; ".join(diff))
    path, ck = ckpt.latest_checkpoint(run_dir)  # the newest that passes its checksum (warns otherwise)
    meta = ck["meta"]
    tok = Tokenizer.from_bytes(ck["tokenizer_bytes"], name="checkpoint tokenizer")
    with np.load(run_dir / "data.npz") as z:
        arrays = {k: z[k] for k in z.files}
    model = Transformer(ModelArgs.from_dict(meta["model_args"]), seed=cfg.seed)
    if set(ck["params"]) != set(model.params):
        raise ValueError(f"{path}: its weights do not match its ModelArgs")
    model.params.update(ck["params"])
    opt = AdamW(model.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    opt.load_state_dict(ck["opt_state"])
    loader = data_mod.DataLoader(arrays["train"], cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    loader.load_state_dict(meta["loader"])
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]
    state = dict(step=meta["step"], recent=list(meta["recent"]), bad_in_row=meta["bad_in_row"],
                 n_skipped=meta["n_skipped"], tokens=meta["tokens"], rng=rng)
    log(f"resuming {run_dir} from {path.name} (step {meta['step']})")
    return model, tok, opt, loader, arrays, state


def _save(cfg, model, tok, opt, loader, state):
    meta = dict(model_args=model.args.to_dict(), loader=loader.state_dict(), rng=state["rng"].bit_generator.state,
                recent=state["recent"], bad_in_row=state["bad_in_row"], n_skipped=state["n_skipped"],
                tokens=state["tokens"])
    return ckpt.save_checkpoint(cfg.out, state["step"], model.params, opt.state_dict(), tok.to_bytes(), meta,
                                keep=cfg.keep)


def train(cfg: TrainConfig, log=None, on_eval=None, on_start=None):
    """Run (or resume) training as configured; returns the trained model (tokenizer attached).

    log(msg) receives progress messages (default: print to stderr). on_start(model) is called once
    before the first step; on_eval(step, model, val_loss, rng) after every validation, e.g. to print
    samples drawn with `rng`, the run's random generator (checkpointed, so a resumed run draws the
    same). Raises TrainingError after max_bad_steps bad steps in a row (after saving a checkpoint
    of the last good weights).
    """
    cfg = cfg.resolved()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    model, tok, opt, loader, arrays, state = _setup(cfg, log)
    model.tokenizer = tok
    run_dir = Path(cfg.out)
    floor = float(arrays["val_floor"]) if "val_floor" in arrays else None
    log_path = run_dir / "log.jsonl"
    records = _read_log(log_path, state["step"])
    atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in records).encode())
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    if on_start is not None:
        on_start(model)

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    logf = open(log_path, "a")
    t_last = time.perf_counter()
    try:
        while state["step"] < cfg.steps:
            step = state["step"]
            lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
            loss, grads = 0.0, None
            for _ in range(cfg.grad_accum):
                x, y = loader.next_batch()
                l, g = compute_loss_and_grads(model, x, y)
                loss += float(l) / cfg.grad_accum
                if grads is None:
                    grads = g
                else:
                    for k in grads:
                        grads[k] += g[k]
            if cfg.grad_accum > 1:
                for g in grads.values():
                    g /= cfg.grad_accum
            norm = clip_grad_norm(grads, cfg.grad_clip)
            reason = None
            if not math.isfinite(loss):
                reason = "non-finite loss"
            elif not math.isfinite(norm):
                reason = "non-finite gradient"
            elif _is_spike(loss, state["recent"], cfg):
                reason = f"loss spike ({loss:.3f} vs recent mean {np.mean(state['recent']):.3f})"
            rec = {"step": step + 1, "loss": loss if math.isfinite(loss) else str(loss), "lr": lr,
                   "grad_norm": norm if math.isfinite(norm) else str(norm)}
            if reason is None:
                opt.step(grads, lr=lr)
                state["recent"] = (state["recent"] + [loss])[-cfg.spike_window:]
                state["bad_in_row"] = 0
            else:
                state["bad_in_row"] += 1
                state["n_skipped"] += 1
                rec["skipped"] = reason
                log(f"step {step + 1}: skipped ({reason})")
            state["step"] = step + 1
            state["tokens"] += tokens_per_step
            now = time.perf_counter()
            rec["tok_per_s"] = round(tokens_per_step / max(now - t_last, 1e-9), 1)
            t_last = now
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            records.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_per_s']:.0f}", refresh=False)
                bar.update(1)
            if state["bad_in_row"] >= cfg.max_bad_steps:
                path = _save(cfg, model, tok, opt, loader, state)
                raise TrainingError(
                    f"{state['bad_in_row']} bad steps in a row (last: {reason}) at step {step + 1}: stopping. "
                    f"The weights before them are saved in {path}; lower --lr or check the data.")
            done = state["step"] == cfg.steps
            if state["step"] % cfg.eval_every == 0 or done:
                val = evaluate(model, arrays["val"], cfg.seq_len)
                vrec = {"step": state["step"], "val_loss": val}
                if floor is not None:
                    vrec["floor"] = floor
                logf.write(json.dumps(vrec) + "\n")
                logf.flush()
                records.append(vrec)
                msg = f"step {state['step']}: val loss {val:.4f}"
                if floor is not None:
                    msg += f" (entropy floor {floor:.4f}, {val - floor:+.4f} above it)"
                (bar.write if bar is not None else log)(msg)
                if on_eval is not None:
                    on_eval(state["step"], model, val, state["rng"])
            if state["step"] % cfg.save_every == 0 or done:
                _save(cfg, model, tok, opt, loader, state)
            if state["step"] % cfg.eval_every == 0 or done:
                plot_losses(run_dir, records, floor)  # with the validation point just added
    finally:
        logf.close()
        if bar is not None:
            bar.close()
    model.train_records = records
    return model
