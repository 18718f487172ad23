"""The `llama3np` command: train, generate, chat, demo.

    llama3np demo                                   train the tiny preset on the built-in stories (~2 min)
    llama3np train --out runs/tiny --steps 300      pre-train (--resume continues exactly; --steps 400 extends)
    llama3np generate --model runs/tiny --prompt "Once upon a time"
    llama3np chat --model runs/tiny                 (or a downloaded Llama 3 Instruct folder)

Mistakes in the arguments (a missing model, an empty prompt, a prompt longer than the context) end with
one line on stderr and exit code 2, never a traceback.
"""
import argparse
import codecs
import sys
from pathlib import Path

# the training arguments and UsageError (a ValueError: one line, exit code 2) are defined in training/
from .training.config import UsageError, add_backend_argument, add_train_arguments  # noqa: F401


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
    p.add_argument("--max-new-tokens", type=int, default=200, help="at most this many new tokens (default: 200)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep the likeliest tokens "
                                                            "up to this probability (default: 0.9)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k likeliest tokens (default: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the sampling (default: a fresh one)")
    add_backend_argument(p)


def _set_backend(name):
    from . import backend

    if name is not None:
        backend.set_backend(name)
        return
    try:
        backend.set_backend("c")
    except Exception:  # the C kernels are not built: stay on NumPy
        pass


# ---------------------------------------------------------------------------------------------------
def cmd_train(a):
    from .training import train
    from .training.config import train_config
    from .training.run_folder import generate_hint

    cfg = train_config(a)  # every argument checked before anything is written or computed
    _set_backend(a.backend)
    model = train(cfg)
    vals = [r for r in model.train_records if "val_loss" in r]
    summary = f"validation loss {vals[-1]['val_loss']:.4f}" if vals else "no validation yet"
    if vals and "floor" in vals[-1]:
        summary += f" (entropy floor {vals[-1]['floor']:.4f})"
    print(f"done: step {cfg.steps}, {summary}; checkpoints in {a.out}\ntry: {generate_hint(a.out)}", file=sys.stderr)


def cmd_generate(a):
    import warnings

    from .generation import ContextLimitWarning, generate_stream

    if not a.prompt or not a.prompt.strip():
        raise UsageError("the prompt is empty: pass some text with --prompt")
    if a.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    _set_backend(a.backend)
    model = load_model(a.model)
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{a.model} has no tokenizer, so text cannot be encoded")
    ids = tok.encode(a.prompt, bos=True, eos=False)
    ctx = model.args.max_seq_len
    if len(ids) >= ctx:
        raise UsageError(f"the prompt is {len(ids)} tokens long; the model's context is {ctx} tokens: shorten it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextLimitWarning)  # said below, once generation has stopped there
        stream = generate_stream(model, ids, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                                 top_k=a.top_k, seed=a.seed)  # checks every argument before anything is printed
    out = TextStreamer(tok)
    sys.stdout.write(a.prompt)
    n = 0
    for t in stream:
        out.put(t)
        n += 1
    out.end()
    sys.stdout.write("\n")
    room = ctx - len(ids)
    if n == room < a.max_new_tokens:
        sys.stdout.flush()
        print(f"llama3np: stopped after {n} of {a.max_new_tokens} new tokens: the model's context of {ctx} tokens "
              f"is full (the prompt took {len(ids)})", file=sys.stderr)


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
            dropped = [line.strip()]
            if not interactive:  # the rest of the piped input up to its end (or an empty line) is not answered
                for rest in sys.stdin:
                    if not rest.strip():
                        break
                    dropped.append(rest.strip())
            first = dropped[0] if len(dropped[0]) <= 60 else dropped[0][:57] + "..."
            print(f"llama3np: the conversation ({len(ids)} tokens) no longer fits the context of "
                  f"{model.args.max_seq_len} tokens; start a new chat. Not answered: {len(dropped)} message(s), "
                  f"from {first!r}", file=sys.stderr)
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
    run_demo(out=a.out, steps=a.steps, seed=a.seed, overwrite=a.overwrite)


# ---------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(prog="llama3np", description="Llama 3 in NumPy: train, generate, chat.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pre-train a model (the built-in stories or your text)")
    add_train_arguments(t)
    add_backend_argument(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    g.add_argument("--model", required=True, help="a run folder, or a Hugging Face / Meta checkpoint folder")
    g.add_argument("--prompt", required=True, help="the text to continue")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat with Llama 3's chat template")
    c.add_argument("--model", required=True, help="a run folder, or a Hugging Face / Meta checkpoint folder")
    c.add_argument("--system", default=None, help="a system message (default: none)")
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="train the tiny preset on the built-in stories and show samples (~2 min)")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--steps", type=int, default=None, help="fewer steps for a quick look (default: the full demo, "
                                                            "150)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument("--overwrite", action="store_true", help="replace a run already in --out (default: refuse)")
    add_backend_argument(d)
    d.set_defaults(func=cmd_demo)

    # the other rooms bring their own sub-commands
    from .data.curation import cli as data_cli  # `llama3np data corpus|curate ...`
    from .doctor import add_subcommands as add_doctor  # `llama3np doctor`
    from .eval import cli as eval_cli  # `llama3np eval mmlu ...`
    from .exercises import cli as exercises_cli  # `llama3np check ...`, `llama3np exercises make ...`
    from .parallel import cli as parallel_cli  # `llama3np parallel train --dp 2 --pp 2 ...`
    from .posttrain import cli as posttrain_cli  # `llama3np sft|rm|rs|dpo|ppo|average ...`, `posttrain demo`

    parallel_cli.add_subcommands(sub)
    data_cli.add_subcommands(sub)
    posttrain_cli.add_subcommands(sub)
    eval_cli.add_subcommands(sub)
    exercises_cli.add_subcommands(sub)
    add_doctor(sub)
    return parser


def main(argv=None):
    import warnings

    parser = build_parser()
    a = parser.parse_args(argv)
    from .training import TrainingError

    def one_line(message, category, filename, lineno, file=None, line=None):
        # a warning (e.g. a damaged checkpoint skipped) as one readable line, not file:line + source
        print(f"llama3np: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
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
