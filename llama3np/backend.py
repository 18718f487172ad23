"""Which code runs the hot loops: the C kernels (llama3np.kernels) or plain NumPy.

The model never calls the C kernels directly: it calls `backend.linear_*`, `backend.attention_*` and
the elementwise ops (`backend.rmsnorm_*`, `swiglu_*`, `rope_*`, `cross_entropy_*`; optim.AdamW asks
`get_backend()` for its update), which route float32 work to C when the "c" backend is active and
everything else (float64 gradient checks, the "numpy" backend, layouts the kernels do not take) to
NumPy and the reference in `llama3np.ops`. The dependency runs one way: backend -> ops and kernels; ops imports nothing back.

The default is "c" when the extension is built, else "numpy" (with one warning, at the first routed
call); LLAMA3NP_BACKEND=numpy|c overrides it. A value it cannot honour (LLAMA3NP_BACKEND=gpu, or "c"
without the extension) is a one-line RuntimeWarning at import and the default is kept, so that
importing the package, even for `llama3np --help`, never fails on it.
"""
import os
import warnings
import weakref

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


def matmul(a, b):
    """C = A @ B for 2-D arrays (either may be a transposed view). Layouts the kernels cannot read in
    place (kernels.matrix_layout is None) go to NumPy rather than being copied, and so does everything
    when the CPU has no tuned micro-kernel (kernels.tuned_matmul(): the portable C kernel is slower
    than NumPy's BLAS; the fused attention stays in C, where it beats NumPy even so)."""
    if _use_c(a, b) and kernels.tuned_matmul():
        layout_a, layout_b = kernels.matrix_layout(a), kernels.matrix_layout(b)
        if layout_a is not None and layout_b is not None and a.shape[1] == b.shape[0]:
            return kernels.matmul_laid_out(a, b, layout_a, layout_b)  # dtype and layouts checked just now
    return a @ b  # also what raises NumPy's error for shapes that do not fit


# ops.linear_* with the products on the C kernels when they are active (the reshapes are the op's own)
def linear_forward(x, weight):
    # the model's case (dense float32, x not empty) goes to C with fewer checks: ~60 calls per decode step
    if (_backend == "c" and x.size and kernels.tuned_matmul() and kernels.dense(x, weight) and weight.ndim == 2
            and x.shape[-1] == weight.shape[1]):
        return kernels.linear_dense(x, weight), (x, weight)
    return ops.linear_forward(x, weight, matmul)


def linear_backward(dout, cache):
    return ops.linear_backward(dout, cache, matmul)


def linear_backward_input(dout, cache):
    return ops.linear_backward_input(dout, cache, matmul)


def linear_backward_weight(dout, cache):
    return ops.linear_backward_weight(dout, cache, matmul)


_decode_plans = weakref.WeakKeyDictionary()  # KVCache -> kernels.DecodePlan of the weights decoding into it


def decode_blocks(layers, cache, x, rope, args, start_pos, kv_start=None, head=None):
    """One new position (x (B, 1, dim)) through every block against the KV cache in one C call
    (kernels.decode_blocks: block_forward's kernels in its order, the same bits) -> the last block's
    output (B, 1, dim); or None when the C path would not run every op (another backend, float64, no
    tuned micro-kernel, an array the kernels do not read in place): then the caller runs block_forward.
    layers: each block's 9 weights (model.LAYER_PARAM_NAMES order). The weights and caches are checked
    once per cache (kernels.decode_plan) and then only recognised: a step costs one Python call.
    head (final norm, LM head), optional: the logits (B, 1, vocab) instead, the model's last two steps in the
    same call (kernels.decode_blocks); None, as above, when they are not dense float32 either."""
    if not (_backend == "c" and kernels.tuned_matmul()):
        return None
    arrays = [w for layer in layers for w in layer] + cache.cache_k + cache.cache_v
    plan = _decode_plans.get(cache)
    if plan is None or not kernels.plan_holds(plan, arrays):
        if not kernels.dense(*arrays):
            return None
        plan = _decode_plans[cache] = kernels.decode_plan(layers, cache.cache_k, cache.cache_v, args.n_heads)
    cos, sin = rope
    if not kernels.dense(x, cos, sin, *(head or ())):
        return None
    return kernels.decode_blocks(plan, x, start_pos, cos, sin, args.norm_eps, kv_start, head)


