"""Every op's hand-written backward against central finite differences, in float64.

Each test draws shapes and values with hypothesis, builds the scalar L = sum(out * dout) for a random
upstream gradient dout, and compares the op's backward with dL/dinput by finite differences. Relative
error must be below 1e-6 (the differences themselves are accurate to about 1e-10 in float64).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import ops
from llama3np.args import ModelArgs
from llama3np.gradcheck import numerical_grad, rel_error

TOL = 1e-6
seeds = st.integers(0, 2**31 - 1)
small = st.integers(1, 4)


def randn(rng, *shape):
    return rng.standard_normal(shape)


def check(analytic, f, x):
    num = numerical_grad(f, x)
    if max(np.abs(analytic).max(), np.abs(num).max()) < 1e-8:
        # a gradient that is zero by construction (e.g. softmax over a single key): the relative error
        # of two round-off-sized numbers means nothing, so require both to be round-off sized
        return
    err = rel_error(analytic, num)
    assert err < TOL, f"relative error {err:.2e} >= {TOL}"


@given(seeds, small, small, st.integers(2, 8))
def test_embedding_backward_scatter_adds_repeated_tokens(seed, B, T, C):
    """A token used twice receives the sum of both positions' gradients."""
    rng = np.random.default_rng(seed)
    V = 5
    tokens = rng.integers(0, V, (B, T))
    w = randn(rng, V, C)
    dout = randn(rng, B, T, C)
    out, cache = ops.embedding_forward(tokens, w)
    np.testing.assert_array_equal(out, w[tokens])
    check(ops.embedding_backward(dout, cache), lambda: np.sum(ops.embedding_forward(tokens, w)[0] * dout), w)


# C >= 2: with one feature rmsnorm is sign(x) * w, whose gradient vanishes except within sqrt(eps) of 0
@given(seeds, small, small, st.integers(2, 16), st.floats(1e-6, 1e-2))
def test_rmsnorm_backward_matches_finite_differences(seed, B, T, C, eps):
    rng = np.random.default_rng(seed)
    x, w, dout = randn(rng, B, T, C), randn(rng, C), randn(rng, B, T, C)
    out, cache = ops.rmsnorm_forward(x, w, eps)
    dx, dw = ops.rmsnorm_backward(dout, cache)
    f = lambda: np.sum(ops.rmsnorm_forward(x, w, eps)[0] * dout)
    check(dx, f, x)
    check(dw, f, w)


@given(seeds, small, small, st.floats(1e-3, 1e3))
def test_rmsnorm_is_scale_invariant(seed, B, T, scale):
    """rmsnorm(a * x) == rmsnorm(x) for a > 0 (up to eps): only the direction of x survives."""
    rng = np.random.default_rng(seed)
    x, w = randn(rng, B, T, 8), randn(rng, 8)
    y1 = ops.rmsnorm_forward(x, w, 0.0)[0]
    y2 = ops.rmsnorm_forward(scale * x, w, 0.0)[0]
    np.testing.assert_allclose(y1, y2, rtol=1e-10, atol=1e-12)


@given(seeds, small, small, st.integers(1, 9), st.integers(1, 9))
def test_linear_backward_matches_finite_differences(seed, B, T, n_in, n_out):
    rng = np.random.default_rng(seed)
    x, w, dout = randn(rng, B, T, n_in), randn(rng, n_out, n_in), randn(rng, B, T, n_out)
    out, cache = ops.linear_forward(x, w)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-12)
    dx, dw = ops.linear_backward(dout, cache)
    f = lambda: np.sum(ops.linear_forward(x, w)[0] * dout)
    check(dx, f, x)
    check(dw, f, w)


