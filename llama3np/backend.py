"""Which code runs the hot loops: the C kernels (llama3np.kernels) or plain NumPy.

The model never calls the C kernels directly: it calls `backend.matmul` and `backend.attention_*`,
which route float32 work to C when the "c" backend is active and everything else (float64 gradient
checks, the "numpy" backend) to the NumPy reference in `llama3np.ops`.
"""
import os

from . import ops

_BACKENDS = ("numpy", "c")
_backend = "numpy"


def set_backend(name: str) -> None:
    """Pick the path for the whole model: "c" (the C kernels) or "numpy" (the reference)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def matmul(a, b):
    """C = A @ B for 2-D arrays (either may be a transposed view)."""
    return a @ b


def attention_forward(q, k, v, causal=True):
    """(B, n_heads, T, hd), (B, n_kv_heads, S, hd) x2 -> (out (B, n_heads, T, hd), lse (B, n_heads, T))."""
    return ops.attention_forward(q, k, v, causal)


def attention_backward(dout, q, k, v, out, lse, causal=True):
    """-> (dq, dk, dv), recomputing the probabilities from lse."""
    return ops.attention_backward(dout, q, k, v, out, lse, causal)


if os.environ.get("LLAMA3NP_BACKEND"):
    set_backend(os.environ["LLAMA3NP_BACKEND"])