def routes() -> dict:
    """{"matmul": ..., "attention": ..., "elementwise": ...}: where float32 work goes now, in words
    (`llama3np doctor`)."""
    if _backend != "c":
        why = "the numpy backend" if kernels.available() else "C kernels not available"
        return {"matmul": f"NumPy's BLAS ({why})", "attention": f"NumPy reference ({why})",
                "elementwise": f"NumPy reference ({why})"}
    isa = kernels.isa()
    matmul_route = (f"C, {isa} micro-kernel" if kernels.tuned_matmul() else
                    "NumPy's BLAS (no tuned micro-kernel for this CPU; the portable one is slower)")
    return {"matmul": matmul_route, "attention": f"fused C kernel ({isa} micro-kernel)",
            "elementwise": f"fused C kernels, threaded ({isa}): RMSNorm, SwiGLU, RoPE, cross-entropy, "
                           "embedding backward, AdamW"}


def attention_forward(q, k, v, causal=True, kv_start=None):
    """(B, n_heads, T, hd), (B, n_kv_heads, S, hd) x2 -> (out (B, n_heads, T, hd), lse (B, n_heads, T)).
    kv_start (B, T) or None: the first key each query may see (document masks, left padding; ops.py)."""
    if _use_c(q, k, v) and kernels.fits_attention(q, k, v):
        return kernels.attention_forward(q, k, v, causal, kv_start)
    return ops.attention_forward(q, k, v, causal, kv_start)


def attention_backward(dout, q, k, v, out, lse, causal=True, kv_start=None):
    """-> (dq, dk, dv), recomputing the probabilities from lse."""
    if _use_c(dout, q, k, v, out, lse) and kernels.fits_attention(dout, q, k, v, out, lse[..., None]):
        return kernels.attention_backward(dout, q, k, v, out, lse, causal, kv_start)
    return ops.attention_backward(dout, q, k, v, out, lse, causal, kv_start)


# ----------------------------------------------------------------------------------------------------
# The elementwise ops of ops.py, fused and threaded in C for float32 C-contiguous arrays (kernels.dense);
# everything else goes to the reference. The caches are the reference's, so a C forward and a NumPy
# backward (or the reverse) fit together.


def rmsnorm_forward(x, weight, eps):
    """x (B, T, C) -> (y, cache (xhat, rstd (B, T, 1), weight)), as ops.rmsnorm_forward."""
    if _use_c(x, weight) and kernels.dense(x, weight):
        y, xhat, rstd = kernels.rmsnorm_forward(x, weight, eps)
        return y, (xhat, rstd, weight)
    return ops.rmsnorm_forward(x, weight, eps)


def rmsnorm_backward(dout, cache):
    """-> (dx, dweight)."""
    xhat, rstd, weight = cache
    if _use_c(dout, xhat, rstd, weight) and kernels.dense(dout, xhat, rstd, weight):
        return kernels.rmsnorm_backward(dout, xhat, rstd, weight)
    return ops.rmsnorm_backward(dout, cache)


def swiglu_forward(a, b):
    """silu(a) * b -> (out, cache (a, b, sig, silu)), as ops.swiglu_forward. In C the cache holds a and b
    only (sig and silu None): the backward recomputes them, the same bits, so that the step keeps two
    activations fewer of the hidden width and reads and writes four fewer (~2% faster steps at 2 threads)."""
    if _use_c(a, b) and kernels.dense(a, b):
        out, _, _ = kernels.swiglu_forward(a, b, store=False)
        return out, (a, b, None, None)
    return ops.swiglu_forward(a, b)


