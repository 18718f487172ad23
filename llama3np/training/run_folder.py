"""The run folder: checkpoints that survive a crash at any moment, and finding the latest good one.

A run folder holds
    config.json          the training arguments and the model's ModelArgs
    data.npz             the tokenised training and validation streams (so a resume reads the same data)
    ckpt_00000200.npz    checkpoints, the last few kept
    latest               the file name of the newest checkpoint (a pointer, for tools and humans)
    log.jsonl            one line per step; loss.png, the loss curve

A checkpoint is one .npz file with everything needed to continue bit for bit:
    param/<name>, adam_m/<name>, adam_v/<name>   weights and AdamW moments (float32)
    tokenizer                                     the tokenizer's .model bytes (uint8)
    meta                                          JSON: step, ModelArgs, loader position, RNG state,
                                                  optimizer step count, recent losses, ...
    sha256                                        a checksum of all the above
It is three times the size of the weights (two AdamW moments per weight; Llama 3's 128,256-token
vocabulary makes even a tiny model's embeddings large: 2 x 128256 x 256 floats, ~260 MB of weights,
~800 MB a checkpoint). The moments are kept in every checkpoint because any kept checkpoint may have
to be the one a run resumes from (the newest can be damaged), and continuing exactly needs them.
`keep` bounds how many are kept; a final checkpoint may be written weights-only (no moments: it
loads for generation, but the run cannot continue from it).

The API both training loops (and post-training stages) use:
    save_run(run_dir, params=..., opt_state=..., tokenizer_bytes=..., model_args=..., loader_state=...,
             state=RunState, keep=3)              -> the checkpoint's path (metadata built here only)
    restore_run(run_dir)                          -> Restored (path, model_args, params, opt_state, ...,
                                                     state) or None: metadata read here only
    trim_log(run_dir / "log.jsonl", step)         -> the log's records up to `step` (see trim_log)
    append_log(f, record)                          one line, flushed
    load_run(run_dir)                             -> a Transformer with its tokenizer, for inference

Writing is atomic: the file is written under a temporary name in the same folder, flushed to disk
(fsync) and renamed over the final name (rename is atomic on POSIX), then the folder is fsynced so the
rename itself survives a power cut. A SIGKILL mid-write leaves a stray temporary file and the old
checkpoints intact. Only log.jsonl is appended in place, line by line (see trim_log). A checkpoint that is damaged anyway (disk error, manual edit, truncated copy) fails
its checksum and the loader falls back to the previous one, with a warning.
"""
import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..fileio import atomic_write, atomic_write_bytes
from .step import RunState

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.npz$")
OPT_FIELDS = ("t", "lr", "betas", "eps", "weight_decay")  # AdamW's state besides its moments


def ckpt_name(step):
    return f"ckpt_{step:08d}.npz"


