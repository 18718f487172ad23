"""Python side of the C kernels in csrc/: validation, then one call into C through cffi.

    kernels.matmul(a, b, out=None)                     C = A @ B, float32, A or B may be x.T views
    kernels.attention_forward(q, k, v, causal=True, kv_start=None)            -> (out, lse), fused
    kernels.attention_backward(dout, q, k, v, out, lse, causal=True, kv_start=None) -> (dq, dk, dv)

kv_start (B, T) ints: document masks / left padding, as ops.attention_forward (FlashAttention-style
tiles before a query block's first visible key are skipped, so packed rows cost less).

    kernels.rmsnorm_forward / rmsnorm_backward, swiglu_forward / swiglu_backward, rope_forward,
    cross_entropy_rows / cross_entropy_backward, adamw_update
                                                       the elementwise work of a training step, fused and
                                                       threaded (csrc/elementwise.c; see their section)
    kernels.decode_plan(layers, caches_k, caches_v, n_heads) -> plan; kernels.decode_blocks(plan, x, ...)
                                                       every block for one new token against a KV cache,
                                                       in one call (csrc/decode.c): block_forward's bits
    kernels.fma_peak(seconds=0.3, threads=None)        the CPU's float32 FMA peak in GFLOP/s for the
                                                       micro-kernel's instruction set (csrc/peak.c)
    kernels.microkernel_rate(seconds=0.3, kc=256)      the GEMM micro-kernel's own GFLOP/s, operands in L1
Micro-kernels: AVX-512, AVX2+FMA (x86-64, chosen at run time), NEON (arm64) and portable C; the
softmax rows of the attention have their own AVX-512 / AVX2 code. `tuned_matmul()` is False on the
portable one, and llama3np.backend then sends matrix products to NumPy's BLAS.

Everything is checked here before C sees a pointer: dtype (TypeError), shapes, strides, aliasing
(ValueError). The C code trusts its arguments, so this file is what keeps a bad array from becoming
a crash. Arrays reach C without a copy: a matrix needs its rows or its columns contiguous (so a
transposed view passes as a "trans" flag and a leading dimension); an attention input needs its
last dimension contiguous and positive strides elsewhere (so q as a transposed view of (B, T, H, hd),
or k as a slice of a KV cache, are read in place). The layout rules live here once: `matrix_layout`
and `fits_attention` answer "can C read this in place?" without raising (llama3np.backend routes
with them); the shape rules of attention are ops.check_attention_shapes, the reference's own.

Build the extension with `pip install -e .` or `python csrc/build_kernels.py`. Without it (no C
compiler), `available()` is False and the model runs on NumPy (llama3np.backend).

Environment: LLAMA3NP_NUM_THREADS (default: the CPUs this process may use), LLAMA3NP_ISA (portable,
avx2, avx512 or neon: force a micro-kernel, e.g. to test each path), LLAMA3NP_DISABLE_KERNELS=1 (act as if
the extension were not built). A value that cannot be honoured (LLAMA3NP_ISA=avx512 on a CPU without
it, a misspelling) is a one-line RuntimeWarning at import and the default is used: importing the
package, even for `llama3np --help`, never fails on them.
"""
import bisect
import operator
import os
import time
import warnings
from typing import NamedTuple

import numpy as np

from . import ops

ISAS = ("portable", "avx2", "avx512", "neon")  # index = the C code's number for each instruction set
_INT_MAX = 2**31 - 1

try:
    if os.environ.get("LLAMA3NP_DISABLE_KERNELS") == "1":
        raise ImportError("LLAMA3NP_DISABLE_KERNELS=1 is set")
    from ._kernels import ffi, lib  # noqa: E402

    import_error = None
except ImportError as e:  # not built (no compiler at install time) or disabled
    ffi = lib = None
    import_error = str(e)


def available() -> bool:
    """True when the compiled extension is loaded."""
    return lib is not None


def _require():
    if lib is None:
        raise RuntimeError(
            f"the C kernels are not available ({import_error}); build them with `pip install -e .` "
            "or `python csrc/build_kernels.py` (needs a C compiler), or use set_backend('numpy')"
        )


# ---------------------------------------------------------------------------------------------------
# run-time configuration


def available_isas() -> list:
    """The micro-kernels this CPU can run, slowest first, e.g. ['portable', 'avx2', 'avx512'] on an
    AVX-512 x86-64, ['portable', 'neon'] on arm64."""
    _require()
    by_speed = ("portable", "avx2", "neon", "avx512")
    return [name for name in by_speed if lib.isa_supported(ISAS.index(name))]


def isa() -> str:
    """The micro-kernel the matmul uses now: 'portable', 'avx2', 'avx512' or 'neon'."""
    _require()
    return ISAS[lib.current_isa()]


def tuned_matmul() -> bool:
    """True when the micro-kernel in use is a SIMD one written for this CPU (not 'portable'): only then
    does backend.matmul send products to C; the portable kernel is slower than NumPy's BLAS."""
    return lib is not None and lib.current_isa() != 0


def lib_path() -> str:
    """The file of the loaded extension."""
    _require()
    from . import _kernels

    return _kernels.__file__


def set_isa(name=None) -> str:
    """Force a micro-kernel by name (None: the best this CPU supports). Returns the one selected."""
    _require()
    if name is None:
        return ISAS[lib.select_isa(-1)]
    if name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; expected one of {ISAS} or None")
    if name not in available_isas():
        raise ValueError(f"this CPU cannot run {name!r}; it supports {available_isas()}")
    return ISAS[lib.select_isa(ISAS.index(name))]


