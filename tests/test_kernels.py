"""The C kernels (llama3np.kernels) against the NumPy reference, and their guard rails.

What must hold:
- matmul equals a @ b for any shape (awkward sizes, transposed and sliced views), on every
  instruction-set path of the micro-kernel and with 1 or 2 threads; the micro-kernel timed alone
  (kernels.microkernel_rate) adds A @ B to its tile on every call, exactly;
- the fused attention equals llama3np.ops.attention_forward / attention_backward (computed in float64)
  for GQA ratios 1..8, n_kv_heads = 1, a decode step (T = 1) against a long cache, S > T, and q, k, v
  passed as transposed or sliced views;
- the whole model gives the same loss and gradients on the "c" and "numpy" backends;
- bad input is a TypeError / ValueError raised in Python, never a call into C with it;
- without a C compiler the package installs and runs on NumPy.

Tolerances. A float32 dot product of length K has an error of at most about K * 2**-24 times the same
sum over absolute values (|a| @ |b|); we assert that bound (a missing or doubled term would break it by
orders of magnitude). Attention outputs are O(1) combinations of O(1) values: rtol 1e-4, atol 2e-5
against float64, and gradients get the same relative bound scaled by their largest magnitude.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import backend, kernels, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason=f"C kernels not built ({kernels.import_error}): run `pip install -e .` or `python csrc/build_kernels.py`",
)

ISAS = kernels.available_isas() if kernels.available() else ["portable"]
AWKWARD = [1, 3, 7, 16, 33, 65, 127]


def _assert_matmul_close(c, a, b):
    """|C - A@B| <= K * 2**-24 * (|A| @ |B|) + tiny, element by element (the float32 dot product bound)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = a64 @ b64
    bound = (a.shape[1] + 2) * 2.0**-24 * (np.abs(a64) @ np.abs(b64)) + 1e-30
    err = np.abs(c.astype(np.float64) - ref)
    assert c.dtype == np.float32 and c.shape == ref.shape
    assert np.all(err <= bound), f"max error {err.max()} exceeds the float32 bound at {np.unravel_index(np.argmax(err - bound), err.shape)}"


