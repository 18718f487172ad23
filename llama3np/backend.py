"""Which code runs the hot loops: the C kernels (llama3np.kernels) or plain NumPy.

The model never calls the C kernels directly: it calls `backend.linear_*` and `backend.attention_*`,
which route float32 work to C when the "c" backend is active and everything else (float64 gradient
checks, the "numpy" backend, layouts the kernels do not take) to NumPy and the reference in
`llama3np.ops`. The dependency runs one way: backend -> ops and kernels; ops imports nothing back.

The default is "c" when the extension is built, else "numpy" (with one warning, at the first routed
call); LLAMA3NP_BACKEND=numpy|c overrides it.
"""
import os
import warnings

import numpy as np

from . import kernels, ops

_BACKENDS = ("numpy", "c")
_backend = "c" if kernels.available() else "numpy"
_warn_fallback = not kernels.available()  # warn once that the model runs on NumPy


def set_backend(name: str) -> None:
    """Pick the path for the whole model: "c" (the C kernels) or "numpy" (the reference)."""
    global _backend, _warn_fallback
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {_BACKENDS}")
    if name == "c" and not kernels.available():
        raise RuntimeError(
            f"backend 'c' needs the C kernels, which are not available ({kernels.import_error}); build them "
            "with `pip install -e .` or `python csrc/build_kernels.py`, or use set_backend('numpy')"
        )
    _backend = name
    _warn_fallback = False  # an explicit choice needs no warning


def get_backend() -> str:
    return _backend


def _use_c(*arrays) -> bool:
    global _warn_fallback
    if _warn_fallback:
        _warn_fallback = False
        warnings.warn(f"llama3np: C kernels not available ({kernels.import_error}); running on NumPy",
                      RuntimeWarning, stacklevel=3)
    if _backend != "c":
        return False
    for a in arrays:  # a plain loop: a generator in all() costs ~0.5 us, and a decode step makes ~60 calls
        if a.dtype != np.float32:
            return False
    return True


def _fits_matrix(x) -> bool:
    """Rows or columns contiguous (what kernels.matmul takes without a copy)."""
    if x.ndim != 2 or not x.flags.aligned:
        return False
    m, n = x.shape
    s0, s1 = x.strides
    return ((n == 1 or s1 == 4) and (m == 1 or (s0 > 0 and s0 % 4 == 0 and s0 // 4 >= n))) or \
           ((m == 1 or s0 == 4) and (n == 1 or (s1 > 0 and s1 % 4 == 0 and s1 // 4 >= m)))


def _fits_attention(*arrays) -> bool:
    """Last dim contiguous, other strides positive multiples of 4 bytes (what the kernels take)."""
    for x in arrays:
        if not x.flags.aligned or (x.shape[-1] > 1 and x.strides[-1] != 4):
            return False
        if any(n > 1 and (s <= 0 or s % 4) for n, s in zip(x.shape, x.strides)):
            return False
    return True


def matmul(a, b):
    """C = A @ B for 2-D arrays (either may be a transposed view)."""
    if _use_c(a, b) and _fits_matrix(a) and _fits_matrix(b):
        return kernels.matmul(a, b)
    return a @ b


# ops.linear_* with the products on the C kernels when they are active (the reshapes are the op's own)
def linear_forward(x, weight):
    return ops.linear_forward(x, weight, matmul)


def linear_backward(dout, cache):
    return ops.linear_backward(dout, cache, matmul)


def linear_backward_input(dout, cache):
    return ops.linear_backward_input(dout, cache, matmul)


def linear_backward_weight(dout, cache):
    return ops.linear_backward_weight(dout, cache, matmul)


def attention_forward(q, k, v, causal=True, kv_start=None):
    """(B, n_heads, T, hd), (B, n_kv_heads, S, hd) x2 -> (out (B, n_heads, T, hd), lse (B, n_heads, T)).
    kv_start (B, T) or None: the first key each query may see (document masks, left padding; ops.py)."""
    if kv_start is None and _use_c(q, k, v) and _fits_attention(q, k, v):
        return kernels.attention_forward(q, k, v, causal)
    return ops.attention_forward(q, k, v, causal, kv_start)


def attention_backward(dout, q, k, v, out, lse, causal=True, kv_start=None):
    """-> (dq, dk, dv), recomputing the probabilities from lse."""
    if kv_start is None and _use_c(dout, q, k, v, out, lse) and _fits_attention(dout, q, k, v, out, lse[..., None]):
        return kernels.attention_backward(dout, q, k, v, out, lse, causal)
    return ops.attention_backward(dout, q, k, v, out, lse, causal, kv_start)


if os.environ.get("LLAMA3NP_BACKEND"):
    set_backend(os.environ["LLAMA3NP_BACKEND"])