def set_num_threads(n: int) -> None:
    """Threads for matmul and attention (small work still runs on one)."""
    _require()
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of threads must be a positive int, got {n!r}")
    lib.set_num_threads(int(n))


def get_num_threads() -> int:
    _require()
    return lib.get_num_threads()


def default_threads() -> int:
    """The CPUs this process may use (its affinity mask), the thread count when nothing is set."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_seconds(seconds):
    number = (int, float, np.integer, np.floating)
    if isinstance(seconds, bool) or not isinstance(seconds, number) or not 0 < seconds <= 60:
        raise ValueError(f"seconds must be a number in (0, 60], got {seconds!r}")


def _check_int_in(name, value, lo, hi):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def _isa_index(isa_name):
    """The number of a micro-kernel's instruction set (the current one for None), which this CPU must run."""
    name = isa() if isa_name is None else isa_name
    if name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; expected one of {ISAS}")
    if name not in available_isas():
        raise ValueError(f"this CPU cannot run {name!r}; it supports {available_isas()}")
    return ISAS.index(name)


def _best_rate(burst, seconds):
    """The best GFLOP/s of burst(iters) -> FLOPs done, over bursts of ~20 ms for `seconds` (at least 4):
    a busy neighbour only ever makes a burst slower. None when burst does no work."""
    def timed(iters):
        t = time.perf_counter()
        flops = burst(iters)
        return flops, time.perf_counter() - t

    iters = 1 << 12
    flops, dt = timed(iters)
    if flops == 0:
        return None
    while dt < 0.02:  # ~20 ms bursts: long enough to time, short enough for several
        iters *= 2
        flops, dt = timed(iters)
    rates, deadline = [flops / dt], time.perf_counter() + seconds
    while len(rates) < 4 or time.perf_counter() < deadline:  # at least 4, then until the time is up
        flops, dt = timed(iters)
        rates.append(flops / dt)
    return max(rates) / 1e9


def fma_peak(seconds: float = 0.3, threads: int = None, isa_name: str = None):
    """The CPU's float32 peak in GFLOP/s for a micro-kernel's instruction set (the current one unless
    isa_name is given) on `threads` threads (default: get_num_threads()): independent FMA chains, no
    memory traffic (csrc/peak.c). It is the ceiling of every product here: a GEMM's GFLOP/s over it is
    the share of the hardware the kernel uses. The best of bursts of ~20 ms over `seconds`. None for
    'portable', which has no FMA code of its own."""
    _require()
    _check_seconds(seconds)
    threads = get_num_threads() if threads is None else threads
    _check_int_in("threads", threads, 1, 64)
    index, result = _isa_index(isa_name), ffi.new("float *")
    return _best_rate(lambda iters: lib.fma_burst(index, iters, int(threads), result), seconds)


def microkernel_shape(isa_name: str = None):
    """(MR, NR): the tile of C one call of the GEMM micro-kernel computes, e.g. (6, 16) for AVX2."""
    _require()
    index = _isa_index(isa_name)
    return lib.gemm_mr(index), lib.gemm_nr(index)


def microkernel_rate(seconds: float = 0.3, isa_name: str = None, kc: int = 256):
    """GFLOP/s of the GEMM micro-kernel alone, on one thread: C (MR x NR) += A (MR x kc) @ B (kc x NR)
    over and over on the same packed slivers, which stay in L1 (kc 256: 6 + 16 KiB for AVX2), so nothing
    is packed or fetched from memory. Beside fma_peak(threads=1) it splits a GEMM's distance from the
    hardware's peak in two: what the kernel's own instructions cost (fma_peak minus this), and what
    packing, caches and the edges of C cost around it (this minus the GEMM's rate). Measured on a Zen 4
    (1 thread): AVX2 116-117 GFLOP/s, 99% of its FMA peak; the GEMMs of a training step 92-113 GFLOP/s."""
    _require()
    _check_seconds(seconds)
    _check_int_in("kc", kc, 1, 4096)
    index, (mr, nr) = _isa_index(isa_name), microkernel_shape(isa_name)
    rng = np.random.default_rng(0)
    # small values: C grows by A @ B each call and must stay a normal, finite number for the whole run
    a = (rng.standard_normal((mr, kc)) * 1e-4).astype(np.float32)
    b = (rng.standard_normal((kc, nr)) * 1e-4).astype(np.float32)
    c = np.zeros((mr, nr), np.float32)
    pa, pb, pc = _ptr(a), _ptr(b), _ptr(c)

    def burst(iters):
        flops = lib.microkernel_burst(index, int(kc), iters, pa, pb, pc)
        if flops < 0:
            raise MemoryError(f"microkernel_rate: no memory for two slivers of kc={kc}")
        return flops

    return _best_rate(burst, seconds)


def env_warning(message):
    """A RuntimeWarning about an environment variable that cannot be honoured, printed as ONE line
    ("llama3np:0: RuntimeWarning: ..."): attributed to no source file, so no code line follows it."""
    warnings.warn_explicit(message, RuntimeWarning, "llama3np", 0, module="llama3np")


def _apply_environment():
    """LLAMA3NP_NUM_THREADS and LLAMA3NP_ISA, or a warning and the default for a value that cannot be used."""
    env = os.environ.get("LLAMA3NP_NUM_THREADS", "")
    threads = default_threads()
    if env and env.isdigit() and int(env) >= 1:
        threads = int(env)
    elif env:
        env_warning(f"LLAMA3NP_NUM_THREADS={env!r} ignored (expected a positive integer); using {threads} threads")
    set_num_threads(threads)
    name = os.environ.get("LLAMA3NP_ISA", "")
    try:
        set_isa(name or None)
    except ValueError as e:  # unknown, or more than this CPU can run
        env_warning(f"LLAMA3NP_ISA={name!r} ignored ({e}); using {set_isa(None)!r}")