def _operand(rng, rows, cols, transposed):
    """A (rows, cols) float32 matrix, either C-contiguous or as the .T view of a (cols, rows) one."""
    if transposed:
        return rng.standard_normal((cols, rows)).astype(np.float32).T
    return rng.standard_normal((rows, cols)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# matmul


@settings(max_examples=30)
@given(
    M=st.sampled_from(AWKWARD) | st.integers(1, 90),
    N=st.sampled_from(AWKWARD) | st.integers(1, 90),
    K=st.sampled_from(AWKWARD + [300]) | st.integers(1, 90),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    isa=st.sampled_from(ISAS),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_matmul_equals_numpy_for_any_shape_transpose_isa_and_thread_count(M, N, K, trans_a, trans_b, isa, threads, seed):
    """C @ equals NumPy's within the float32 rounding bound, whatever the shape, layout and kernel."""
    kernels.set_isa(isa)
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    a, b = _operand(rng, M, K, trans_a), _operand(rng, K, N, trans_b)
    _assert_matmul_close(kernels.matmul(a, b), a, b)



@settings(max_examples=20)
@given(
    M=st.integers(17, 420),  # above the few-rows path: the packed one, whose row tiles depend on the threads
    N=st.integers(1, 600),
    K=st.integers(1, 700),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**16),
)
def test_matmul_gives_the_same_bits_on_one_and_two_threads(M, N, K, trans_a, trans_b, isa, seed):
    """How the rows are cut into tiles and claims depends on the thread count; what each element sums, and in
    which order, must not: the training step's bits may not depend on the threads."""
    kernels.set_isa(isa)
    rng = np.random.default_rng(seed)
    a, b = _operand(rng, M, K, trans_a), _operand(rng, K, N, trans_b)
    kernels.set_num_threads(1)
    one = kernels.matmul(a, b)
    kernels.set_num_threads(2)
    assert np.array_equal(kernels.matmul(a, b), one)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_reading_a_in_place_and_packing_it_give_the_same_bits(isa, threads):
    """sgemm reads A's rows in place unless they are a multiple of 1024 floats apart (then it packs them): the
    same rows with both leading dimensions, ragged at every edge, give the same bits."""
    kernels.set_isa(isa)
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(3)
    wide = rng.standard_normal((603, 1024)).astype(np.float32)
    for K, trans_b in ((300, False), (517, True), (1000, False)):
        packed = wide[:, :K]  # rows 1024 floats apart: packed
        in_place = np.ascontiguousarray(packed)  # rows K floats apart: read in place (but for 'portable')
        b = _operand(rng, K, 77, trans_b)
        got = kernels.matmul(in_place, b)
        assert np.array_equal(got, kernels.matmul(packed, b))
        _assert_matmul_close(got, in_place, b)


@pytest.mark.parametrize("isa", ISAS)
def test_matmul_large_awkward_shapes_cross_every_block_boundary(isa):
    """Sizes past the cache blocks (K > 256, N > 384, M > 2016 rows) with ragged edges, 2 threads."""
    kernels.set_isa(isa)
    kernels.set_num_threads(2)
    rng = np.random.default_rng(1)
    a = _operand(rng, 2030, 517, False)
    b = _operand(rng, 517, 401, True)
    _assert_matmul_close(kernels.matmul(a, b), a, b)
    a, b = _operand(rng, 5, 1031, True), _operand(rng, 1031, 1000, False)  # a decode-like product
    _assert_matmul_close(kernels.matmul(a, b), a, b)


def test_matmul_reads_sliced_views_in_place_and_writes_out():
    """Row-sliced and column-sliced views (leading dimension > width) give the right product; out= is filled and returned."""
    rng = np.random.default_rng(2)
    big = rng.standard_normal((90, 120)).astype(np.float32)
    a = big[5:70, 10:43]  # (65, 33), rows 120 floats apart
    b = big[:33, 50:117]  # (33, 67)
    out = np.full((65, 67), np.nan, dtype=np.float32)
    assert kernels.matmul(a, b, out=out) is out
    _assert_matmul_close(out, a, b)
    bt = big[3:70, 7:40].T  # (33, 67) transposed view with a leading dimension of 120
    _assert_matmul_close(kernels.matmul(a, bt), a, bt)


def test_matmul_with_k_zero_is_zero_and_empty_shapes_work():
    """An empty sum gives zeros; M or N = 0 gives an empty result (no call into C with nothing)."""
    a, b = np.ones((3, 0), np.float32), np.ones((0, 4), np.float32)
    np.testing.assert_array_equal(kernels.matmul(a, b), np.zeros((3, 4), np.float32))
    assert kernels.matmul(np.ones((0, 5), np.float32), np.ones((5, 4), np.float32)).shape == (0, 4)


def test_teaching_kernels_compute_the_same_product():
    """naive_matmul and blocked_matmul (the notebook's first steps) agree with NumPy."""
    rng = np.random.default_rng(3)
    a, b = _operand(rng, 37, 300, False), _operand(rng, 300, 259, False)
    _assert_matmul_close(kernels.naive_matmul(a, b), a, b)
    _assert_matmul_close(kernels.blocked_matmul(a, b), a, b)


@pytest.mark.parametrize(
    "a, b, kwargs, error, match",
    [
        (np.ones((3, 4)), np.ones((4, 2), np.float32), {}, TypeError, "float32"),
        (np.ones((3, 4), np.float32), np.ones((4, 2), np.int32), {}, TypeError, "float32"),
        ([[1.0]], np.ones((1, 2), np.float32), {}, TypeError, "numpy array"),
        (np.ones((2, 3, 4), np.float32), np.ones((4, 2), np.float32), {}, ValueError, "2-D"),
        (np.ones((3, 4), np.float32), np.ones((5, 2), np.float32), {}, ValueError, "do not fit"),
        (np.ones((6, 8), np.float32)[::2, ::2], np.ones((4, 2), np.float32), {}, ValueError, "contiguous rows or columns"),
        (np.ones((3, 4), np.float32)[::-1], np.ones((4, 2), np.float32), {}, ValueError, "contiguous rows or columns"),
        (np.ones((3, 4), np.float32), np.ones((4, 2), np.float32), {"out": np.empty((3, 3), np.float32)}, ValueError, "shape"),
        (np.ones((3, 4), np.float32), np.ones((4, 2), np.float32), {"out": np.empty((3, 2))}, TypeError, "float32"),
        (np.ones((3, 4), np.float32), np.ones((4, 2), np.float32), {"out": np.empty((2, 3), np.float32).T}, ValueError, "C-contiguous"),
    ],
)
def test_matmul_rejects_bad_input_with_a_clear_error(a, b, kwargs, error, match):
    """Wrong dtype, rank, shape or layout, or a bad out=, raise before C is called."""
    with pytest.raises(error, match=match):
        kernels.matmul(a, b, **kwargs)


def test_matmul_rejects_out_aliasing_an_input():
    """Writing C while reading A from the same memory would corrupt A: refused."""
    x = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="share memory"):
        kernels.matmul(x, np.ones((4, 4), np.float32), out=x)
    with pytest.raises(ValueError, match="share memory"):
        kernels.matmul(np.ones((4, 4), np.float32), x.T, out=x)


