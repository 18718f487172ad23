"""The training configuration, defined once: TrainConfig and its command-line arguments.

    cfg = TrainConfig(out="runs/tiny", steps=300)              # in Python
    add_train_arguments(parser); cfg = train_config(args)       # `llama3np train` and `parallel train`
    cfg = resume_config("runs/tiny", steps=400)                 # a run's own config, with a change

A run folder's config.json holds `cfg.to_json()` and the model's ModelArgs. A resumed run is compared
with it field by field (`resume_changes`):
  - the fields that decide what the run computes (model, data, tokenizer, seed, batch, learning rate,
    ...) may not change: the run would become another one, so a change is refused;
  - `steps` may change (a run can be extended): the cosine schedule is stretched from the checkpoint
    on, so later steps use other learning rates than the original plan (the loop says so in its log);
  - where the folder is (`out`: a copied or moved folder resumes), how often to save and validate,
    how many checkpoints to keep, the progress bar: these change no number and may differ freely.
Nothing here imports a command-line module: the CLIs import this.
"""
import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from ..args import LLAMA3_VOCAB_SIZE, ModelArgs
from ..args import preset as get_preset


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
    doc_mask: bool = False  # documents packed in a row attend only within themselves (Llama 3's mask)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: Optional[int] = None  # None: 10% of the steps (at most 100)
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    save_every: int = 100
    keep: int = 3  # checkpoints kept (each holds the weights and AdamW's two moments: 3x the weights)
    final_weights_only: bool = False  # the last checkpoint without AdamW's moments (1/3 the size; not resumable)
    eval_every: int = 50
    val_fraction: float = 0.05  # for --data corpora
    n_stories: Optional[int] = None  # built-in corpus size; None: enough that no story is seen twice
    val_stories: int = 100
    seed: int = 0
    spike_factor: float = 2.0  # a loss above spike_factor * recent mean (and 1 nat above it) is a spike
    spike_window: int = 20
    max_bad_steps: int = 5  # this many bad steps in a row stop the run
    resume: bool = False
    overwrite: bool = False  # replace a run already in `out` (instead of refusing)
    progress: bool = True  # tqdm bar

    # what this invocation does, not what the run is: not written to config.json
    _RUNTIME = ("resume", "overwrite", "progress")
    # may differ on resume without changing any number the run computes
    _FREE = ("out", "save_every", "keep", "final_weights_only", "eval_every")
    # may differ on resume and changes the numbers from the checkpoint on (logged)
    _EXTENDABLE = ("steps",)

    def resolved(self):
        """A copy with the defaults that depend on other fields filled in, every value checked."""
        c = dataclasses.replace(self, out=str(self.out), betas=tuple(float(b) for b in self.betas),
                                model_overrides=dict(self.model_overrides))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "eval_every", "keep",
                     "max_bad_steps", "spike_window", "val_stories"):
            check_int(name, getattr(c, name), 1, "a positive integer")
        if c.n_stories is not None:
            check_int("n_stories", c.n_stories, 1, "None or a positive integer")
        check_int("seed", c.seed, 0, "an integer >= 0")
        if c.warmup_steps is None:
            c.warmup_steps = min(100, max(1, c.steps // 10))
        check_int("warmup_steps", c.warmup_steps, 0, "an integer >= 0 (0: no warmup)")
        if not finite_number(c.lr) or c.lr <= 0:
            raise ValueError(f"lr must be > 0, got {c.lr}")
        for name, low, high, what in (("min_lr_ratio", 0, 1, "in [0, 1]"), ("weight_decay", 0, math.inf, ">= 0"),
                                      ("grad_clip", 0, math.inf, ">= 0 (0: no clipping)"),
                                      ("val_fraction", 0, 1, "in [0, 1]"), ("spike_factor", 1, math.inf, ">= 1")):
            v = getattr(c, name)
            if not finite_number(v) or not low <= v <= high:
                raise ValueError(f"{name} must be {what}, got {v!r}")
        if len(c.betas) != 2 or not all(0 <= b < 1 for b in c.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {c.betas}")
        if not finite_number(c.eps) or c.eps <= 0:
            raise ValueError(f"eps must be > 0, got {c.eps}")
        args = build_args(c)  # an unknown preset or a bad --override fails here, before any file is written
        if c.seq_len > args.max_seq_len:
            raise ValueError(
                f"seq_len {c.seq_len} is longer than the model's context of {args.max_seq_len} tokens (max_seq_len "
                f"of the {c.preset!r} preset{' with the overrides' if c.model_overrides else ''}): lower --seq-len, "
                f"or give the model a longer context with --override max_seq_len={c.seq_len} (the attention's "
                "memory and time grow with the square of it)")
        return c

    def to_json(self):
        """The run's identity and settings, as written to config.json (without the _RUNTIME fields)."""
        d = asdict(self)
        for k in self._RUNTIME:
            d.pop(k)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_json(cls, saved, **changes):
        """A TrainConfig from a config.json's dict (its model_args and unknown keys ignored), with changes."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in saved.items() if k in known}
        kw.update(changes)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


def finite_number(v):
    """A real number, not a bool, not nan or inf (the config checks here and post-training's share it)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_int(name, v, low, what):
    """A whole number >= low (not a bool), or a ValueError naming it and `what` was expected."""
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"{name} must be {what}, got {v!r}")


def build_args(cfg, tokenizer=None):
    """The model's ModelArgs: the preset, the overrides, the vocabulary fitted to the tokenizer (if given).

    The context (max_seq_len) is the preset's unless overridden; TrainConfig.resolved refuses a
    seq_len longer than it."""
    overrides = dict(cfg.model_overrides)
    if tokenizer is not None:
        overrides["vocab_size"] = tokenizer.n_words
    return get_preset(cfg.preset, **overrides)


def default_tokenizer(vocab_size):
    """What tokenizer="auto" means: Meta's for Llama 3's full vocabulary, else a BPE trained on the corpus."""
    return "llama3" if vocab_size >= LLAMA3_VOCAB_SIZE else "bpe"


# ---------------------------------------------------------------------------------------------------
# resume


def read_run_config(run_dir):
    """The dict in a run folder's config.json (TrainConfig.to_json() + "model_args"), or None if absent."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): is {run_dir} a llama3np training run?") from None


def resume_config(run_dir, **changes):
    """The config a run in `run_dir` was started with, with `changes` (e.g. steps=400), set to resume.

    Raises FileNotFoundError if the folder holds no config.json."""
    saved = read_run_config(run_dir)
    if saved is None:
        raise FileNotFoundError(f"{run_dir} holds no config.json: not a llama3np training run")
    changes.setdefault("resume", True)
    return TrainConfig.from_json(saved, out=str(run_dir), **changes)


def resume_changes(saved, cfg):
    """Compare a resumed cfg with the run's saved config.json dict -> {field: (saved, new)} of the
    changes that are allowed (`steps` and the _FREE fields); ValueError naming every refused change.

    A field the caller left at None where the run has a value (warmup_steps, n_stories) means "as
    the run had it": resume with cfg = resume_config(...) or fill those first (see loop.start_run).
    """
    now = json.loads(json.dumps(cfg.to_json()))  # JSON-normalised, as config.json was
    refused, allowed = [], {}
    for k, v in now.items():
        if k in TrainConfig._RUNTIME or saved.get(k, _missing(k)) == v:
            continue
        change = f"{k}: {saved.get(k, _missing(k))!r} -> {v!r}"
        if k in TrainConfig._FREE or k in TrainConfig._EXTENDABLE:
            allowed[k] = (saved.get(k, _missing(k)), v)
        else:
            refused.append(change)
    if refused:
        raise ValueError(f"--resume continues the run in {cfg.out} with its own arguments; these would make it "
                         f"another run: {'; '.join(refused)}. Leave them out (a resume takes the run's own "
                         "config.json), or start a new run in another --out folder")
    return allowed


def _missing(name):
    """The value a field had for a config.json written before the field existed: its default."""
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def fill_from_saved(cfg, saved):
    """cfg with the fields it leaves at None (warmup_steps, n_stories) taken from the saved run config."""
    return dataclasses.replace(cfg, **{k: saved[k] for k in ("warmup_steps", "n_stories")
                                       if getattr(cfg, k) is None and saved.get(k) is not None})


# ---------------------------------------------------------------------------------------------------
# command-line arguments


class UsageError(ValueError):
    """A problem with what the user asked for: printed as one line, exit code 2 (a ValueError, so
    every command that reports bad values reports these too)."""


# (flag, TrainConfig field, type, help): defaults are TrainConfig's, shown in the help. The parser's
# own default is None ("not given"), so that `--resume` can take the rest from the run's config.json.
_FLAGS = [
    ("--preset", "preset", str, "model size: tiny, small, llama3.2-1b, ..."),
    ("--data", "data", str, "a text file or a folder of .txt files (default: the built-in stories)"),
    ("--tokenizer", "tokenizer", str, "bpe (trained on the corpus), llama3 (Meta's), or a .model path (default "
     f"auto: bpe for small vocabularies, llama3 for {LLAMA3_VOCAB_SIZE})"),
    ("--steps", "steps", int, "optimizer steps; on --resume a larger number extends the run"),
    ("--batch-size", "batch_size", int, "rows per step (parallel: the global batch, all replicas together)"),
    ("--seq-len", "seq_len", int, "tokens per row (at most the model's context, max_seq_len)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps (default: 10%% of the steps, at most 100)"),
    ("--save-every", "save_every", int, "a checkpoint every N steps (and at the end)"),
    ("--keep", "keep", int, "checkpoints kept, newest first (each is weights + AdamW moments: 3x the weights)"),
    ("--eval-every", "eval_every", int, "validation every N steps (parallel: at the end only)"),
    ("--n-stories", "n_stories", int, "built-in corpus size (default: enough that no story is seen twice)"),
    ("--val-stories", "val_stories", int, "built-in stories held out for validation"),
    ("--seed", "seed", int, "random seed: weights, corpus, batch order"),
]


def add_train_arguments(parser):
    """The arguments of `llama3np train`, shared with `llama3np parallel train`: TrainConfig's fields."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    parser.add_argument("--out", required=True, help="run folder: config.json, data.npz, checkpoints, log.jsonl, "
                                                     "loss.png")
    for flag, name, kind, text in _FLAGS:
        if "(default" not in text:
            text += f" (default: {defaults[name]})"
        parser.add_argument(flag, dest=name, type=kind, default=None, help=text)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size (BPE: at most this many tokens; default: the preset's)")
    parser.add_argument("--override", action="append", metavar="KEY=VALUE", default=None,
                        help="change a ModelArgs field, e.g. --override dim=64 --override n_layers=2 (default: none)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint, with its own arguments "
                             "(give only what changes, e.g. --steps to extend it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in --out (default: refuse, and keep it)")
    parser.add_argument("--doc-mask", action="store_true", default=None,
                        help="document-masked attention: the documents packed in a row (each starts with BOS) "
                             "attend only within themselves, as in Llama 3's pre-training (default: off, "
                             "plain causal attention over the whole row)")
    parser.add_argument("--final-weights-only", action="store_true",
                        help="the final checkpoint without AdamW's moments: 1/3 the size, but the run cannot be "
                             "resumed or extended from it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_backend_argument(parser, default_help="c if the C kernels are built, else numpy"):
    """--backend: the compute kernels, c or numpy. One meaning in every command (train, generate, chat,
    demo, parallel train, whose communication backend is --comm)."""
    parser.add_argument("--backend", type=_backend_name, default=None, metavar="{c,numpy}",
                        help=f"compute kernels: c (the C extension) or numpy (default: {default_help})")


def _backend_name(value):
    import argparse

    if value in ("mp", "mpi"):
        raise argparse.ArgumentTypeError(f"--backend chooses the compute kernels (c or numpy); the communication "
                                         f"backend of `parallel train` is --comm {value}")
    if value not in ("c", "numpy"):
        raise argparse.ArgumentTypeError(f"expected c or numpy, got {value!r}")
    return value


def parse_overrides(items):
    """['dim=64', 'use_scaled_rope=true'] -> {'dim': 64, 'use_scaled_rope': True} (ModelArgs fields only)."""
    kinds = {f.name for f in fields(ModelArgs)}
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


def train_config(a):
    """The TrainConfig of arguments parsed with add_train_arguments, checked (nothing is written).

    With --resume and a run already in --out, the run's own config.json, changed only by the flags
    given on this command line (resume_changes then says which changes are allowed)."""
    given = {name: getattr(a, name) for _, name, _, _ in _FLAGS if getattr(a, name) is not None}
    if a.override is not None or a.vocab_size is not None:
        overrides = parse_overrides(a.override)
        if a.vocab_size is not None:
            overrides["vocab_size"] = a.vocab_size
        given["model_overrides"] = overrides
    if a.data is not None and not Path(a.data).exists():
        raise UsageError(f"--data: corpus path not found: {a.data}")
    if a.doc_mask:
        given["doc_mask"] = True
    if a.final_weights_only:
        given["final_weights_only"] = True
    runtime = dict(resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
    if a.resume and a.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if a.resume and read_run_config(a.out) is not None:
        cfg = resume_config(a.out, **given, **runtime)
    else:
        cfg = TrainConfig(out=a.out, **given, **runtime)
    cfg.resolved()  # every value checked now, before a file is written
    return cfg