@given(seeds, small, small, small, st.sampled_from([2, 4, 8]), st.integers(0, 50), st.booleans())
def test_rope_backward_matches_finite_differences(seed, B, T, n, hd, start, scaled):
    rng = np.random.default_rng(seed)
    args = ModelArgs(dim=hd, n_heads=1, use_scaled_rope=scaled, rope_theta=10.0, rope_original_max_seq_len=16)
    cos, sin = ops.rope_cos_sin(ops.rope_frequencies(args), start, T, np.float64)
    x, dout = randn(rng, B, T, n, hd), randn(rng, B, T, n, hd)
    out, cache = ops.rope_forward(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    check(ops.rope_backward(dout, cache), lambda: np.sum(ops.rope_forward(x, cos, sin)[0] * dout), x)


@given(seeds, st.sampled_from([4, 8, 16]), st.integers(0, 300), st.integers(0, 300), st.integers(0, 1000))
def test_rope_scores_depend_only_on_relative_position(seed, hd, m, n, shift):
    """<rope(q, m), rope(k, n)> == <rope(q, m + s), rope(k, n + s)>: attention sees m - n only."""
    rng = np.random.default_rng(seed)
    args = ModelArgs(dim=hd, n_heads=1, use_scaled_rope=True)
    freqs = ops.rope_frequencies(args)
    q, k = randn(rng, 1, 1, 1, hd), randn(rng, 1, 1, 1, hd)

    def score(pq, pk):
        rq = ops.rope_forward(q, *ops.rope_cos_sin(freqs, pq, 1, np.float64))[0]
        rk = ops.rope_forward(k, *ops.rope_cos_sin(freqs, pk, 1, np.float64))[0]
        return float(np.sum(rq * rk))

    np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), rtol=1e-9, atol=1e-9)


def test_rope_scaling_matches_llama31_rule():
    """Llama 3.1's scaling: short wavelengths kept, long ones divided by the factor, a blend between."""
    args = ModelArgs(dim=4096, n_heads=32, use_scaled_rope=True, rope_scale_factor=8.0)
    plain = ops.rope_frequencies(ModelArgs(dim=4096, n_heads=32))
    scaled = ops.rope_frequencies(args)
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-15)
    mid = ~high & ~low
    s = (8192 / wavelen[mid] - 1) / (4 - 1)
    np.testing.assert_allclose(scaled[mid], (1 - s) * plain[mid] / 8 + s * plain[mid], rtol=1e-15)
    # monotone: scaling never raises a frequency, and keeps the order of frequencies
    assert np.all(scaled <= plain) and np.all(np.diff(scaled) < 0)


def attention_naive(q, k, v, kv_start=None):
    """Attention written the slow, obvious way: loops over heads, Meta's repeat_kv, explicit mask."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kv = h // (H // KV)
            s = q[b, h] @ k[b, kv].T / np.sqrt(hd)  # (T, S)
            for i in range(T):
                s[i, S - T + i + 1:] = -np.inf
                if kv_start is not None:  # keys before the query's start are hidden, never the query itself
                    s[i, :min(kv_start[b, i], S - T + i)] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = (p / p.sum(-1, keepdims=True)) @ v[b, kv]
    return out


gqa = st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 3)).map(lambda t: (t[0] * t[1], t[1]))  # (H, KV)


@given(seeds, st.integers(1, 2), gqa, st.integers(1, 5), st.integers(0, 4), st.sampled_from([2, 4, 8]))
def test_attention_forward_matches_naive_loops(seed, B, heads, T, extra, hd):
    """GQA with ratios 1/2/4, n_kv_heads=1 included, and S > T (queries at the last T positions)."""
    H, KV = heads
    S = T + extra
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, B, H, T, hd), randn(rng, B, KV, S, hd), randn(rng, B, KV, S, hd)
    out, lse = ops.attention_forward(q, k, v)
    np.testing.assert_allclose(out, attention_naive(q, k, v), rtol=1e-10, atol=1e-12)
    assert lse.shape == (B, H, T)


@given(seeds, st.integers(1, 2), gqa, st.integers(1, 4), st.integers(0, 3), st.sampled_from([2, 4]))
def test_attention_backward_matches_finite_differences(seed, B, heads, T, extra, hd):
    H, KV = heads
    S = T + extra
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, B, H, T, hd), randn(rng, B, KV, S, hd), randn(rng, B, KV, S, hd)
    dout = randn(rng, B, H, T, hd)
    out, lse = ops.attention_forward(q, k, v)
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse)
    f = lambda: np.sum(ops.attention_forward(q, k, v)[0] * dout)
    check(dq, f, q)
    check(dk, f, k)
    check(dv, f, v)


def random_kv_start(rng, B, T, S):
    """Document starts (non-decreasing per row, like packed documents) over the S keys, some past the query."""
    return np.sort(rng.integers(0, S, (B, T)), axis=1)


@given(seeds, st.integers(1, 2), gqa, st.integers(1, 5), st.integers(0, 4), st.sampled_from([2, 4]))
def test_attention_with_kv_start_matches_naive_loops_and_finite_differences(seed, B, heads, T, extra, hd):
    """Document masks / left padding: query i sees keys kv_start..its own position (itself always)."""
    H, KV = heads
    S = T + extra
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, B, H, T, hd), randn(rng, B, KV, S, hd), randn(rng, B, KV, S, hd)
    kv_start = random_kv_start(rng, B, T, S)
    out, lse = ops.attention_forward(q, k, v, True, kv_start)
    np.testing.assert_allclose(out, attention_naive(q, k, v, kv_start), rtol=1e-10, atol=1e-12)
    dout = randn(rng, B, H, T, hd)
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse, True, kv_start)
    f = lambda: np.sum(ops.attention_forward(q, k, v, True, kv_start)[0] * dout)
    check(dq, f, q)
    check(dk, f, k)
    check(dv, f, v)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_kv_start_from_doc_ids_is_where_each_document_begins(lengths):
    doc_ids = np.repeat(np.arange(len(lengths)) % 2, lengths)[None]  # ids may repeat: runs count
    starts = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)[None]
    np.testing.assert_array_equal(ops.kv_start_from_doc_ids(doc_ids), starts)


def test_kv_start_of_the_wrong_shape_or_range_is_a_clear_error():
    q, k = np.zeros((1, 2, 3, 4)), np.zeros((1, 1, 3, 4))
    with pytest.raises(ValueError, match="kv_start must be"):
        ops.attention_forward(q, k, k, True, np.zeros((1, 2), int))
    with pytest.raises(ValueError, match="outside"):
        ops.attention_forward(q, k, k, True, np.array([[0, 0, 3]]))


@given(seeds, gqa, st.integers(2, 6))
def test_gqa_equals_multihead_with_repeated_kv_heads(seed, heads, T):
    """GQA == plain multi-head attention whose kv heads are repeated (Meta's repeat_kv)."""
    H, KV = heads
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, 1, H, T, 4), randn(rng, 1, KV, T, 4), randn(rng, 1, KV, T, 4)
    rep = H // KV
    out_gqa = ops.attention_forward(q, k, v)[0]
    out_mha = ops.attention_forward(q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1))[0]
    np.testing.assert_allclose(out_gqa, out_mha, rtol=1e-12, atol=1e-14)