def test_matmul_rejects_unaligned_data():
    """A float32 view starting at an odd byte cannot be read as float* safely: refused."""
    raw = np.zeros(4 * 12 + 1, np.uint8)
    a = raw[1:].view(np.float32).reshape(3, 4)
    assert not a.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        kernels.matmul(a, np.ones((4, 2), np.float32))


# the tile of C each instruction set's GEMM micro-kernel computes (csrc/gemm.c)
MICROKERNEL_TILES = {"portable": (4, 8), "avx2": (6, 16), "avx512": (8, 32), "neon": (8, 8)}


@given(kc=st.integers(1, 80), iters=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_the_timed_micro_kernel_adds_a_times_b_on_every_call(kc, iters, seed):
    """microkernel_burst runs the GEMM's micro-kernel: after `iters` calls C holds its start plus iters x A @ B.
    Small integers make every product and sum exact, so the comparison is exact too."""
    rng = np.random.default_rng(seed)
    for name in kernels.available_isas():
        mr, nr = kernels.microkernel_shape(name)
        assert (mr, nr) == MICROKERNEL_TILES[name]
        a = rng.integers(-4, 5, (mr, kc)).astype(np.float32)
        b = rng.integers(-4, 5, (kc, nr)).astype(np.float32)
        c0 = rng.integers(-9, 10, (mr, nr)).astype(np.float32)
        c = c0.copy()
        flops = kernels.lib.microkernel_burst(kernels.ISAS.index(name), kc, iters, kernels._ptr(a), kernels._ptr(b),
                                              kernels._ptr(c))
        assert flops == 2 * mr * nr * kc * iters
        np.testing.assert_array_equal(c, c0 + iters * (a.astype(np.float64) @ b.astype(np.float64)), err_msg=name)


# ---------------------------------------------------------------------------------------------------
# attention


def _attention_inputs(rng, B, H, KV, T, S, hd, layout):
    """q, k, v as the model passes them: q a transposed view of (B, T, H, hd); k, v either contiguous
    or the first S positions of a longer KV-cache buffer."""
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32).transpose(0, 2, 1, 3)  # (B, H, T, hd) view
    if layout == "cache":
        cache_k = rng.standard_normal((B, KV, S + 13, hd)).astype(np.float32)
        cache_v = rng.standard_normal((B, KV, S + 13, hd)).astype(np.float32)
        k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # (B, KV, S, hd) slices of the cache
    elif layout == "transposed":
        k = rng.standard_normal((B, S, KV, hd)).astype(np.float32).transpose(0, 2, 1, 3)
        v = rng.standard_normal((B, S, KV, hd)).astype(np.float32).transpose(0, 2, 1, 3)
    else:
        k = rng.standard_normal((B, KV, S, hd)).astype(np.float32)
        v = rng.standard_normal((B, KV, S, hd)).astype(np.float32)
    return q, k, v


def _f64(*xs):
    return [np.asarray(x, dtype=np.float64) for x in xs]


def _assert_grad_close(got, want, name):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * scale, err_msg=name)