if lib is not None:
    _apply_environment()


# ---------------------------------------------------------------------------------------------------
# validation: every check happens before a pointer goes to C


def _check_array(x, name):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32 for the C kernels, got {x.dtype}")
    if not x.flags.aligned:
        raise ValueError(f"{name} is not aligned to 4 bytes; pass np.ascontiguousarray({name})")
    if x.ndim and max(x.shape) > _INT_MAX:
        raise ValueError(f"{name} has a dimension larger than 2**31 - 1: {x.shape}")


def _ptr(x):
    """The address of x's first element as a float *.

    A decode step makes ~60 calls, so this matters: ffi.from_buffer takes ~0.2 us where x.ctypes.data
    builds a ctypes object (~1.3 us). from_buffer wants a C-contiguous buffer; a transposed matrix
    (x.T of a C-contiguous array, as linear_forward passes its weight) is handed over as its transpose,
    which starts at the same address."""
    if x.size:
        if x.flags.c_contiguous:
            return ffi.from_buffer("float[]", x)
        if x.flags.f_contiguous:
            return ffi.from_buffer("float[]", x.T)
    return ffi.cast("float *", x.ctypes.data)


def _ptr_or_null(x):
    """_ptr(x), or NULL for None (an output or input the kernel may go without)."""
    return ffi.NULL if x is None else _ptr(x)


