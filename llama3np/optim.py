"""AdamW, the learning-rate schedule and gradient clipping: what turns gradients into a training run.

Llama 3 was trained with AdamW (beta1 0.9, beta2 0.95, weight decay 0.1), a linear warmup and a cosine
decay to a fraction of the peak rate, and gradients clipped to a global norm of 1.0 (the paper, section
3.4.1). We use the same recipe scaled down to a few hundred steps.

All updates happen in place on the arrays of `params` (the model's own dict), so the model sees the
new weights without any copying.
"""
import math

import numpy as np

from . import backend, kernels


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), the update of `torch.optim.AdamW`.

    For every parameter p with gradient g, at step t (counting from 1):
        p <- p - lr * weight_decay * p            (decay first, only for matrices: p.ndim >= 2)
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g**2
        p <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    Norm weights (1-D) are not decayed: pulling a gain towards 0 would fight the normalisation.
    """

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        if not isinstance(params, dict):
            raise TypeError(f"AdamW expects a dict name -> np.ndarray (model.params), got {type(params).__name__}")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.params = params
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.t = 0  # number of steps taken; the bias corrections depend on it
        # first and second moments, same shape and dtype as each parameter
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self._scratch = None

    def step(self, grads, lr=None):
        """Apply one update from `grads` (same keys as params); `lr` overrides self.lr for this step."""
        missing = set(self.params) - set(grads)
        if missing:
            raise ValueError(f"grads lack {len(missing)} parameter(s), e.g. {sorted(missing)[0]!r}")
        for name, p in self.params.items():  # all checked before anything changes
            if grads[name].shape != p.shape:
                raise ValueError(f"grad {name!r} has shape {grads[name].shape}, expected {p.shape}")
        if self._step_in_c(grads, lr):
            return
        # BEGIN SOLUTION ex10
        lr = self.lr if lr is None else float(lr)
        beta1, beta2 = self.betas
        self.t += 1
        bias_correction1 = 1 - beta1 ** self.t
        bias_correction2 = 1 - beta2 ** self.t
        step_size = lr / bias_correction1
        sqrt_bc2 = math.sqrt(bias_correction2)
        # one scratch buffer, as big as the largest parameter, reused for every temporary: no allocation
        # per step, and memory for one extra parameter instead of one per operation
        size = max(p.size for p in self.params.values())
        if self._scratch is None or self._scratch.size < size:
            self._scratch = np.empty(size, dtype=np.result_type(*self.params.values()))
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.m[name], self.v[name]
            tmp = self._scratch[:p.size].reshape(p.shape)
            if p.dtype != tmp.dtype:
                tmp = np.empty_like(p)
            if self.weight_decay and p.ndim >= 2:
                p *= 1 - lr * self.weight_decay  # decoupled: not part of the gradient, so Adam cannot rescale it
            m *= beta1  # m <- beta1 m + (1 - beta1) g
            np.multiply(g, 1 - beta1, out=tmp)
            m += tmp
            v *= beta2  # v <- beta2 v + (1 - beta2) g^2
            np.multiply(g, g, out=tmp)
            tmp *= 1 - beta2
            v += tmp
            np.sqrt(v, out=tmp)  # denominator: sqrt(v / bias_correction2) + eps
            tmp /= sqrt_bc2
            tmp += self.eps
            np.divide(m, tmp, out=tmp)  # p <- p - lr / bias_correction1 * m / denominator
            tmp *= step_size
            p -= tmp
        # END SOLUTION

    def _step_in_c(self, grads, lr):
        """The update below in one threaded pass of C per parameter (kernels.adamw_update: the same
        float32 operations in the same order, so the same bits), when the C backend is active and every
        parameter, gradient and moment is float32 and C-contiguous. Returns whether it did the step."""
        if backend.get_backend() != "c" or not kernels.available():
            return False
        for name, p in self.params.items():
            if not kernels.dense(p, grads[name], self.m[name], self.v[name]) or not p.flags.writeable:
                return False
        lr = self.lr if lr is None else float(lr)
        beta1, beta2 = self.betas
        self.t += 1
        step_size = lr / (1 - beta1 ** self.t)
        sqrt_bc2 = math.sqrt(1 - beta2 ** self.t)
        for name, p in self.params.items():
            decay = 1 - lr * self.weight_decay if self.weight_decay and p.ndim >= 2 else 1.0
            kernels.adamw_update(p, grads[name], self.m[name], self.v[name], decay, beta1, beta2, sqrt_bc2,
                                 self.eps, step_size)
        return True

    def state_dict(self):
        """Everything needed to continue bit for bit: the step count and both moments (copies)."""
        return {
            "t": self.t, "lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
            "m": {k: a.copy() for k, a in self.m.items()},
            "v": {k: a.copy() for k, a in self.v.items()},
        }

    def load_state_dict(self, state):
        for key in ("m", "v"):
            if set(state[key]) != set(self.params):
                raise ValueError(f"optimizer state {key!r} does not match the parameters")
            for k, a in state[key].items():
                if a.shape != self.params[k].shape:
                    raise ValueError(f"optimizer state {key}[{k!r}] has shape {a.shape}, expected {self.params[k].shape}")
        self.t = int(state["t"])
        self.lr = float(state["lr"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.eps = float(state["eps"])
        self.weight_decay = float(state["weight_decay"])
        self.m = {k: np.array(a, dtype=self.params[k].dtype) for k, a in state["m"].items()}
        self.v = {k: np.array(a, dtype=self.params[k].dtype) for k, a in state["v"].items()}


def get_lr(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    """Learning rate at `step` (0-based): linear warmup to max_lr, then cosine decay to min_lr_ratio*max_lr.

    Warmup: step 0 gets max_lr / warmup_steps, step warmup_steps - 1 gets max_lr (a zero rate would
    waste the first step). Cosine: from max_lr at step warmup_steps to min_lr at step total_steps - 1.
    Llama 3 decays to 1% of the peak over 1.2M steps; for short runs a floor of 10% works better.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    # BEGIN SOLUTION ex11
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:  # a run too short to decay stays at the peak after warmup
        return max_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)  # 0 -> 1, then held at the floor
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))
    # END SOLUTION


def sum_of_squares(g):
    """sum(g**2) of one array in float64 (so it does not overflow). einsum, not a BLAS dot: single-threaded,
    so the same bits on every run, and no float64 copy. The parallel engine sums the same pieces."""
    flat = g.ravel()
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def global_grad_norm(grads):
    """sqrt(sum of squares of every gradient entry)."""
    return math.sqrt(sum(sum_of_squares(g) for g in grads.values()))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global norm is at most max_norm; return the norm before.

    One factor for all tensors keeps the update's direction (clipping each tensor alone would not).
    A non-finite norm is returned untouched so the caller can skip the step.
    """
    # BEGIN SOLUTION ex12
    norm = global_grad_norm(grads)
    scale_to_max_norm(grads.values(), norm, max_norm)
    return norm
    # END SOLUTION


def scale_to_max_norm(arrays, norm, max_norm):
    """Scale the arrays in place by max_norm / norm when their global norm `norm` exceeds max_norm
    (None or 0: no clipping; a non-finite norm: untouched). The norm is an argument so that a
    parallel run can pass the one it summed over processes."""
    # BEGIN SOLUTION ex12
    if max_norm is not None and max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in arrays:
            g *= np.asarray(scale, dtype=g.dtype)
    # END SOLUTION
