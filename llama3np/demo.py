"""`llama3np demo`: pre-train a tiny Llama 3 on the built-in stories in about two minutes, end to end.

What it shows: samples from the untrained model (noise), training with a progress bar, samples from
the trained model (stories), the validation loss next to the corpus's entropy (the lowest loss any
model can reach, known exactly because the stories come from our own grammar), and the loss plot.
"""
import sys
import time
from pathlib import Path

from .args import n_params
from .generation import generate
from .training import TrainConfig, train
from .training import run_folder as ckpt

# About two minutes on 2 idle cores with the tiny preset (~0.6 s per step of 8 x 256 tokens): the
# validation loss comes within 0.3 nats/token of the entropy after ~100 steps and keeps improving.
DEMO = dict(preset="tiny", batch_size=8, seq_len=256, lr=3e-3, steps=150, eval_every=50, save_every=50,
            val_stories=100)
TARGET_GAP = 0.3  # nats/token above the entropy floor


def _samples(model, n=2, max_new_tokens=120, seed=0, temperature=0.8):
    tok = model.tokenizer
    prompt = tok.encode("Once upon a time", bos=True, eos=False)
    out = []
    for i in range(n):
        ids = generate(model, prompt, max_new_tokens, temperature=temperature, top_p=0.95, seed=seed + i)
        out.append(tok.decode(prompt[1:] + ids))
    return out


def _print_samples(title, texts, out):
    print(f"\n--- {title} ---", file=out)
    for i, t in enumerate(texts):
        print(f"[{i + 1}] {t.strip()}\n", file=out)
    out.flush()


def run_demo(out="runs/demo", steps=None, seed=0, stream=None, overwrite=False):
    """Train, sample, report. A run already in `out` is refused unless overwrite (the rule of
    `llama3np train`: nothing is replaced without asking)."""
    stream = stream or sys.stdout
    run_dir = Path(out)
    kw = dict(DEMO)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        kw.update(steps=steps, eval_every=min(kw["eval_every"], steps), save_every=min(kw["save_every"], steps))
    cfg = TrainConfig(out=str(run_dir), seed=seed, overwrite=overwrite, **kw).resolved()  # checked before printing
    existing = ckpt.list_checkpoints(run_dir)
    if existing and not overwrite:
        raise ValueError(f"{run_dir} already holds a run ({existing[0].name}); pass --overwrite to replace it, or "
                         "choose another --out folder")
    a = cfg  # for the header line
    print(f"llama3np demo: pre-training the '{a.preset}' Llama 3 on the built-in stories "
          f"({a.steps} steps of {a.batch_size}x{a.seq_len} tokens)", file=stream)

    def on_start(model):
        args = model.args
        print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads ({args.n_kv_heads} kv), "
              f"FFN {args.ffn_hidden_dim}, vocab {args.vocab_size}: {n_params(args) / 1e6:.1f}M parameters",
              file=stream)
        _print_samples("samples before training (random weights)", _samples(model, n=1, max_new_tokens=40), stream)
        print("training...", file=stream)
        stream.flush()

    t0 = time.perf_counter()
    model = train(cfg, log=lambda m: print(m, file=stream), on_start=on_start)
    wall = time.perf_counter() - t0
    _print_samples("samples after training", _samples(model, n=3), stream)
    recs = model.train_records
    val = [r for r in recs if "val_loss" in r][-1]
    gap = val["val_loss"] - val["floor"]
    verdict = "within" if gap <= TARGET_GAP else "NOT within"
    print(f"validation loss {val['val_loss']:.4f} nats/token; the corpus's entropy is {val['floor']:.4f} "
          f"nats/token (the lowest any model can reach), so the model is {gap:.4f} above it: {verdict} the "
          f"{TARGET_GAP} target.", file=stream)
    print(f"wall time {wall:.0f} s (training, validation, samples).", file=stream)
    print(f"checkpoint: {ckpt.list_checkpoints(run_dir)[0]}  loss plot: {run_dir / 'loss.png'}", file=stream)
    print(f"continue a story:  llama3np generate --model {run_dir} --prompt \"Once upon a time\"", file=stream)
    print(f"chat with it:      llama3np chat --model {run_dir}   (it knows stories, not conversations)", file=stream)
    return model, val["val_loss"], val["floor"], wall