def _checksum(arrays):
    """sha256 over every entry's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(run_dir, step, params, opt_state, tokenizer_bytes, meta, keep=3):
    """Write ckpt_{step:08d}.npz atomically, point `latest` at it, delete all but the newest `keep`.

    opt_state None writes the weights only (meta["weights_only"] is then true)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, step=int(step))
    if opt_state is None:
        meta["weights_only"] = True
    else:
        meta["opt"] = {k: opt_state[k] for k in OPT_FIELDS}
    arrays = {}
    for name, p in params.items():
        arrays[f"param/{name}"] = p
        if opt_state is not None:
            arrays[f"adam_m/{name}"] = opt_state["m"][name]
            arrays[f"adam_v/{name}"] = opt_state["v"][name]
    arrays["tokenizer"] = np.frombuffer(bytes(tokenizer_bytes), dtype=np.uint8)
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    arrays["sha256"] = np.frombuffer(_checksum(arrays).encode(), dtype=np.uint8)
    path = run_dir / ckpt_name(step)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    atomic_write_bytes(run_dir / "latest", (path.name + "\n").encode())
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir):
    """Checkpoint files in the folder, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


class CorruptCheckpoint(ValueError):
    pass


def read_checkpoint(path):
    """Load and verify one checkpoint file -> dict with params, opt_state (None if weights-only),
    tokenizer_bytes, meta.

    Raises CorruptCheckpoint if the file cannot be read or its checksum does not match.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: np.array(z[name]) for name in z.files}  # writable copies
    except Exception as e:  # truncated zip, bad CRC, not a zip at all ...
        raise CorruptCheckpoint(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if "sha256" not in arrays or "meta" not in arrays:
        raise CorruptCheckpoint(f"{path}: not a llama3np training checkpoint (no sha256/meta entries)")
    stored = arrays.pop("sha256").tobytes().decode(errors="replace")
    if _checksum(arrays) != stored:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (the file is damaged)")
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    ck = {"meta": meta, "tokenizer_bytes": arrays.pop("tokenizer").tobytes(), "params": {}}
    m, v = {}, {}
    for key, a in arrays.items():
        kind, name = key.split("/", 1)
        {"param": ck["params"], "adam_m": m, "adam_v": v}[kind][name] = a
    ck["opt_state"] = None if meta.get("weights_only") else dict(meta["opt"], m=m, v=v)
    return ck


def latest_checkpoint(run_dir, warn=True):
    """-> (path, checkpoint dict) of the newest checkpoint that verifies, or (None, None) if none exist.

    Damaged checkpoints are skipped, each with one line: a RuntimeWarning (warn=True), a call
    warn(message) when warn is a function (a log), nothing when False. If every one is damaged,
    CorruptCheckpoint.
    """
    candidates = list_checkpoints(run_dir)
    errors = []
    for path in candidates:
        try:
            ck = read_checkpoint(path)
        except CorruptCheckpoint as e:
            errors.append(str(e))
            message = f"skipping damaged checkpoint: {e}; trying the previous one"
            if callable(warn):
                warn(message)
            elif warn:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            continue
        return path, ck
    if errors:
        raise CorruptCheckpoint(f"no usable checkpoint in {run_dir}: " + "; ".join(errors))
    return None, None


# ---------------------------------------------------------------------------------------------------
# the step/save/restore API of a run


def checkpoint_meta(model_args, loader_state, state, extra=None):
    """The metadata of a checkpoint (the one place it is built): ModelArgs, the data position, the
    RunState (step, recent losses, counters, RNG) and any JSON-able `extra` (e.g. a post-training stage)."""
    meta = dict(extra or {})
    meta.update(model_args=model_args.to_dict(), loader=loader_state, **state.to_meta())
    return meta


def save_run(run_dir, *, params, opt_state, tokenizer_bytes, model_args, loader_state, state, keep=3,
             extra=None, log=None):
    """Write the checkpoint of `state.step`: weights, AdamW state (opt.state_dict(); None = weights only),
    tokenizer, ModelArgs, the loader's position (any JSON-able dict), the RunState -> its path.

    log(message), if given, receives the file's size and what is kept, so big checkpoints do not come
    as a surprise."""
    path = save_checkpoint(run_dir, state.step, params, opt_state, tokenizer_bytes,
                           checkpoint_meta(model_args, loader_state, state, extra), keep=keep)
    if log is not None:
        weights = sum(p.nbytes for p in params.values())
        parts = f"weights {_size(weights)}" + ("" if opt_state is None else
                                                f" + AdamW moments {_size(2 * weights)}")
        kept = list_checkpoints(run_dir)
        log(f"saved {path.name}: {_size(path.stat().st_size)} ({parts}); {len(kept)} kept (--keep {keep}), "
            f"{_size(sum(p.stat().st_size for p in kept))} in all")
    return path


def _size(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclass
class Restored:
    """A run's latest good checkpoint, unpacked (restore_run)."""
    path: Path
    model_args: object  # ModelArgs
    params: dict
    opt_state: Optional[dict]  # AdamW's state_dict, None for a weights-only checkpoint
    tokenizer_bytes: bytes
    loader_state: dict
    state: RunState
    meta: dict


def restore_run(run_dir, warn=True):
    """The newest checkpoint of `run_dir` that verifies, unpacked, or None if the folder holds no
    checkpoint. Damaged ones are skipped (warn: see latest_checkpoint)."""
    path, ck = latest_checkpoint(run_dir, warn=warn)
    return None if ck is None else unpack(path, ck)


def unpack(path, ck):
    """read_checkpoint's dict -> Restored: the one place a checkpoint's metadata is read."""
    from ..args import ModelArgs

    meta = ck["meta"]
    return Restored(path=Path(path), model_args=ModelArgs.from_dict(meta["model_args"]), params=ck["params"],
                    opt_state=ck["opt_state"], tokenizer_bytes=ck["tokenizer_bytes"], loader_state=meta["loader"],
                    state=RunState.from_meta(meta), meta=meta)


# weights that ride beside the model in a post-training checkpoint: PPO's value model ("value/..."), a reward
# model's head ("score.weight", "score.logp_weight"). No model weight is named so: loading the model (to chat with
# a PPO run, say) reads past them and still catches any other mismatch
EXTRA_WEIGHT_PREFIXES = ("value/", "score.")


def fill_params(model, params, where):
    """Copy checkpoint arrays into the model's weights IN PLACE: they stay in the model's one block of
    memory (model.py); replacing the arrays (model.params.update) would scatter them."""
    if set(params) != set(model.params):
        missing = sorted(set(model.params) - set(params))[:3]
        extra = sorted(set(params) - set(model.params))[:3]
        raise ValueError(f"{where}: its weights do not match its ModelArgs (missing {missing}, unexpected {extra})")
    for name, p in model.params.items():
        a = params[name]
        if a.shape != p.shape:
            raise ValueError(f"{where}: weight {name!r} has shape {a.shape}, expected {p.shape}")
        p[...] = a


# ---------------------------------------------------------------------------------------------------
# the log


def read_log(path, max_step=None):
    """The records of log.jsonl (of step <= max_step, if given): its complete lines only (ending with a
    newline, parsing as JSON). Reads; never writes."""
    path = Path(path)
    records = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # a line cut by a kill
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and (max_step is None or rec.get("step", 0) <= max_step):
                records.append(rec)
    return records


def trim_log(path, max_step):
    """Rewrite log.jsonl atomically with its complete lines of step <= max_step -> those records.

    The log is the one file appended in place (a line per step: rewriting it every step would cost
    O(steps^2)). An append is not atomic: a kill can leave the last line cut short, and a run killed
    after its last checkpoint has logged steps it will redo. Every start (a fresh run, a resume, the
    restart of a parallel group) calls this first, so the log always ends with a complete line of a
    step that counts."""
    records = read_log(path, max_step)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def append_log(f, rec):
    """One record as one line of log.jsonl (f: the file opened for appending after trim_log)."""
    f.write(json.dumps(rec) + "\n")
    f.flush()


# ---------------------------------------------------------------------------------------------------
# reading a run for inference


def is_run(path):
    """True for a run folder of `llama3np train` (a checkpoint, `latest`, or data.npz: a run stopped
    before its first checkpoint) or for one of its checkpoint files. The one test formats.load uses."""
    path = Path(path)
    if path.is_file():
        return CKPT_RE.match(path.name) is not None
    return path.is_dir() and ((path / "latest").exists() or (path / "data.npz").exists()
                              or bool(list_checkpoints(path)))


def load_run(path, dtype=np.float32):
    """The model of a training run: the latest good checkpoint in folder `path` (or that file itself).

    Returns a Transformer with `model.tokenizer` set from the tokenizer stored in the checkpoint. A
    post-training checkpoint's extra weights (EXTRA_WEIGHT_PREFIXES: a PPO run's value model, a reward model's
    head) are not the model's and are left out.
    """
    from ..model import Transformer
    from ..tokenizer import Tokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run folder or checkpoint at {path}")
    if path.is_file():
        r = unpack(path, read_checkpoint(path))
    else:
        r = restore_run(path)
        if r is None:
            raise FileNotFoundError(
                f"{path} is a training run folder with no checkpoint yet (it stopped before its first save; "
                f"checkpoints come every --save-every steps): continue it with "
                f"llama3np train --out {path} --resume")
    model = Transformer(r.model_args, dtype=dtype, init=False)
    fill_params(model, {k: v for k, v in r.params.items() if not k.startswith(EXTRA_WEIGHT_PREFIXES)}, r.path)
    model.tokenizer = Tokenizer.from_bytes(r.tokenizer_bytes, name=f"{r.path.name}:tokenizer")
    model.checkpoint_path = r.path  # where it came from, for messages
    model.train_step = r.state.step
    return model


def generate_hint(run_dir, n_words=4):
    """The command to try after training: `llama3np generate --model RUN --prompt "..."` with
    "Once upon a time" for the built-in stories, else the first words of the run's validation text
    (the language and style the model learnt), quoted for the shell."""
    import shlex

    prompt = "Once upon a time"
    try:
        with np.load(Path(run_dir) / "data.npz") as z:
            own_text = "val_floor" not in z.files  # the built-in stories carry their entropy floor
            head = z["val"][:200].tolist() if own_text else []
        if head:
            from ..tokenizer import Tokenizer

            with np.load(list_checkpoints(run_dir)[0]) as z:  # the tokenizer only (a hint needs no checksum)
                tok = Tokenizer.from_bytes(z["tokenizer"].tobytes(), name="run tokenizer")
            ids = [t for t in head if t not in (tok.bos_id, tok.eos_id)][:64]
            prompt = " ".join(tok.decode(ids).split()[:n_words]) or prompt
    except (OSError, KeyError, ValueError, IndexError):
        pass  # a hint is never worth an error
    quoted = f'"{prompt}"' if re.fullmatch(r"[\w ,.!?:;'-]*", prompt) else shlex.quote(prompt)
    return f"llama3np generate --model {shlex.quote(str(run_dir))} --prompt {quoted}"