def matrix_layout(x):
    """(trans, ld) when the 2-D array x has contiguous rows (trans=0) or columns (trans=1), so that
    matmul reads it in place; None otherwise. Only the layout is looked at, not the dtype."""
    if x.ndim != 2 or not x.flags.aligned:
        return None
    m, n = x.shape
    s0, s1 = x.strides
    if x.size == 0:
        return 0, max(n, 1)  # nothing is read
    # a dimension of length 1 is never stepped along, so its stride does not matter
    if (n == 1 or s1 == 4) and (m == 1 or (s0 > 0 and s0 % 4 == 0 and s0 // 4 >= n)):
        return 0, (s0 // 4 if m > 1 else n)
    if (m == 1 or s0 == 4) and (n == 1 or (s1 > 0 and s1 % 4 == 0 and s1 // 4 >= m)):
        return 1, (s1 // 4 if n > 1 else m)
    return None


def _matrix_layout(x, name):
    """matrix_layout of a float32 matrix, or the error that says what is wrong."""
    _check_array(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    layout = matrix_layout(x)
    if layout is None:
        raise ValueError(
            f"{name} (shape {x.shape}, strides {x.strides}) needs contiguous rows or columns (a C-contiguous "
            f"array or its .T); pass np.ascontiguousarray({name})"
        )
    return layout


def _bad_stride(x):
    """The first dimension the attention kernels cannot step along (the last must be contiguous, the
    others positive multiples of 4 bytes), or None."""
    shape, strides = x.shape, x.strides  # read once: each attribute builds a tuple (a decode step asks
    last = len(shape) - 1                 # ~10 times per layer)
    if shape[last] > 1 and strides[last] != 4:
        return last
    for d in range(last):
        if shape[d] > 1 and (strides[d] <= 0 or strides[d] % 4):  # a length-1 dim is never stepped along
            return d
    return None


def fits_attention(*arrays) -> bool:
    """True when the attention kernels can read every array in place (aligned, last dimension
    contiguous, other strides positive multiples of 4 bytes). Only the layout is looked at."""
    for x in arrays:  # a plain loop: a decode step makes this call in every layer
        if not x.flags.aligned or _bad_stride(x) is not None:
            return False
    return True


def _strides(x, name, ndim):
    """The strides in floats of x's first three dims (attention and RoPE inputs; x already passed
    _check_array). A tuple, which cffi hands to C as a temporary long[3]: ffi.new of a list cost ~2 us
    more, and a decode step needs ~5 of these per layer."""
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    d = _bad_stride(x)
    if d == x.ndim - 1:
        raise ValueError(
            f"{name}'s last dimension must be contiguous (stride 4 bytes), got strides {x.strides}; "
            f"pass np.ascontiguousarray({name})"
        )
    if d is not None:
        raise ValueError(
            f"{name} (shape {x.shape}) has stride {x.strides[d]} bytes in dim {d}; the kernels need positive "
            f"multiples of 4; pass np.ascontiguousarray({name})"
        )
    shape, strides = x.shape, x.strides
    return (strides[0] // 4 if shape[0] > 1 else 0, strides[1] // 4 if shape[1] > 1 else 0,
            strides[2] // 4 if shape[2] > 1 else 0)


def _check_status(status, what):
    if status != 0:
        raise MemoryError(f"{what}: the C kernel could not allocate its scratch memory")


# ---------------------------------------------------------------------------------------------------
# matmul


def matmul(a, b, out=None):
    """C (M, N) = a (M, K) @ b (K, N) in float32; a or b may be a transposed view (x.T), no copy.

    out, if given, must be a C-contiguous float32 (M, N) array that shares no memory with a or b.
    """
    _require()
    trans_a, lda = _matrix_layout(a, "a")
    trans_b, ldb = _matrix_layout(b, "b")
    M, K = a.shape
    if b.shape[0] != K:
        raise ValueError(f"matmul shapes do not fit: a {a.shape} @ b {b.shape} (a's columns must equal b's rows)")
    N = b.shape[1]
    if out is None:
        out = np.empty((M, N), dtype=np.float32)
    else:
        _check_array(out, "out")
        if out.shape != (M, N):
            raise ValueError(f"out has shape {out.shape}, expected {(M, N)}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous array")
        if np.may_share_memory(out, a) or np.may_share_memory(out, b):
            raise ValueError("out must not share memory with a or b (C is written while A and B are read)")
    return matmul_laid_out(a, b, (trans_a, lda), (trans_b, ldb), out)


def matmul_laid_out(a, b, layout_a, layout_b, out=None):
    """matmul for callers that have checked everything but the sizes already: a and b float32, their
    layouts from matrix_layout, a's columns equal to b's rows, out (if given) as matmul wants it.
    llama3np.backend calls this: a decode step makes ~60 products, and checking twice cost ~1.5 us each."""
    M, K = a.shape
    N = b.shape[1]
    if max(M, N, K) > _INT_MAX:
        raise ValueError(f"matmul dimensions larger than 2**31 - 1: a {a.shape}, b {b.shape}")
    if out is None:
        out = np.empty((M, N), dtype=np.float32)
    if M == 0 or N == 0:
        return out
    status = lib.sgemm(layout_a[0], layout_b[0], M, N, K, _ptr(a), layout_a[1], _ptr(b), layout_b[1], _ptr(out),
                       max(N, 1), 0)
    _check_status(status, "matmul")
    return out


def linear_dense(x, weight):
    """y (..., out) = x (..., in) @ weight.T, for callers that have checked that x and weight (out, in) are
    dense (float32, aligned, C-contiguous: kernels.dense), x not empty and x's last dimension weight's
    second: the model's linear layers. The same product and bits as matmul(x2, weight.T), with only the
    checks left to make: a decode step makes ~60 of these per token, and matmul's general ones cost
    ~2-3 us of each (a tenth of a `tiny` model's step)."""
    K = x.shape[-1]
    N = weight.shape[0]
    M = x.size // K
    if N == 0 or max(M, N, K) > _INT_MAX:  # the general path returns the empty result or says what is wrong
        return matmul(x.reshape(M, K), weight.T).reshape(x.shape[:-1] + (N,))
    out = np.empty(x.shape[:-1] + (N,), dtype=np.float32)
    status = lib.sgemm(0, 1, M, N, K, ffi.from_buffer("float[]", x), K, ffi.from_buffer("float[]", weight), K,
                       ffi.from_buffer("float[]", out), N, 0)
    _check_status(status, "matmul")
    return out


def _contiguous_matrix(x, name):
    _check_array(x, name)
    if x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(f"{name} must be a 2-D C-contiguous array, got shape {x.shape}")


def naive_matmul(a, b):
    """The textbook triple loop in C (for notebooks/02_kernels); contiguous inputs only."""
    return _teaching_matmul("naive_sgemm", a, b)


def blocked_matmul(a, b):
    """The triple loop reordered and tiled for the caches, no packing or explicit SIMD (notebook)."""
    return _teaching_matmul("blocked_sgemm", a, b)


def _teaching_matmul(c_name, a, b):
    _require()
    _contiguous_matrix(a, "a")
    _contiguous_matrix(b, "b")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul shapes do not fit: a {a.shape} @ b {b.shape}")
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    getattr(lib, c_name)(a.shape[0], b.shape[1], a.shape[1], _ptr(a), _ptr(b), _ptr(out))
    return out


# ---------------------------------------------------------------------------------------------------
# fused attention


def _attention_inputs(q, k, v, kv_start):
    """Check q, k, v and kv_start -> (B, H, KV, T, S, hd, strides of q, k, v, kv_start as a C int *)."""
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_array(x, name)
    ops.check_attention_shapes(q, k, v, kv_start)  # the reference's shape rules, one copy of them
    qs, ks, vs = _strides(q, "q", 4), _strides(k, "k", 4), _strides(v, "v", 4)
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    if kv_start is None:
        return B, H, KV, T, S, hd, qs, ks, vs, ffi.NULL, None
    # checked above: (B, T) integers in [0, S), so int32 holds them; C reads a contiguous copy
    kv32 = np.ascontiguousarray(kv_start, dtype=np.int32)
    ptr = ffi.from_buffer("int[]", kv32) if kv32.size else ffi.NULL
    return B, H, KV, T, S, hd, qs, ks, vs, ptr, kv32  # kv32 keeps the buffer alive during the call


def _check_causal(causal):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    return int(bool(causal))


def attention_forward(q, k, v, causal=True, kv_start=None):
    """Fused attention: out (B, H, T, hd) = softmax(q k^T / sqrt(hd) + mask) v, and lse (B, H, T).

    q (B, n_heads, T, hd), k and v (B, n_kv_heads, S, hd), float32; query head h reads kv head
    h // (n_heads // n_kv_heads); the queries are the last T of the S positions. kv_start (B, T)
    integers in [0, S) or None: query i of row b sees only keys j >= kv_start[b, i], capped at its own
    position under the causal mask (document masks, left padding; as ops.attention_forward). lse is
    the per-row log-sum-exp of the scaled, masked scores (what the backward needs to recompute the
    softmax).
    """
    _require()
    c = _check_causal(causal)
    B, H, KV, T, S, hd, qs, ks, vs, kvp, _keep = _attention_inputs(q, k, v, kv_start)
    out = np.empty((B, H, T, hd), dtype=np.float32)
    lse = np.empty((B, H, T), dtype=np.float32)
    if out.size == 0:
        return out, lse
    status = lib.attention_forward(_ptr(q), qs, _ptr(k), ks, _ptr(v), vs, _ptr(out), _ptr(lse),
                                   B, H, KV, T, S, hd, c, kvp)
    _check_status(status, "attention_forward")
    return out, lse


def attention_backward(dout, q, k, v, out, lse, causal=True, kv_start=None):
    """Gradients of attention_forward -> (dq, dk, dv), the probabilities recomputed from lse; causal
    and kv_start must be the forward's."""
    _require()
    c = _check_causal(causal)
    B, H, KV, T, S, hd, qs, ks, vs, kvp, _keep = _attention_inputs(q, k, v, kv_start)
    for x, name in ((dout, "dout"), (out, "out"), (lse, "lse")):
        _check_array(x, name)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout {dout.shape} and out {out.shape} must have q's shape {q.shape}")
    if lse.shape != (B, H, T):
        raise ValueError(f"lse has shape {lse.shape}, expected (B, H, T) = {(B, H, T)}")
    douts, outs, lses = _strides(dout, "dout", 4), _strides(out, "out", 4), _strides(lse[..., None], "lse", 4)
    dq = np.zeros((B, H, T, hd), dtype=np.float32)
    dk = np.zeros((B, KV, S, hd), dtype=np.float32)
    dv = np.zeros((B, KV, S, hd), dtype=np.float32)
    if dq.size == 0 or dk.size == 0:
        return dq, dk, dv
    status = lib.attention_backward(_ptr(dout), douts, _ptr(q), qs, _ptr(k), ks, _ptr(v), vs, _ptr(out), outs,
                                    _ptr(lse), lses, _ptr(dq), _ptr(dk), _ptr(dv), B, H, KV, T, S, hd, c, kvp)
    _check_status(status, "attention_backward")
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# the elementwise ops of a training step (csrc/elementwise.c): RMSNorm, SwiGLU, RoPE, cross-entropy,
# AdamW. One or two passes over memory each, on the thread pool; the same bits at any thread count and
# on every instruction set. RoPE, SwiGLU's backward and AdamW give the reference's bits exactly; the
# others differ from llama3np.ops by their exp and the order of their sums (~1e-7 relative).


def _check_dense(x, name):
    """float32, aligned and C-contiguous: what the elementwise kernels read and write."""
    _check_array(x, name)
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} (shape {x.shape}, strides {x.strides}) must be C-contiguous; "
                         f"pass np.ascontiguousarray({name})")


def dense(*arrays) -> bool:
    """True when every array is float32, aligned and C-contiguous (the elementwise kernels' layout)."""
    for x in arrays:
        if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.aligned:
            return False
    return True


def _same_shape(x, name, shape):
    if x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape}")


def rmsnorm_forward(x, weight, eps):
    """x (..., C), weight (C,) -> (y, xhat, rstd (..., 1)): y = xhat * weight, xhat = x * rstd,
    rstd = 1 / sqrt(mean(x^2) + eps), as ops.rmsnorm_forward."""
    _require()
    _check_dense(x, "x")
    _check_dense(weight, "weight")
    if x.ndim < 1 or weight.shape != x.shape[-1:]:
        raise ValueError(f"weight has shape {weight.shape}, expected ({x.shape[-1] if x.ndim else '?'},) for x {x.shape}")
    y, xhat = np.empty_like(x), np.empty_like(x)
    rstd = np.empty(x.shape[:-1] + (1,), dtype=np.float32)
    C = x.shape[-1]
    if x.size:
        lib.rmsnorm_forward(_ptr(x), _ptr(weight), float(eps), x.size // C, C, _ptr(y), _ptr(xhat), _ptr(rstd))
    return y, xhat, rstd


def rmsnorm_backward(dout, xhat, rstd, weight):
    """-> (dx like dout, dweight (C,)) from the forward's xhat, rstd (..., 1) and weight."""
    _require()
    for x, name in ((dout, "dout"), (xhat, "xhat"), (rstd, "rstd"), (weight, "weight")):
        _check_dense(x, name)
    _same_shape(xhat, "xhat", dout.shape)
    _same_shape(rstd, "rstd", dout.shape[:-1] + (1,))
    _same_shape(weight, "weight", dout.shape[-1:])
    dx, dweight = np.empty_like(dout), np.zeros(dout.shape[-1:], dtype=np.float32)
    C = dout.shape[-1]
    if dout.size:
        status = lib.rmsnorm_backward(_ptr(dout), _ptr(xhat), _ptr(rstd), _ptr(weight), dout.size // C, C,
                                      _ptr(dx), _ptr(dweight))
        _check_status(status, "rmsnorm_backward")
    return dx, dweight


def swiglu_forward(a, b, store=True):
    """a, b of one shape -> (silu(a) * b, sig, silu): sig = sigmoid(a), silu = a * sig (ops.swiglu_forward).
    store=False returns (out, None, None): the backward then recomputes sig and silu from a (the same bits),
    and the forward writes one array instead of three."""
    _require()
    _check_dense(a, "a")
    _check_dense(b, "b")
    _same_shape(b, "b", a.shape)
    out = np.empty_like(a)
    sig, silu = (np.empty_like(a), np.empty_like(a)) if store else (None, None)
    if a.size:
        lib.swiglu_forward(_ptr(a), _ptr(b), a.size, _ptr(out), _ptr_or_null(sig), _ptr_or_null(silu))
    return out, sig, silu


def swiglu_backward(dout, a, b, sig=None, silu=None):
    """-> (da, db), from the forward's a, b, sig, silu (ops.swiglu_backward, the same bits); with sig and
    silu None, from sig and silu recomputed as swiglu_forward computes them (the same bits again)."""
    _require()
    if (sig is None) != (silu is None):
        raise ValueError("pass both sig and silu (the forward's) or neither (recomputed from a)")
    arrays = ((dout, "dout"), (a, "a"), (b, "b")) + (((sig, "sig"), (silu, "silu")) if sig is not None else ())
    for x, name in arrays:
        _check_dense(x, name)
        _same_shape(x, name, dout.shape)
    da, db = np.empty_like(dout), np.empty_like(dout)
    if dout.size:
        lib.swiglu_backward(_ptr(dout), _ptr(a), _ptr(b), _ptr_or_null(sig), _ptr_or_null(silu), dout.size,
                            _ptr(da), _ptr(db))
    return da, db


def rope_forward(x, cos, sin, inverse=False):
    """x (B, T, n, hd) -> x rotated by the angles of cos, sin (T, hd/2), as ops.rope_forward (inverse:
    by the negative angles, ops.rope_backward), a new C-contiguous array. x is read in place when its
    last dimension is contiguous (e.g. the transposed view of a (B, n, T, hd) gradient)."""
    _require()
    _check_dense(cos, "cos")
    _check_dense(sin, "sin")
    _check_array(x, "x")
    xs = _strides(x, "x", 4)
    B, T, n, hd = x.shape
    if hd % 2 or cos.shape != (T, hd // 2) or sin.shape != cos.shape:
        raise ValueError(f"RoPE needs an even head_dim and cos, sin of shape (T, hd/2) = {(T, hd // 2)}; got "
                         f"x {x.shape}, cos {cos.shape}, sin {sin.shape}")
    out = np.empty((B, T, n, hd), dtype=np.float32)
    if out.size:
        lib.rope_forward(_ptr(x), xs, _ptr(cos), _ptr(-sin if inverse else sin), B, T, n, hd, _ptr(out))
    return out


# ---------------------------------------------------------------------------------------------------
# one decode step of the transformer blocks (csrc/decode.c)

_BLOCK_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attention_norm", "ffn_norm")


class DecodePlan(NamedTuple):
    """A model's block weights and a KV cache, checked once by decode_plan for decode_blocks. It keeps the
    arrays (so the pointers C reads stay valid) and holds while they are the same objects (plan_holds):
    the weights are read in place, so changing their values, as a loader or an optimizer does, is fine."""
    arrays: tuple  # the 9 weights of each layer (model.LAYER_PARAM_NAMES order), then each layer's cache_k, cache_v
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    cache_shape: tuple  # (B', n_kv_heads, L, head_dim)
    cache_spans: tuple  # (start, end) addresses of the caches, sorted: x must not overlap them
    weights: object  # cffi float *[9 * n_layers]
    caches: object  # cffi float *[2 * n_layers]
    buffers: tuple  # the ffi.from_buffer views behind the pointers, kept with the plan


def _span(a):
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def decode_plan(layers, caches_k, caches_v, n_heads) -> DecodePlan:
    """Check once what every decode step of a model reads: layers, a list of each block's 9 weights in
    model.LAYER_PARAM_NAMES order (wq, wk, wv, wo, w1, w2, w3, attention_norm, ffn_norm) shaped as
    model.param_shapes says, and the block's cache_k, cache_v (B', n_kv_heads, L, head_dim), all float32
    and C-contiguous, the caches writeable and apart from every other array."""
    _require()
    n = len(layers)
    if n == 0 or len(caches_k) != n or len(caches_v) != n:
        raise ValueError(f"need one cache_k and one cache_v per layer and at least one layer, got {n} layers, "
                         f"{len(caches_k)} cache_k, {len(caches_v)} cache_v")
    for i, layer in enumerate(layers):
        if len(layer) != 9:
            raise ValueError(f"layer {i} must hold the block's 9 weights (model.LAYER_PARAM_NAMES), got {len(layer)}")
        for w, name in zip(layer, _BLOCK_NAMES):
            _check_dense(w, f"layer {i} {name}")
    caches = [c for pair in zip(caches_k, caches_v) for c in pair]
    for c, name in zip(caches, ("cache_k", "cache_v") * n):
        _check_dense(c, name)
        if c.ndim != 4 or c.shape != caches[0].shape:
            raise ValueError(f"cache_k and cache_v must have one shape (B', n_kv_heads, L, head_dim) in every layer, "
                             f"got {c.shape} and {caches[0].shape}")
        if not c.flags.writeable:
            raise ValueError("cache_k and cache_v must be writeable (each step's key and value are written into them)")
    Bc, KV, L, hd = caches[0].shape
    an, w1 = layers[0][7], layers[0][4]
    H, dim, hidden = n_heads, an.shape[0] if an.ndim == 1 else -1, w1.shape[0] if w1.ndim == 2 else -1
    if not (isinstance(H, (int, np.integer)) and KV > 0 and H > 0 and H % KV == 0 and hd > 0 and hd % 2 == 0):
        raise ValueError(f"n_heads={H!r} must be a positive multiple of the cache's n_kv_heads={KV}, and head_dim "
                         f"={hd} even")
    want = ((H * hd, dim), (KV * hd, dim), (KV * hd, dim), (dim, H * hd), (hidden, dim), (dim, hidden),
            (hidden, dim), (dim,), (dim,))
    for i, layer in enumerate(layers):
        for w, shape, name in zip(layer, want, _BLOCK_NAMES):
            if w.shape != shape:
                raise ValueError(f"layer {i} {name} has shape {w.shape}, expected {shape} (dim {dim}, {H} heads of "
                                 f"{hd}, hidden {hidden})")
    if dim < 1 or hidden < 1 or Bc < 1 or L < 1:
        raise ValueError(f"need dim, hidden and the cache's batch and length >= 1: dim {dim}, hidden {hidden}, "
                         f"cache {caches[0].shape}")
    if max(Bc * KV * L * hd, H * hd * dim, hidden * dim) > _INT_MAX:  # C's int sizes
        raise ValueError(f"decode sizes larger than 2**31 - 1: cache {caches[0].shape}, wq {layers[0][0].shape}, "
                         f"w1 {layers[0][4].shape}")
    # the caches are written while everything else is read: no cache may overlap another array (a sweep
    # over the arrays sorted by address: each start is checked against the furthest end so far)
    spans = sorted([(*_span(c), True) for c in caches] + [(*_span(w), False) for layer in layers for w in layer])
    cache_end = any_end = 0
    for start, end, is_cache in spans:
        if start < cache_end or (is_cache and start < any_end):
            raise ValueError("cache_k and cache_v must not share memory with each other or with the weights")
        any_end = max(any_end, end)
        cache_end = max(cache_end, end) if is_cache else cache_end
    arrays = tuple(w for layer in layers for w in layer) + tuple(caches_k) + tuple(caches_v)
    weight_bufs = [ffi.from_buffer("float[]", w) for layer in layers for w in layer]
    cache_bufs = [ffi.from_buffer("float[]", c) for c in caches]
    return DecodePlan(arrays, n, dim, H, KV, hd, hidden, caches[0].shape, tuple(sorted(_span(c) for c in caches)),
                      ffi.new("float *[]", weight_bufs), ffi.new("float *[]", cache_bufs),
                      tuple(weight_bufs + cache_bufs))


def plan_holds(plan, arrays) -> bool:
    """True when `arrays` (each layer's 9 weights, then every cache_k, then every cache_v) are the very
    objects `plan` checked."""
    return len(arrays) == len(plan.arrays) and all(map(operator.is_, arrays, plan.arrays))


def decode_blocks(plan, x, start_pos, cos, sin, eps, kv_start=None, head=None):
    """Every block of `plan` (decode_plan) for ONE new position per sequence, in one C call: x (B, 1, dim)
    -> the last block's output (B, 1, dim), each block's key and value for this step written into its
    caches at start_pos. The same kernels in model.block_forward's order, so the same bits as
    block_forward on the C backend, block after block; a decode step makes one Python call for all of them
    instead of ~20 per layer.

    cos, sin (1, head_dim/2): the angles of start_pos (ops.rope_cos_sin); kv_start None or (B, 1) ints in
    [0, start_pos]: the first key each sequence may see (left padding, as attention_forward).
    head (norm (dim,), w_out (V, dim)), optional: return instead the logits (B, 1, V) of model.forward's last
    two steps after the blocks, the final RMSNorm and the LM head, run in the same call (decode_logits: the same
    kernels, the same bits; a whole decode step is then one call).
    """
    _require()
    for a, name in ((x, "x"), (cos, "cos"), (sin, "sin")):
        _check_dense(a, name)
    Bc, KV, L, hd = plan.cache_shape
    if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] != plan.dim or not 0 < x.shape[0] <= Bc:
        raise ValueError(f"x must have shape (B, 1, dim) = (1..{Bc}, 1, {plan.dim}) (one new position), got {x.shape}")
    B = x.shape[0]
    if not isinstance(start_pos, (int, np.integer)) or isinstance(start_pos, bool):
        raise TypeError(f"start_pos must be an int, got {start_pos!r}")
    if not 0 <= start_pos < L:
        raise ValueError(f"a batch of {B} at position {start_pos} does not fit the cache {plan.cache_shape}")
    if cos.shape != (1, hd // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos, sin must have shape (1, head_dim/2) = {(1, hd // 2)}; got {cos.shape}, {sin.shape}")
    start, end = _span(x)
    k = bisect.bisect_left(plan.cache_spans, (end,))  # the caches starting before x ends: the last may overlap
    if k and plan.cache_spans[k - 1][1] > start:
        raise ValueError("x must not share memory with cache_k or cache_v (the caches are written while x is read)")
    kvp, kv32 = ffi.NULL, None
    if kv_start is not None:
        kv_start = np.asarray(kv_start)
        if kv_start.shape != (B, 1) or kv_start.dtype.kind not in "iu":
            raise ValueError(f"kv_start must be a ({B}, 1) integer array, got shape {kv_start.shape} and dtype "
                             f"{kv_start.dtype}")
        if kv_start.min() < 0 or kv_start.max() > start_pos:
            raise ValueError(f"kv_start holds key positions outside [0, {start_pos}]: min {kv_start.min()}, "
                             f"max {kv_start.max()}")
        kv32 = np.ascontiguousarray(kv_start, dtype=np.int32)  # kept alive during the call
        kvp = ffi.from_buffer("int[]", kv32)
    args = (plan.n_layers, plan.weights, plan.caches, B, plan.dim, plan.n_heads, KV, hd, plan.hidden, float(eps), L,
            int(start_pos), ffi.from_buffer("float[]", cos), ffi.from_buffer("float[]", sin), kvp)
    if head is None:
        out = np.empty_like(x)
        status = lib.decode_blocks(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", out), *args)
    else:
        norm, w_out = head
        _check_dense(norm, "norm")
        _check_dense(w_out, "w_out")
        if norm.shape != (plan.dim,) or w_out.ndim != 2 or w_out.shape[1] != plan.dim or w_out.shape[0] < 1:
            raise ValueError(f"head must be the final norm ({plan.dim},) and the LM head (vocab, {plan.dim}), got "
                             f"shapes {norm.shape} and {w_out.shape}")
        if w_out.size > _INT_MAX:
            raise ValueError(f"LM head {w_out.shape} larger than 2**31 - 1 values")
        out = np.empty((B, 1, w_out.shape[0]), np.float32)
        status = lib.decode_logits(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", out), *args,
                                   _ptr(norm), _ptr(w_out), w_out.shape[0])
    _check_status(status, "decode_blocks")
    return out


def block_decode(x, layer, cache_k, cache_v, start_pos, cos, sin, eps, n_heads, kv_start=None):
    """One block of decode_blocks: model.block_forward for one new position per sequence against its KV
    cache (B', n_kv_heads, L, hd), B <= B', in one C call; layer holds its 9 weights (decode_plan)."""
    return decode_blocks(decode_plan([layer], [cache_k], [cache_v], n_heads), x, start_pos, cos, sin, eps, kv_start)


def _check_targets(targets, shape, V, name="targets"):
    """targets: integers of the given shape in [0, V), as a contiguous int64 array (C indexes with them)."""
    targets = np.asarray(targets)
    if targets.shape != shape or targets.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers of shape {shape}, got shape {targets.shape} and dtype "
                         f"{targets.dtype}")
    if targets.size and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"{name} hold ids outside [0, {V}): min {targets.min()}, max {targets.max()}")
    return np.ascontiguousarray(targets, dtype=np.int64)


def _cross_entropy_rows_of(logits, targets):
    """The checks of the cross-entropy forward -> (V, int64 targets, nll, lse) with nll and lse to fill."""
    _require()
    _check_dense(logits, "logits")
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last axis (the vocabulary), got shape {logits.shape}")
    V = logits.shape[-1]
    t64 = _check_targets(targets, logits.shape[:-1], V)
    return V, t64, np.empty(logits.shape[:-1], np.float32), np.empty(logits.shape[:-1], np.float32)


def cross_entropy_rows(logits, targets):
    """logits (..., V), targets (...) ints in [0, V) -> (nll (...), lse (...)): lse = log sum exp(logits)
    over the vocabulary, nll = lse - logits[target] (ops.token_nll)."""
    V, t64, nll, lse = _cross_entropy_rows_of(logits, targets)
    if lse.size:
        lib.cross_entropy_forward(_ptr(logits), ffi.from_buffer("int64_t[]", t64), lse.size, V, _ptr(lse), _ptr(nll))
    return nll, lse


def cross_entropy_backward(logits, targets, lse, scale):
    """dlogits (..., V) = (softmax(logits) - onehot(targets)) * scale[..., None], the softmax from lse."""
    _require()
    for x, name in ((logits, "logits"), (lse, "lse"), (scale, "scale")):
        _check_dense(x, name)
    _same_shape(lse, "lse", logits.shape[:-1])
    _same_shape(scale, "scale", logits.shape[:-1])
    V = logits.shape[-1]
    t64 = _check_targets(targets, logits.shape[:-1], V)
    dlogits = np.empty_like(logits)
    if lse.size:
        lib.cross_entropy_backward(_ptr(logits), ffi.from_buffer("int64_t[]", t64), _ptr(lse), _ptr(scale), lse.size,
                                   V, _ptr(dlogits))
    return dlogits


def cross_entropy_fused(logits, targets, scale):
    """cross_entropy_rows and cross_entropy_backward in one pass that writes dlogits over `logits`:
    -> (nll, lse), and logits (..., V) now holds (softmax - onehot(targets)) * scale[..., None]. The same
    bits as the two calls; a row is read from memory once, and no second logits-sized array is made."""
    V, t64, nll, lse = _cross_entropy_rows_of(logits, targets)
    _check_dense(scale, "scale")
    _same_shape(scale, "scale", logits.shape[:-1])
    if not logits.flags.writeable:
        raise ValueError("logits must be writeable (dlogits are written over them)")
    if lse.size:
        lib.cross_entropy_fused(_ptr(logits), ffi.from_buffer("int64_t[]", t64), _ptr(scale), lse.size, V, _ptr(lse),
                                _ptr(nll))
    return nll, lse


def embedding_backward(dout, tokens, vocab_size):
    """dout (..., C), tokens (...) ints in [0, vocab_size) -> dweight (vocab_size, C): the rows of dout added
    into the rows their tokens name, in order (ops.embedding_backward's np.add.at: the same bits)."""
    _require()
    _check_dense(dout, "dout")
    if dout.ndim < 1:
        raise ValueError(f"dout must have a last axis (the model dimension), got shape {dout.shape}")
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a whole number >= 1, got {vocab_size!r}")
    C = dout.shape[-1]
    t64 = _check_targets(tokens, dout.shape[:-1], vocab_size, "tokens")
    dweight = np.zeros((int(vocab_size), C), np.float32)
    if t64.size and C:
        lib.embedding_backward(_ptr(dout), ffi.from_buffer("int64_t[]", t64), t64.size, C, _ptr(dweight))
    return dweight


def adamw_update(p, g, m, v, decay, beta1, beta2, sqrt_bc2, eps, step_size):
    """One AdamW update of p, m, v in place (optim.AdamW.step's operations in its order, each rounded
    to float32 as NumPy rounds it: the same bits). decay = 1 - lr * weight_decay, or 1 for no decay."""
    _require()
    for x, name in ((p, "p"), (g, "g"), (m, "m"), (v, "v")):
        _check_dense(x, name)
        _same_shape(x, name, p.shape)
        if x is not g and not x.flags.writeable:
            raise ValueError(f"{name} must be writeable (updated in place)")
    f32 = np.float32  # NumPy rounds a Python float to the array's dtype before operating
    if p.size:
        lib.adamw_update(_ptr(p), _ptr(g), _ptr(m), _ptr(v), p.size, f32(decay), f32(beta1), f32(1 - beta1),
                         f32(beta2), f32(1 - beta2), f32(sqrt_bc2), f32(eps), f32(step_size))