@settings(max_examples=30)
@given(
    B=st.integers(1, 2),
    KV=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 4, 8]),
    T=st.sampled_from([1, 3, 7, 33, 65]) | st.integers(1, 80),
    extra=st.sampled_from([0, 0, 1, 30, 100]),
    hd=st.sampled_from([1, 4, 16, 64, 128]),
    causal=st.booleans(),
    layout=st.sampled_from(["contiguous", "cache", "transposed"]),
    isa=st.sampled_from(ISAS),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_fused_attention_forward_and_backward_equal_the_numpy_reference(B, KV, group, T, extra, hd, causal, layout, isa, threads, seed):
    """out, lse, dq, dk, dv of the C kernel equal ops.attention_* in float64, for GQA, S > T and strided views."""
    kernels.set_isa(isa)
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    H, S = KV * group, T + extra
    q, k, v = _attention_inputs(rng, B, H, KV, T, S, hd, layout)
    out, lse = kernels.attention_forward(q, k, v, causal=causal)
    out64, lse64 = ops.attention_forward(*_f64(q, k, v), causal)
    assert out.dtype == lse.dtype == np.float32 and out.shape == (B, H, T, hd) and lse.shape == (B, H, T)
    np.testing.assert_allclose(out, out64, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(lse, lse64, rtol=1e-5, atol=2e-5)
    dout = rng.standard_normal((B, T, H, hd)).astype(np.float32).transpose(0, 2, 1, 3)
    dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, causal=causal)
    want = ops.attention_backward(*_f64(dout, q, k, v, out64, lse64), causal)
    for name, got, w in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert got.dtype == np.float32 and got.shape == w.shape
        _assert_grad_close(got, w, name)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_step_against_a_long_cache_matches_the_reference(threads):
    """T = 1 query against S = 1500 cached positions (n_kv_heads = 1, 8 query heads): the decode case."""
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(4)
    q, k, v = _attention_inputs(rng, 2, 8, 1, 1, 1500, 64, "cache")
    out, lse = kernels.attention_forward(q, k, v)
    out64, lse64 = ops.attention_forward(*_f64(q, k, v), True)
    np.testing.assert_allclose(out, out64, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(lse, lse64, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("KV", [1, 8])
def test_attention_at_training_size_matches_the_reference_on_two_threads(KV):
    """T = S = 300, hd = 64: many tiles, both ways of splitting the backward over threads."""
    kernels.set_num_threads(2)
    rng = np.random.default_rng(5)
    q, k, v = _attention_inputs(rng, 1, 8, KV, 300, 300, 64, "transposed")
    out, lse = kernels.attention_forward(q, k, v)
    out64, lse64 = ops.attention_forward(*_f64(q, k, v), True)
    np.testing.assert_allclose(out, out64, rtol=1e-4, atol=2e-5)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    got = kernels.attention_backward(dout, q, k, v, out, lse)
    want = ops.attention_backward(*_f64(dout, q, k, v, out64, lse64), True)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        _assert_grad_close(g, w, name)


def test_attention_is_causal_changing_a_future_key_never_changes_past_outputs():
    """With the causal mask, query i's output depends only on keys j <= i."""
    rng = np.random.default_rng(6)
    q, k, v = _attention_inputs(rng, 1, 4, 2, 40, 40, 16, "contiguous")
    out, _ = kernels.attention_forward(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 25:] += 1.0
    v2[:, :, 25:] -= 3.0
    out2, _ = kernels.attention_forward(q, k2, v2)
    np.testing.assert_array_equal(out[:, :, :25], out2[:, :, :25])
    assert not np.allclose(out[:, :, 25:], out2[:, :, 25:])


@pytest.mark.parametrize("isa", ISAS)
def test_attention_with_scores_far_apart_matches_the_reference(isa):
    """Scores spread over hundreds (exp underflows for most keys, clamped at exp(-87)), rows of every
    length 1..70 (the 8- and 16-lane loops and their ragged ends): forward and backward still match."""
    kernels.set_isa(isa)
    rng = np.random.default_rng(11)
    q, k, v = _attention_inputs(rng, 1, 2, 1, 70, 70, 16, "contiguous")
    q = q * 25.0
    out, lse = kernels.attention_forward(q, k, v)
    out64, lse64 = ops.attention_forward(*_f64(q, k, v), True)
    np.testing.assert_allclose(out, out64, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(lse, lse64, rtol=1e-5, atol=5e-5)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    got = kernels.attention_backward(dout, q, k, v, out, lse)
    want = ops.attention_backward(*_f64(dout, q, k, v, out64, lse64), True)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        _assert_grad_close(g, w, name)


@pytest.mark.parametrize("isa", ISAS)
def test_attention_propagates_nan_instead_of_hiding_it(isa):
    """A NaN in a visible score makes that row NaN (no silently finite answer), on every ISA's row code."""
    kernels.set_isa(isa)
    rng = np.random.default_rng(7)
    q, k, v = _attention_inputs(rng, 1, 2, 2, 5, 5, 8, "contiguous")
    q = np.ascontiguousarray(q)
    q[0, 0, 3, 0] = np.nan
    out, lse = kernels.attention_forward(q, k, v)
    assert np.isnan(out[0, 0, 3]).all() and np.isnan(lse[0, 0, 3])
    assert np.isfinite(out[0, 0, :3]).all() and np.isfinite(out[0, 1]).all()


def _good_attention():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 4, 3, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    return q, k, k.copy()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v: (q.astype(np.float64), k, v), TypeError, "float32"),
        (lambda q, k, v: (q, k.astype(np.float16), v), TypeError, "float32"),
        # the shape rules are ops.check_attention_shapes', the reference's (one copy for both)
        (lambda q, k, v: (q[0], k, v), ValueError, r"attention expects q \(B, H, T, hd\)"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"k, v \(B, KV, S, hd\)"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "H divisible by KV"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, "H divisible by KV"),  # no kv head at all
        (lambda q, k, v: (q, k[:, :, :2], v[:, :, :2]), ValueError, "S >= T"),
        (lambda q, k, v: (q[..., :4], k, v), ValueError, "same B and hd"),
        (lambda q, k, v: (q[..., ::2], k[..., ::2], v[..., ::2]), ValueError, "last dimension must be contiguous"),
        (lambda q, k, v: (q[:, :, ::-1], k, v), ValueError, "positive"),
        (lambda q, k, v: (np.broadcast_to(q[:, :1], q.shape), k, v), ValueError, "positive"),
    ],
)
def test_attention_forward_rejects_bad_input_with_a_clear_error(change, error, match):
    """Wrong dtype, rank, mismatched heads or lengths, non-unit or negative strides: refused before C."""
    with pytest.raises(error, match=match):
        kernels.attention_forward(*change(*_good_attention()))


