"""What happens to a step once its loss and gradient are known: the rules both training loops share.

The single-process loop (loop.py) and the parallel engine (parallel/engine.py) compute a step's loss
and gradients in their own ways (one model, or a grid of processes); the rest is the same and lives
here, so the two cannot drift apart:

    reason = bad_step_reason(loss, norm, state.recent, cfg)   non-finite, or a spike far above the recent mean
    if reason is None:
        clip_to_max_norm(grads, norm, cfg.grad_clip)          one factor for every gradient (the global norm)
        opt.step(grads, lr=lr)
    rec = state.end_step(cfg, loss, norm, lr, reason)         the log record; the run's state moves on
    if state.bad_in_row >= cfg.max_bad_steps: save, then stop (stop_message)

`RunState` is where a run is, besides its weights and optimizer: the step count, the recent losses the
spike rule compares against, the bad-step counters, the tokens seen and the run's random generator.
It is saved in every checkpoint (run_folder.save_run) and restored from it (run_folder.restore_run).
"""
import math
from dataclasses import dataclass, field

import numpy as np

from ..optim import scale_to_max_norm


@dataclass
class RunState:
    step: int = 0  # steps done (the next step is step + 1 in the log)
    recent: list = field(default_factory=list)  # the last spike_window losses of applied steps
    bad_in_row: int = 0  # bad steps (skipped) since the last applied one
    n_skipped: int = 0
    tokens: int = 0  # training tokens seen (skipped steps included: their batch is consumed)
    rng: np.random.Generator = None  # for callbacks that sample text: checkpointed, so a resume draws alike

    @classmethod
    def fresh(cls, seed):
        return cls(rng=np.random.default_rng(seed))

    def to_meta(self):
        """JSON-able: what run_folder.checkpoint_meta stores."""
        return dict(step=int(self.step), recent=[float(x) for x in self.recent], bad_in_row=int(self.bad_in_row),
                    n_skipped=int(self.n_skipped), tokens=int(self.tokens), rng=self.rng.bit_generator.state)

    @classmethod
    def from_meta(cls, meta):
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
        return cls(step=int(meta["step"]), recent=list(meta["recent"]), bad_in_row=int(meta["bad_in_row"]),
                   n_skipped=int(meta["n_skipped"]), tokens=int(meta["tokens"]), rng=rng)

    def end_step(self, cfg, loss, norm, lr, reason):
        """Count the step just taken (applied if reason is None, skipped otherwise) -> its log record."""
        rec = {"step": self.step + 1, "loss": loss if math.isfinite(loss) else str(loss), "lr": lr,
               "grad_norm": norm if math.isfinite(norm) else str(norm)}
        if reason is None:
            self.recent = (self.recent + [loss])[-cfg.spike_window:]
            self.bad_in_row = 0
        else:
            self.bad_in_row += 1
            self.n_skipped += 1
            rec["skipped"] = reason
        self.step += 1
        self.tokens += cfg.batch_size * cfg.seq_len * cfg.grad_accum
        return rec


def is_spike(loss, recent, cfg):
    """A loss far above the recent mean (spike_factor times it and 1 nat above it), once the window is full."""
    if len(recent) < cfg.spike_window:
        return False
    mean = float(np.mean(recent))
    return loss > cfg.spike_factor * mean and loss > mean + 1.0


def bad_step_reason(loss, norm, recent, cfg):
    """Why this step must not be applied (a string for the log), or None if it is fine."""
    if not math.isfinite(loss):
        return "non-finite loss"
    if not math.isfinite(norm):
        return "non-finite gradient"
    if is_spike(loss, recent, cfg):
        return f"loss spike ({loss:.3f} vs recent mean {np.mean(recent):.3f})"
    return None


def clip_to_max_norm(grads, norm, max_norm):
    """Scale the gradients (a dict of arrays, or a list) in place so their global norm `norm` becomes at
    most max_norm (0 or None: no clipping). `norm` is given, not computed: the parallel engine sums its
    pieces over processes."""
    scale_to_max_norm(grads.values() if isinstance(grads, dict) else grads, norm, max_norm)


def stop_message(state, reason):
    return (f"{state.bad_in_row} bad steps in a row (last: {reason}) at step {state.step}: stopping; "
            "lower --lr or check the data")
