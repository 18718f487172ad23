"""A post-training stage's run folder: config, checkpoints, log.jsonl, a metrics plot; exact resume.

    run = StageRun(out, "dpo", config, resume=True)
    step = run.restore(model_params, opt)          # 0 for a fresh run; else the step of the last checkpoint
    for step in range(step, steps):
        batch = batch_for(seed, step)               # a function of (seed, step): no loader state to save
        ... update ...
        run.log({"step": step + 1, "loss": ..., "rewards/margins": ...})
        if (step + 1) % save_every == 0: run.save(step + 1, params, opt, meta)

Checkpoints are the pre-training ones (`training.run_folder.save_checkpoint`: one .npz written atomically
with a checksum, the previous ones kept), so `llama3np.load(out)` reads a stage's policy like any run.
Everything random in a step is drawn from `np.random.default_rng([seed, step])`, so a run resumed after
a SIGKILL redoes the same arithmetic: its final weights equal an uninterrupted run's, bit for bit.
Extra weights (a reward model's `score.weight`, PPO's value model as `value/...`) ride in the same file.
"""
import json
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_bytes
from ..training import run_folder
from ..training.step import RunState


class StageRun:
    def __init__(self, out, stage, config, resume=False):
        self.dir = Path(out)
        self.stage = stage
        self.config = dict(config, stage=stage)
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.dir / "config.json"
        if resume and cfg_path.exists():
            saved = json.loads(cfg_path.read_text())
            diff = [k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k)]
            if diff:
                raise ValueError(f"--resume needs the arguments of the first run; these differ: {sorted(diff)}")
        elif run_folder.list_checkpoints(self.dir):
            if not resume:
                raise ValueError(f"{self.dir} already holds a run: pass --resume to continue it, or choose "
                                 "another --out")
        atomic_write_bytes(cfg_path, (json.dumps(self.config, indent=1, sort_keys=True) + "\n").encode())
        self.log_path = self.dir / "log.jsonl"
        self.records = []

    def restore(self, params, opt=None):
        """Fill `params` (and the optimizer) from the latest good checkpoint -> (step, meta); (0, {}) if none.

        The log is trimmed to the restored step: steps after it will be redone and logged again."""
        restored = run_folder.restore_run(self.dir)
        step, meta = (0, {}) if restored is None else (restored.state.step, restored.meta)
        if restored is not None:
            for name, p in params.items():
                a = restored.params.get(name)
                if a is None or a.shape != p.shape:
                    raise ValueError(f"{restored.path}: weight {name!r} is missing or has another shape")
                p[...] = a  # in place: the arrays stay the model's (and the optimizer's)
            if opt is not None:
                opt.load_state_dict(restored.opt_state)
        self.records = run_folder.trim_log(self.log_path, step)
        return step, meta

    def save(self, step, params, opt, tokenizer, model_args, meta=None, keep=2):
        """A checkpoint of `step` through the pre-training API (training.run_folder.save_run): a stage has no
        data loader position (its batches are a function of (seed, step)) and no spike rule."""
        state = RunState(step=int(step), rng=np.random.default_rng(0))
        return run_folder.save_run(self.dir, params=params, opt_state=opt.state_dict(),
                                   tokenizer_bytes=tokenizer.to_bytes(), model_args=model_args,
                                   loader_state={"stage": self.stage}, state=state, keep=keep,
                                   extra=dict(meta or {}, stage=self.stage))

    def log(self, record):
        self.records.append(record)
        with open(self.log_path, "a") as f:
            run_folder.append_log(f, record)

    def plot(self, keys, name="metrics.png"):
        """One panel per metric name in `keys` against the step, from log.jsonl."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in keys if any(k in r for r in self.records)]
        if not keys:
            return None
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in self.records if k in r and "step" in r]
            ax.plot(*zip(*pts), lw=1)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        fig.tight_layout()
        path = self.dir / name
        tmp = self.dir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        tmp.replace(path)
        return path


def step_rng(seed, step):
    """The random generator of one step: a function of (seed, step) only, so a resumed run draws the same."""
    return np.random.default_rng([int(seed), int(step)])


WARMUP_STEPS = 10  # a short linear warmup (fine-tuning runs are short)


def warmup_lr(step, lr, steps, min_lr_ratio=1.0):
    """The rate of step `step` of a stage: optim.get_lr's warmup, then flat (min_lr_ratio 1, the default: no
    decay) or a cosine decay to min_lr_ratio x lr at the last step."""
    from ..optim import get_lr

    return get_lr(step, lr, min(WARMUP_STEPS, steps), steps, min_lr_ratio=min_lr_ratio)


def update(opt, grads, lr, grad_clip=1.0):
    """Clip the global gradient norm and take one AdamW step -> the norm before clipping (a float).

    A non-finite gradient skips the step (as pre-training does) and returns the bad norm."""
    from ..optim import clip_grad_norm

    norm = clip_grad_norm(grads, grad_clip)
    if np.isfinite(norm):
        opt.step(grads, lr=lr)
    return float(norm)


def run_steps(run, steps, step_fn, params, opt, tokenizer, model_args, save_every=50, progress=False,
              meta_fn=None, start_meta=None):
    """The loop every stage shares: restore, then for each step `metrics = step_fn(step)` (which draws its
    randomness from step_rng and updates the weights itself), log, checkpoint. -> the records.

    meta_fn() -> extra JSON state saved with each checkpoint (e.g. PPO's adaptive KL coefficient);
    start_meta(meta) receives it back on resume.
    """
    start, meta = run.restore(params, opt)
    if start and start_meta is not None:
        start_meta(meta)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=run.stage, unit="step", dynamic_ncols=True)
    try:
        for step in range(start, steps):
            rec = {"step": step + 1, **step_fn(step)}
            run.log(rec)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(rec.items())[1:4] if isinstance(v, float)},
                                refresh=False)
                bar.update(1)
            if (step + 1) % save_every == 0 or step + 1 == steps:
                run.save(step + 1, params, opt, tokenizer, model_args, meta_fn() if meta_fn else None)
    finally:
        if bar is not None:
            bar.close()
    return run.records


def load_stage_model(path, prefix="", dtype=np.float32):
    """The transformer stored under `prefix` in a stage's latest checkpoint (e.g. "value/" for PPO's value
    model), with the checkpoint's tokenizer -> (model, checkpoint params). `llama3np.load` reads a stage
    folder holding only a policy; this also reads the ones with extra weights (score.weight, value/...)."""
    from ..model import Transformer
    from ..tokenizer import Tokenizer

    restored = run_folder.restore_run(path)
    if restored is None:
        raise FileNotFoundError(f"{path} holds no checkpoint")
    model = Transformer(restored.model_args, dtype=dtype, init=False)
    missing = [prefix + n for n in model.params if prefix + n not in restored.params]
    if missing:
        raise ValueError(f"{restored.path}: no weights {missing[:2]}... (expected the model's under {prefix!r})")
    run_folder.fill_params(model, {n: restored.params[prefix + n] for n in model.params}, restored.path)
    model.tokenizer = Tokenizer.from_bytes(restored.tokenizer_bytes, name=f"{restored.path.name}:tokenizer")
    return model, restored.params