@given(seeds, small, small, st.integers(1, 8))
def test_swiglu_backward_matches_finite_differences(seed, B, T, n):
    rng = np.random.default_rng(seed)
    a, b, dout = 3 * randn(rng, B, T, n), randn(rng, B, T, n), randn(rng, B, T, n)
    out, cache = ops.swiglu_forward(a, b)
    np.testing.assert_allclose(out, a / (1 + np.exp(-a)) * b, rtol=1e-12)
    da, db = ops.swiglu_backward(dout, cache)
    f = lambda: np.sum(ops.swiglu_forward(a, b)[0] * dout)
    check(da, f, a)
    check(db, f, b)


@given(seeds, small, small, st.integers(2, 12), st.booleans())
def test_cross_entropy_backward_matches_finite_differences(seed, B, T, V, masked):
    rng = np.random.default_rng(seed)
    logits, targets = randn(rng, B, T, V), rng.integers(0, V, (B, T))
    mask = None
    if masked:
        mask = rng.random((B, T)) < 0.6
        mask.flat[0] = True  # at least one position counts
    loss, cache = ops.cross_entropy_forward(logits, targets, mask)
    check(ops.cross_entropy_backward(1.0, cache),
          lambda: ops.cross_entropy_forward(logits, targets, mask)[0], logits)


def test_cross_entropy_of_uniform_logits_is_log_vocab():
    loss, _ = ops.cross_entropy_forward(np.zeros((2, 3, 7)), np.zeros((2, 3), dtype=int))
    assert abs(loss - np.log(7)) < 1e-12


def test_cross_entropy_rejects_an_all_false_mask():
    import pytest

    with pytest.raises(ValueError, match="no positions"):
        ops.cross_entropy_forward(np.zeros((1, 2, 3)), np.zeros((1, 2), dtype=int), np.zeros((1, 2), bool))


@settings(max_examples=10)
@given(seeds)
def test_attention_is_stable_for_huge_scores(seed):
    """Subtracting the row max keeps softmax finite even when q.k is in the thousands."""
    rng = np.random.default_rng(seed)
    q, k, v = 1e3 * randn(rng, 1, 2, 4, 4), 1e3 * randn(rng, 1, 2, 4, 4), randn(rng, 1, 2, 4, 4)
    out, lse = ops.attention_forward(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
