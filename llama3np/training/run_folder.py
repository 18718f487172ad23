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

Writing is atomic: the file is written under a temporary name in the same folder, flushed to disk
(fsync) and renamed over the final name (rename is atomic on POSIX), then the folder is fsynced so the
rename itself survives a power cut. A SIGKILL mid-write leaves a stray temporary file and the old
checkpoints intact. A checkpoint that is damaged anyway (disk error, manual edit, truncated copy) fails
its checksum and the loader falls back to the previous one, with a warning.
"""
import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

from ..fileio import atomic_write, atomic_write_bytes

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.npz$")


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
    """Write ckpt_{step:08d}.npz atomically, point `latest` at it, delete all but the newest `keep`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, step=int(step), opt={k: opt_state[k] for k in ("t", "lr", "betas", "eps", "weight_decay")})
    arrays = {}
    for name, p in params.items():
        arrays[f"param/{name}"] = p
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
    """Load and verify one checkpoint file -> dict with params, opt_state, tokenizer_bytes, meta.

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
    ck["opt_state"] = dict(meta["opt"], m=m, v=v)
    return ck


def latest_checkpoint(run_dir, warn=True):
    """-> (path, checkpoint dict) of the newest checkpoint that verifies, or (None, None) if none exist.

    Damaged checkpoints are skipped with a warning; if every one is damaged, CorruptCheckpoint.
    """
    candidates = list_checkpoints(run_dir)
    errors = []
    for path in candidates:
        try:
            ck = read_checkpoint(path)
        except CorruptCheckpoint as e:
            errors.append(str(e))
            if warn:
                warnings.warn(f"skipping damaged checkpoint: {e}; trying the previous one", RuntimeWarning,
                              stacklevel=2)
            continue
        return path, ck
    if errors:
        raise CorruptCheckpoint(f"no usable checkpoint in {run_dir}: " + "; ".join(errors))
    return None, None


def is_run_dir(path):
    path = Path(path)
    return path.is_dir() and ((path / "latest").exists() or bool(list_checkpoints(path)))


def load_run(path, dtype=np.float32):
    """The model of a training run: the latest good checkpoint in folder `path` (or that file itself).

    Returns a Transformer with `model.tokenizer` set from the tokenizer stored in the checkpoint.
    """
    from ..args import ModelArgs
    from ..model import Transformer
    from ..tokenizer import Tokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run folder or checkpoint at {path}")
    if path.is_file():
        ck_path, ck = path, read_checkpoint(path)
    else:
        ck_path, ck = latest_checkpoint(path)
        if ck is None:
            raise FileNotFoundError(f"{path} holds no checkpoint (ckpt_XXXXXXXX.npz files)")
    args = ModelArgs.from_dict(ck["meta"]["model_args"])
    model = Transformer(args, dtype=dtype, init=False)
    for name, p in model.params.items():
        if name not in ck["params"]:
            raise ValueError(f"{ck_path}: weight {name!r} is missing")
        a = ck["params"][name]
        if a.shape != p.shape:
            raise ValueError(f"{ck_path}: weight {name!r} has shape {a.shape}, expected {p.shape}")
        p[...] = a  # in place: the weights stay in the model's one block of memory (see model.py)
    model.tokenizer = Tokenizer.from_bytes(ck["tokenizer_bytes"], name=f"{ck_path.name}:tokenizer")
    model.checkpoint_path = ck_path  # where it came from, for messages
    model.train_step = int(ck["meta"]["step"])
    return model
