"""The `llama3np` command: train, generate, chat, demo.

    llama3np demo                                   train the tiny preset on the built-in stories (~2 min)
    llama3np train --out runs/tiny --steps 300      pre-train (--resume continues exactly)
    llama3np generate --model runs/tiny --prompt "Once upon a time"
    llama3np chat --model runs/tiny                 (or a downloaded Llama 3 Instruct folder)

Mistakes in the arguments (a missing model, an empty prompt, a prompt longer than the context) end with
one line on stderr and exit code 2, never a traceback.
"""
import argparse
import codecs
import sys
from pathlib import Path


class UsageError(ValueError):
    """A problem with what the user asked for: printed as one line, exit code 2 (a ValueError, so
    every command that reports bad values reports these too)."""


# ---------------------------------------------------------------------------------------------------
def load_model(path):
    """A training run folder or checkpoint file (ours), or anything else `llama3np.load` reads (HF, Meta)."""
    from .formats import load

    if not Path(path).exists():
        raise UsageError(f"model path not found: {path}")
    return load(path)


class TextStreamer:
    """Turns token ids into text as they come, holding back bytes that are not yet a whole UTF-8 char."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, token_id):
        text = self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        if text:
            self.out.write(text)
            self.out.flush()

    def end(self):
        self.out.write(self.decoder.decode(b"", final=True))
        self.out.flush()


def _sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backend", choices=("c", "numpy"), default=None, help="default: c if built, else numpy")


def _set_backend(name):
    from . import backend

    if name is not None:
        backend.set_backend(name)
        return
    try:
        backend.set_backend("c")
    except Exception:  # the C kernels are not built: stay on NumPy
        pass


def _parse_overrides(items):
    from .args import ModelArgs
    import dataclasses

    kinds = {f.name: f.type for f in dataclasses.fields(ModelArgs)}
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--override expects KEY=VALUE (a ModelArgs field), got {item!r}")
        key, value = item.split("=", 1)
        if key not in kinds:
            raise UsageError(f"--override: {key!r} is not a ModelArgs field; expected one of {sorted(kinds)}")
        try:
            if value.lower() in ("none", "null"):
                out[key] = None
            elif value.lower() in ("true", "false"):
                out[key] = value.lower() == "true"
            else:
                out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise UsageError(f"--override {key}: {value!r} is not a number") from None
    return out


# ---------------------------------------------------------------------------------------------------
def train_config(a, progress):
    """The TrainConfig of the arguments add_train_arguments defined (for `train` and `parallel train`)."""
    from .training import TrainConfig

    overrides = _parse_overrides(a.override)
    if a.vocab_size is not None:
        overrides["vocab_size"] = a.vocab_size
    if a.data is not None and not Path(a.data).exists():
        raise UsageError(f"--data: corpus path not found: {a.data}")
    return TrainConfig(out=a.out, preset=a.preset, data=a.data, tokenizer=a.tokenizer, model_overrides=overrides,
                       steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum,
                       lr=a.lr, warmup_steps=a.warmup_steps, save_every=a.save_every, eval_every=a.eval_every,
                       seed=a.seed, resume=a.resume, progress=progress, n_stories=a.n_stories,
                       val_stories=a.val_stories)


def cmd_train(a):
    from .training import train

    _set_backend(a.backend)
    cfg = train_config(a, progress=not a.no_progress)
    model = train(cfg)
    vals = [r for r in model.train_records if "val_loss" in r]
    summary = f"validation loss {vals[-1]['val_loss']:.4f}" if vals else "no validation yet"
    if vals and "floor" in vals[-1]:
        summary += f" (entropy floor {vals[-1]['floor']:.4f})"
    print(f"done: step {cfg.steps}, {summary}; checkpoints in {a.out}\n"
          f"try: llama3np generate --model {a.out} --prompt \"Once upon a time\"", file=sys.stderr)


def cmd_generate(a):
    from .generation import generate_stream

    if not a.prompt or not a.prompt.strip():
        raise UsageError("the prompt is empty: pass some text with --prompt")
    _set_backend(a.backend)
    model = load_model(a.model)
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{a.model} has no tokenizer, so text cannot be encoded")
    ids = tok.encode(a.prompt, bos=True, eos=False)
    ctx = model.args.max_seq_len
    if len(ids) >= ctx:
        raise UsageError(f"the prompt is {len(ids)} tokens long; the model's context is {ctx} tokens: shorten it")
    out = TextStreamer(tok)
    sys.stdout.write(a.prompt)
    for t in generate_stream(model, ids, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                             top_k=a.top_k, seed=a.seed):
        out.put(t)
    out.end()
    sys.stdout.write("\n")


def cmd_chat(a):
    from .generation import generate_stream
    from .tokenizer import ChatFormat

    _set_backend(a.backend)
    model = load_model(a.model)
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{a.model} has no tokenizer, so text cannot be encoded")
    fmt = ChatFormat(tok)
    dialog = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    print("chat: type a message and press Enter; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        dialog.append({"role": "user", "content": line.strip()})
        ids = fmt.encode_dialog_prompt(dialog)
        room = model.args.max_seq_len - len(ids)
        if room <= 0:
            print(f"llama3np: the conversation ({len(ids)} tokens) no longer fits the context of "
                  f"{model.args.max_seq_len} tokens; start a new chat", file=sys.stderr)
            dialog.pop()
            break
        sys.stdout.write("assistant> ")
        out, reply = TextStreamer(tok), []
        for t in generate_stream(model, ids, min(a.max_new_tokens, room), temperature=a.temperature,
                                 top_p=a.top_p, top_k=a.top_k, seed=a.seed, stop_tokens=tok.stop_tokens):
            reply.append(t)
            out.put(t)
        out.end()
        sys.stdout.write("\n")
        dialog.append({"role": "assistant", "content": tok.decode(reply)})


def cmd_demo(a):
    from .demo import run_demo

    _set_backend(a.backend)
    run_demo(out=a.out, steps=a.steps, seed=a.seed)


# ---------------------------------------------------------------------------------------------------
def add_train_arguments(t):
    """The arguments of `llama3np train`, shared with `llama3np parallel train`."""
    t.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, loss.png")
    t.add_argument("--preset", default="tiny", help="model size: tiny, small, llama3.2-1b, ... (default tiny)")
    t.add_argument("--data", default=None, help="a text file or folder (default: the built-in stories)")
    t.add_argument("--tokenizer", default="auto",
                   help="bpe (trained on the corpus), llama3 (Meta's), or a .model path (default: bpe for "
                        "small vocabularies, llama3 for 128256)")
    t.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: the preset's)")
    t.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="change a ModelArgs field, e.g. --override dim=64 --override n_layers=2")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=8, help="the global batch (all replicas together)")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=50, help="validation every N steps (parallel: at the end)")
    t.add_argument("--n-stories", type=int, default=None, help="built-in corpus size (default: enough)")
    t.add_argument("--val-stories", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser():
    parser = argparse.ArgumentParser(prog="llama3np", description="Llama 3 in NumPy: train, generate, chat.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pre-train a model (the built-in stories or your text)")
    add_train_arguments(t)
    t.add_argument("--backend", choices=("c", "numpy"), default=None)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    g.add_argument("--model", required=True, help="a run folder, or a Hugging Face / Meta checkpoint folder")
    g.add_argument("--prompt", required=True)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat with Llama 3's chat template")
    c.add_argument("--model", required=True)
    c.add_argument("--system", default=None, help="a system message")
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="train the tiny preset on the built-in stories and show samples (~2 min)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="fewer steps for a quick look (default: the full demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", choices=("c", "numpy"), default=None)
    d.set_defaults(func=cmd_demo)

    from .parallel import cli as parallel_cli  # `llama3np parallel train --dp 2 --pp 2 ...`

    parallel_cli.add_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    a = parser.parse_args(argv)
    from .training import TrainingError

    try:
        rc = a.func(a)
    except (ValueError, FileNotFoundError, TypeError) as e:  # UsageError is a ValueError
        print(f"llama3np: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"llama3np: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nllama3np: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