def swiglu_backward(dout, cache):
    """-> (da, db)."""
    if cache[2] is None:  # the C forward's cache: C recomputes what it left out, whatever the backend now
        a, b = cache[:2]
        if dout.dtype != np.float32:  # e.g. a float64 probe: NumPy's backward at dout's precision, as before
            _, sig, silu = kernels.swiglu_forward(a, b)
            return ops.swiglu_backward(dout, (a, b, sig, silu))
        return kernels.swiglu_backward(np.ascontiguousarray(dout), a, b)
    if _use_c(dout, *cache) and kernels.dense(dout, *cache):
        return kernels.swiglu_backward(dout, *cache)
    return ops.swiglu_backward(dout, cache)


def embedding_backward(dout, cache):
    """-> dweight (vocab, C): the scatter-add of ops.embedding_backward, in C (the same bits)."""
    tokens, shape = cache
    if _use_c(dout) and kernels.dense(dout):
        return kernels.embedding_backward(dout, tokens, shape[0])
    return ops.embedding_backward(dout, cache)


def _rope_in_c(x, cos, sin):
    return (_use_c(x, cos, sin) and kernels.dense(cos, sin) and x.ndim == 4 and kernels.fits_attention(x)
            and x.shape[-1] % 2 == 0)


def rope_forward(x, cos, sin):
    """x (B, T, n, hd) -> (rotated x, cache (cos, sin)), as ops.rope_forward."""
    if _rope_in_c(x, cos, sin):
        return kernels.rope_forward(x, cos, sin), (cos, sin)
    return ops.rope_forward(x, cos, sin)


def rope_backward(dout, cache):
    """dout (B, T, n, hd), read in place when its last dimension is contiguous (the model passes a
    transposed view) -> dx, C-contiguous on the C path."""
    cos, sin = cache
    if _rope_in_c(dout, cos, sin):
        return kernels.rope_forward(dout, cos, sin, inverse=True)
    return ops.rope_backward(dout, cache)


def cross_entropy_forward(logits, targets, mask=None):
    """-> (mean nll, cache), as ops.cross_entropy_forward, with the per-position nll and lse in C."""
    if _use_c(logits) and kernels.dense(logits):
        return ops.cross_entropy_forward(logits, targets, mask, kernels.cross_entropy_rows)
    return ops.cross_entropy_forward(logits, targets, mask)


def cross_entropy_backward(dloss, cache):
    """-> dlogits (B, T, V): (softmax - onehot(target)) * dloss * weight / count, one pass in C."""
    logits, targets, lse, weights, count = cache
    if _use_c(logits, lse) and kernels.dense(logits, lse):
        return kernels.cross_entropy_backward(logits, targets, lse, _row_scale(dloss, weights, count))
    return ops.cross_entropy_backward(dloss, cache)


def _row_scale(dloss, weights, count):
    """Each row's factor in dlogits, dloss * weight / count, in float32 (ops.cross_entropy_backward's)."""
    return np.ascontiguousarray((dloss * weights / count).astype(np.float32))


def cross_entropy_loss_and_dlogits(logits, targets, mask=None):
    """-> (mean nll, dlogits): cross_entropy_forward, then cross_entropy_backward(1.0, ...). On the C
    kernels in one pass (kernels.cross_entropy_fused, the same bits) that writes dlogits over `logits`:
    the caller's logits are used up."""
    if _use_c(logits) and kernels.dense(logits) and logits.flags.writeable:
        weights, count = ops.loss_weights(logits.shape[:-1], logits.dtype, mask)
        nll, _ = kernels.cross_entropy_fused(logits, targets, _row_scale(1.0, weights, count))
        return ops.mean_loss(nll, weights, count), logits
    loss, cache = cross_entropy_forward(logits, targets, mask)
    return loss, cross_entropy_backward(1.0, cache)


def _apply_environment():
    name = os.environ.get("LLAMA3NP_BACKEND")
    if not name:
        return
    try:
        set_backend(name)
    except (ValueError, RuntimeError) as e:
        kernels.env_warning(f"LLAMA3NP_BACKEND={name!r} ignored ({e}); running on {_backend!r}")


_apply_environment()