def test_attention_backward_rejects_mismatched_gradients_and_lse():
    q, k, v = _good_attention()
    out, lse = kernels.attention_forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        kernels.attention_backward(out[:, :, :2], q, k, v, out, lse)
    with pytest.raises(ValueError, match="lse"):
        kernels.attention_backward(out, q, k, v, out, lse[:, :2])
    with pytest.raises(TypeError, match="float32"):
        kernels.attention_backward(out, q, k, v, out, lse.astype(np.float64))
    with pytest.raises(TypeError, match="causal"):
        kernels.attention_backward(out, q, k, v, out, lse, causal="yes")


# ---------------------------------------------------------------------------------------------------
# threads: Python threads calling at once (cffi releases the GIL), and forked children


def test_concurrent_calls_from_python_threads_give_correct_results():
    """Four Python threads multiplying at once (sharing or not the cached workspace) all get the right product."""
    from concurrent.futures import ThreadPoolExecutor

    kernels.set_num_threads(2)
    rng = np.random.default_rng(11)
    pairs = [(_operand(rng, 300 + 7 * i, 260, i % 2 == 0), _operand(rng, 260, 200 + 5 * i, i % 2 == 1)) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda ab: kernels.matmul(*ab), pairs))
    for (a, b), c in zip(pairs, results):
        _assert_matmul_close(c, a, b)


def _child_matmul(seed):
    """A product big enough (300 x 280 x 290: 49 MFLOP) to run on two threads of the pool."""
    rng = np.random.default_rng(seed)
    a, b = _operand(rng, 300, 280, False), _operand(rng, 280, 290, True)
    return float(np.abs(kernels.matmul(a, b) - a.astype(np.float64) @ b).max())


def test_the_kept_threads_serve_calls_with_any_thread_count():
    """The pool grows to the largest team asked for; smaller teams leave the other workers waiting."""
    rng = np.random.default_rng(12)
    a, b = _operand(rng, 400, 300, False), _operand(rng, 300, 350, False)
    for threads in [2, 4, 1, 3, 2, 4]:
        kernels.set_num_threads(threads)
        for _ in range(3):
            _assert_matmul_close(kernels.matmul(a, b), a, b)


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
def test_forked_children_can_use_the_kernels_after_the_parent_did():
    """A forked child has none of the parent's worker threads (fork copies only the calling thread):
    the pool notices and starts its own, instead of waiting forever for workers that are not there."""
    import multiprocessing

    kernels.set_num_threads(2)
    _child_matmul(0)  # the parent uses the kernels (and their threads) first
    with multiprocessing.get_context("fork").Pool(2) as pool:
        errors = pool.map(_child_matmul, [1, 2, 3])
    assert max(errors) < 1e-3


# ---------------------------------------------------------------------------------------------------
# configuration and the backend switch


def test_every_isa_can_be_forced_and_unknown_ones_are_refused():
    for name in ISAS:
        assert kernels.set_isa(name) == name and kernels.isa() == name
    assert kernels.set_isa(None) == ISAS[-1]
    with pytest.raises(ValueError, match="unknown instruction set"):
        kernels.set_isa("sse9")
    with pytest.raises(ValueError, match="positive int"):
        kernels.set_num_threads(0)


def test_backend_routes_float32_to_c_and_float64_to_numpy():
    """float64 (gradient checks) always takes NumPy's exact path; float32 takes C under the "c" backend."""
    backend.set_backend("c")
    rng = np.random.default_rng(9)
    a64, b64 = rng.standard_normal((5, 7)), rng.standard_normal((7, 3))
    got = backend.matmul(a64, b64)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, a64 @ b64)
    a, b = a64.astype(np.float32), b64.astype(np.float32)
    _assert_matmul_close(backend.matmul(a, b), a, b)
    backend.set_backend("numpy")
    np.testing.assert_array_equal(backend.matmul(a, b), a @ b)
    with pytest.raises(ValueError, match="unknown backend"):
        backend.set_backend("cuda")


@pytest.mark.timeout(120)
def test_whole_model_gives_the_same_loss_and_gradients_on_both_backends():
    """Transformer.loss_and_grads on "c" equals "numpy" (float32, a tiny GQA model)."""
    from llama3np.args import ModelArgs
    from llama3np.model import Transformer

    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
    model = Transformer(args, seed=0)
    rng = np.random.default_rng(10)
    tokens = rng.integers(0, 97, size=(2, 40))
    targets = rng.integers(0, 97, size=(2, 40))
    results = {}
    for name in ("numpy", "c"):
        backend.set_backend(name)
        results[name] = model.loss_and_grads(tokens, targets)
    (loss_np, g_np), (loss_c, g_c) = results["numpy"], results["c"]
    assert abs(float(loss_c) - float(loss_np)) < 1e-5 * abs(float(loss_np))
    assert set(g_c) == set(g_np) == set(model.params)
    for key in g_np:
        scale = max(1e-3, float(np.abs(g_np[key]).max()))
        np.testing.assert_allclose(g_c[key], g_np[key], rtol=1e-3, atol=1e-4 * scale, err_msg=key)


@pytest.mark.timeout(120)
def test_kv_cache_decoding_gives_the_same_logits_on_both_backends():
    """A prompt then one-token steps through the KV cache (the decode paths of matmul and attention):
    "c" and "numpy" agree, and both agree with the cache-less forward of the whole sequence."""
    from llama3np.args import ModelArgs
    from llama3np.model import Transformer

    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
    model = Transformer(args, seed=1)
    tokens = np.random.default_rng(12).integers(0, 97, size=(2, 12))
    logits = {}
    for name in ("numpy", "c"):
        backend.set_backend(name)
        cache = model.new_cache(2)
        steps = [model.forward(tokens[:, :6], 0, cache)]
        steps += [model.forward(tokens[:, t:t + 1], t, cache) for t in range(6, 12)]
        logits[name] = np.concatenate(steps, axis=1)  # (2, 12, vocab)
    whole = model.forward(tokens)  # still the "c" backend, no cache
    np.testing.assert_allclose(logits["c"], logits["numpy"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits["c"], whole, rtol=1e-4, atol=1e-5)


def _run(code, env_extra, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA3NP_")}
    env.update(PYTHONPATH=cwd, **env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(120)
def test_environment_variables_pick_isa_threads_and_backend():
    """LLAMA3NP_ISA, LLAMA3NP_NUM_THREADS and LLAMA3NP_BACKEND are honoured at import."""
    code = ("from llama3np import kernels, backend; "
            "print(kernels.isa(), kernels.get_num_threads(), backend.get_backend())")
    r = _run(code, {"LLAMA3NP_ISA": "portable", "LLAMA3NP_NUM_THREADS": "3", "LLAMA3NP_BACKEND": "numpy"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["portable", "3", "numpy"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, value", [("LLAMA3NP_BACKEND", "gpu"), ("LLAMA3NP_ISA", "avx1024"),
                                         ("LLAMA3NP_NUM_THREADS", "zero")])
def test_an_environment_value_that_cannot_be_honoured_is_one_warning_line_and_the_default(name, value):
    """No traceback at import (issue 14): one RuntimeWarning line naming the variable, then the default
    backend, instruction set and thread count; `python -m llama3np --help` still prints its usage."""
    code = ("from llama3np import kernels, backend; "
            "print(kernels.isa(), kernels.get_num_threads(), backend.get_backend())")
    default = _run(code, {})
    r = _run(code, {name: value})
    assert r.returncode == 0, r.stderr
    assert r.stdout == default.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "RuntimeWarning" in lines[0] and f"{name}={value!r} ignored" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "-m", "llama3np", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT, name: value})
    assert r.returncode == 0 and "usage" in r.stdout and "Traceback" not in r.stderr, r.stderr


def test_an_isa_this_cpu_lacks_is_a_warning_and_the_best_it_has(monkeypatch):
    """LLAMA3NP_ISA=avx512 on a CPU without AVX-512 (simulated: the CPU claims portable and avx2 only)."""
    monkeypatch.setattr(kernels, "available_isas", lambda: ["portable", "avx2"])
    monkeypatch.setenv("LLAMA3NP_ISA", "avx512")
    with pytest.warns(RuntimeWarning, match="LLAMA3NP_ISA='avx512' ignored .*cannot run"):
        kernels._apply_environment()


def test_backend_c_without_the_kernels_is_a_warning_and_numpy(monkeypatch):
    monkeypatch.setattr(kernels, "lib", None)
    monkeypatch.setenv("LLAMA3NP_BACKEND", "c")
    backend.set_backend("numpy")
    with pytest.warns(RuntimeWarning, match="LLAMA3NP_BACKEND='c' ignored .*not available"):
        backend._apply_environment()
    assert backend.get_backend() == "numpy"


FALLBACK_CHECK = """
import sys
# an editable install of the repository adds an import finder that would find ITS built extension as
# llama3np._kernels even for this copy without one: keep only the ordinary finders
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import warnings
import numpy as np
from llama3np import kernels, backend
assert not kernels.available()
assert backend.get_backend() == "numpy", backend.get_backend()
try:
    backend.set_backend("c")
except RuntimeError as e:
    assert "not available" in str(e)
else:
    raise SystemExit("set_backend('c') should fail without the kernels")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = np.ones((3, 4), np.float32)
    assert (backend.matmul(a, a.T) == 4).all()
    backend.matmul(a, a.T)
assert sum("running on NumPy" in str(x.message) for x in w) == 1, [str(x.message) for x in w]
print("fallback ok")
"""


@pytest.mark.timeout(180)
def test_without_a_c_compiler_the_build_succeeds_and_the_model_runs_on_numpy(tmp_path):
    """setup.py build_ext with CC=/bin/false exits 0 with a warning; the package then falls back to NumPy."""
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    shutil.copytree(os.path.join(ROOT, "llama3np"), tmp_path / "llama3np",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyd"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA3NP_")}
    env.update(CC="/bin/false", PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "could not build the C kernels" in r.stderr
    assert not list((tmp_path / "llama3np").glob("_kernels*"))
    r = _run(FALLBACK_CHECK, {}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fallback ok" in r.stdout


@pytest.mark.timeout(60)
def test_disabling_the_kernels_falls_back_to_numpy():
    """LLAMA3NP_DISABLE_KERNELS=1 behaves as an install without a compiler."""
    r = _run(FALLBACK_CHECK, {"LLAMA3NP_DISABLE_KERNELS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
