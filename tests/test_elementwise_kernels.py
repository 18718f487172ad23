"""The fused elementwise kernels (csrc/elementwise.c) against the NumPy ops they replace.

What must hold:
- RMSNorm, SwiGLU, RoPE and cross-entropy forward and backward agree with llama3np.ops computed in
  float64, for awkward sizes (rows not a multiple of the 16 vector lanes, vocabularies of 1 to 1000);
- RoPE (either direction), SwiGLU's backward and the AdamW update give NumPy's float32 bits exactly:
  the same float operations in the same order, and no multiply-add fusion;
- every result is the same bits at 1, 2 and 3 threads and on every instruction set, and a slice of a
  row gets the bits of the whole row (tensor-parallel ranks and ZeRO shards hold slices);
- through llama3np.backend a C forward and a NumPy backward fit together (the caches are the same);
- bad input is a TypeError / ValueError in Python, never a call into C with it.

Tolerances against float64: each kernel rounds a handful of float32 operations per value (relative
error a few times 2**-24 ~ 6e-8), plus a polynomial exp (relative error ~1e-7) and, for sums over a
row of C values, up to C * 2**-24 of the sum of magnitudes. rtol 1e-5 with an atol scaled to the
values covers that with room; a wrong term (a missing 1/C, a sign) is off by orders of magnitude.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import backend, kernels, ops
from llama3np.optim import AdamW

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason=f"C kernels not built ({kernels.import_error}): run `pip install -e .` or `python csrc/build_kernels.py`",
)

ISAS = kernels.available_isas() if kernels.available() else ["portable"]


def _f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


def _close(got, want, rtol=1e-5, atol=1e-6, what=""):
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol, err_msg=what)


# ---------------------------------------------------------------------------------------------------
# against the float64 reference


@settings(max_examples=20)
@given(rows=st.integers(1, 40), C=st.integers(1, 70), isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))
def test_rmsnorm_forward_and_backward_equal_the_float64_reference(rows, C, isa, seed):
    kernels.set_isa(isa)
    rng = np.random.default_rng(seed)
    x, w, dout = _f32(rng, (rows, C), 3.0), _f32(rng, C), _f32(rng, (rows, C))
    y, xhat, rstd = kernels.rmsnorm_forward(x, w, 1e-5)
    y64, (xhat64, rstd64, _) = ops.rmsnorm_forward(*_f64(x, w), 1e-5)
    _close(y, y64, what="y")
    _close(xhat, xhat64, what="xhat")
    _close(rstd, rstd64, what="rstd")
    dx, dw = kernels.rmsnorm_backward(dout, xhat, rstd, w)
    dx64, dw64 = ops.rmsnorm_backward(dout.astype(np.float64), (xhat64, rstd64, w.astype(np.float64)))
    # dx is a difference of terms of size rstd * |dout * w| that may cancel (C = 1: exactly)
    _close(dx, dx64, atol=1e-6 * rstd64.max() * np.abs(dout * w).max(), what="dx")
    _close(dw, dw64, atol=1e-5 * rows, what="dweight (a sum over the rows)")


@settings(max_examples=20)
@given(n=st.integers(1, 300), scale=st.sampled_from([0.1, 3.0, 40.0]), isa=st.sampled_from(ISAS),
       seed=st.integers(0, 2**31))
def test_swiglu_forward_and_backward_equal_the_float64_reference(n, scale, isa, seed):
    """scale 40 puts a far in both tails of the sigmoid (exp(-|a|) underflows; sig is 0 or 1)."""
    kernels.set_isa(isa)
    rng = np.random.default_rng(seed)
    a, b, dout = _f32(rng, (n,), scale), _f32(rng, (n,)), _f32(rng, (n,))
    out, sig, silu = kernels.swiglu_forward(a, b)
    out64, (_, _, sig64, silu64) = ops.swiglu_forward(*_f64(a, b))
    _close(sig, sig64, rtol=1e-6, atol=1e-30, what="sigmoid (relative, also for tiny values)")
    _close(silu, silu64, atol=1e-6, what="silu")
    _close(out, out64, atol=1e-6 * np.abs(b).max(), what="out")
    da, db = kernels.swiglu_backward(dout, a, b, sig, silu)
    da64, db64 = ops.swiglu_backward(dout.astype(np.float64), (*_f64(a, b), sig64, silu64))
    _close(da, da64, atol=1e-5, what="da")
    _close(db, db64, atol=1e-5, what="db")
    # without sig and silu stored (the model's C path) the backward recomputes them: the same bits
    lean, none, _ = kernels.swiglu_forward(a, b, store=False)
    assert none is None and np.array_equal(lean, out)
    for got, want in zip(kernels.swiglu_backward(dout, a, b), (da, db)):
        assert np.array_equal(got, want)


@settings(max_examples=20)
@given(rows=st.integers(1, 12), V=st.integers(1, 1000), spread=st.sampled_from([1.0, 30.0]),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))
def test_cross_entropy_rows_backward_and_fused_equal_the_float64_reference(rows, V, spread, isa, seed):
    kernels.set_isa(isa)
    rng = np.random.default_rng(seed)
    logits, targets = _f32(rng, (rows, V), spread), rng.integers(0, V, rows)
    nll, lse = kernels.cross_entropy_rows(logits, targets)
    nll64, lse64 = ops.token_nll(logits.astype(np.float64), targets)
    atol = 1e-6 * max(1.0, np.abs(logits).max())  # lse and nll are sums of O(|logits|) terms
    _close(lse, lse64, atol=atol, what="lse")
    _close(nll, nll64, atol=atol, what="nll")
    scale = (rng.random(rows) / rows).astype(np.float32)
    d = kernels.cross_entropy_backward(logits, targets, lse, scale)
    # the backward given its inputs: p from the kernel's own float32 lse (whose error, checked above, p would
    # carry: 1e-7 in lse is 1e-7 in p ~ 1), so what is left is a few roundings of p (or p - 1) in [-1, 1], times
    # the row's scale: within 2 float32 epsilons of it (measured over 9000 random cases: at most 0.70)
    p64 = np.exp(logits.astype(np.float64) - lse.astype(np.float64)[:, None])
    p64[np.arange(rows), targets] -= 1
    err, bound = np.abs(d.astype(np.float64) - p64 * scale[:, None]), 2 * np.finfo(np.float32).eps * scale[:, None]
    assert np.all(err <= bound), f"dlogits: error {err.max():.3g}, bound {bound.min():.3g}"
    # the fused pass (both in one, dlogits written over the logits): the very bits of the two calls
    over = logits.copy()
    nll_f, lse_f = kernels.cross_entropy_fused(over, targets, scale)
    assert np.array_equal(nll_f, nll) and np.array_equal(lse_f, lse) and np.array_equal(over, d)


@settings(max_examples=20)
@given(shape=st.sampled_from([(1,), (7,), (3, 5), (2, 4, 3)]), C=st.integers(1, 70), V=st.integers(1, 9),
       isa=st.sampled_from(ISAS), threads=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_the_embedding_backward_gives_add_ats_bits(shape, C, V, isa, threads, seed):
    """A scatter-add in the tokens' order: a token seen several times (V small: most are) sums its rows as
    np.add.at sums them, at any thread count (threads split the columns)."""
    kernels.set_isa(isa)
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    dout, tokens = _f32(rng, shape + (C,), 3.0), rng.integers(0, V, shape)
    got = kernels.embedding_backward(dout, tokens, V)
    assert got.shape == (V, C) and np.array_equal(got, ops.embedding_backward(dout, (tokens, (V, C))))
    assert np.array_equal(backend.embedding_backward(dout, (tokens, (V, C))), got)


def test_rope_and_swiglu_backward_and_adamw_give_numpys_bits_exactly():
    """The same float32 operations in ops.py's order: not close, equal."""
    rng = np.random.default_rng(0)
    x = _f32(rng, (2, 5, 3, 10))
    cos, sin = ops.rope_cos_sin(ops.rope_frequencies(_Args()), 4, 5, np.float32)
    assert np.array_equal(kernels.rope_forward(x, cos, sin), ops.rope_forward(x, cos, sin)[0])
    # the model's backward passes a transposed view of a (B, n, T, hd) gradient: read in place
    g = _f32(rng, (2, 3, 5, 10)).transpose(0, 2, 1, 3)
    got = kernels.rope_forward(g, cos, sin, inverse=True)
    assert got.flags.c_contiguous and np.array_equal(got, ops.rope_backward(g, (cos, sin)))
    a, b, dout = _f32(rng, 1000, 5.0), _f32(rng, 1000), _f32(rng, 1000)
    _, cache = ops.swiglu_forward(a, b)
    for got, want in zip(kernels.swiglu_backward(dout, *cache), ops.swiglu_backward(dout, cache)):
        assert np.array_equal(got, want)


class _Args:  # what rope_frequencies reads
    head_dim, rope_theta, use_scaled_rope = 10, 500000.0, False


def _adamw_pair(params, lrs, rng, weight_decay=0.1):
    """Run the C and the NumPy AdamW side by side on copies of params; return both optimizers."""
    runs = {}
    grads = [{k: _f32(rng, p.shape) for k, p in params.items()} for _ in lrs]
    for name in ("c", "numpy"):
        backend.set_backend(name)
        p = {k: v.copy() for k, v in params.items()}
        opt = AdamW(p, lr=1e-3, weight_decay=weight_decay)
        for g, lr in zip(grads, lrs):
            opt.step(g, lr=lr)
        runs[name] = opt
    return runs["c"], runs["numpy"]


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_adamw_in_c_gives_the_bits_of_the_numpy_update(weight_decay):
    rng = np.random.default_rng(1)
    params = {"w": _f32(rng, (37, 29)), "norm": _f32(rng, 29), "big": _f32(rng, (300, 257))}
    c, ref = _adamw_pair(params, [3e-3, 1e-2, 5e-4], rng, weight_decay)
    assert c.t == ref.t == 3
    for k in params:
        for got, want, what in ((c.params[k], ref.params[k], "weights"), (c.m[k], ref.m[k], "m"), (c.v[k], ref.v[k], "v")):
            assert np.array_equal(got, want), f"{what} of {k!r} differ"


def test_adamw_falls_back_to_numpy_for_float64_and_non_contiguous_arrays():
    rng = np.random.default_rng(2)
    for params in ({"w": rng.standard_normal((4, 6))},  # float64: the gradient-check dtype
                   {"w": _f32(rng, (6, 4)).T}):  # a transposed view
        c, ref = _adamw_pair(params, [1e-2], rng)
        assert np.array_equal(c.params["w"], ref.params["w"])


# ---------------------------------------------------------------------------------------------------
# the same bits at any thread count, on any instruction set, for any slice


def _all_kernels(seed):
    """Every kernel on inputs big enough that 3 threads each get a share (elementwise.c's parallel_for
    gives a thread at least 64K floats of work); returns the list of outputs."""
    rng = np.random.default_rng(seed)
    x, w, dout = _f32(rng, (257, 300)), _f32(rng, 300), _f32(rng, (257, 300))
    y, xhat, rstd = kernels.rmsnorm_forward(x, w, 1e-5)
    a, b = _f32(rng, 70001, 4.0), _f32(rng, 70001)
    out, sig, silu = kernels.swiglu_forward(a, b)
    cos, sin = _f32(rng, (64, 32)), _f32(rng, (64, 32))
    logits, targets = _f32(rng, (101, 3001), 5.0), rng.integers(0, 3001, 101)
    nll, lse = kernels.cross_entropy_rows(logits, targets)
    over = logits.copy()
    fused = kernels.cross_entropy_fused(over, targets, nll)
    demb = kernels.embedding_backward(_f32(rng, (3, 999, 80)), rng.integers(0, 50, (3, 999)), 50)
    p, m, v = _f32(rng, 200003), _f32(rng, 200003), np.abs(_f32(rng, 200003))
    kernels.adamw_update(p, a[:1].repeat(200003), m, v, 0.999, 0.9, 0.95, 0.3, 1e-8, 1e-3)
    return [y, xhat, rstd, *kernels.rmsnorm_backward(dout, xhat, rstd, w), out, sig, silu,
            *kernels.swiglu_backward(b, a, b, sig, silu), kernels.swiglu_forward(a, b, store=False)[0],
            *kernels.swiglu_backward(b, a, b), kernels.rope_forward(_f32(rng, (4, 64, 9, 64)), cos, sin),
            nll, lse, kernels.cross_entropy_backward(logits, targets, lse, nll), *fused, over, demb, p, m, v]


def test_every_kernel_gives_the_same_bits_at_1_2_and_3_threads_and_on_every_isa():
    reference = None
    for isa in ISAS:
        kernels.set_isa(isa)
        for threads in (1, 2, 3):
            kernels.set_num_threads(threads)
            got = _all_kernels(seed=5)
            if reference is None:
                reference = got
                continue
            for i, (g, r) in enumerate(zip(got, reference)):
                assert np.array_equal(g, r), f"output {i} differs on {isa} with {threads} threads"


@settings(max_examples=15)
@given(n=st.integers(2, 200), start=st.integers(1, 40), isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))
def test_a_slice_gets_the_bits_of_the_whole(n, start, isa, seed):
    """Vector body and scalar tail compute alike: where an array starts never changes a value."""
    kernels.set_isa(isa)
    rng = np.random.default_rng(seed)
    a, b = _f32(rng, n + start, 4.0), _f32(rng, n + start)
    whole = kernels.swiglu_forward(a, b)
    part = kernels.swiglu_forward(a[start:], b[start:])
    for w_, p_ in zip(whole, part):
        assert np.array_equal(w_[start:], p_)
    # AdamW on a ZeRO shard: a piece of a parameter updated alone
    p, g, m, v = _f32(rng, n + start), _f32(rng, n + start), _f32(rng, n + start), np.abs(_f32(rng, n + start))
    pieces = [x[start:].copy() for x in (p, g, m, v)]
    kernels.adamw_update(p, g, m, v, 0.99, 0.9, 0.95, 0.5, 1e-8, 1e-2)
    kernels.adamw_update(*pieces, 0.99, 0.9, 0.95, 0.5, 1e-8, 1e-2)
    for w_, p_ in zip((p, g, m, v), pieces):
        assert np.array_equal(w_[start:], p_)


# ---------------------------------------------------------------------------------------------------
# the backend routes


def test_backend_caches_fit_either_backward():
    """A forward on C and the backward on NumPy (or the reverse) give the same gradients as C alone:
    the caches hold the same things."""
    rng = np.random.default_rng(3)
    x, w, dout = _f32(rng, (2, 5, 48)), _f32(rng, 48), _f32(rng, (2, 5, 48))
    backend.set_backend("c")
    y, cache = backend.rmsnorm_forward(x, w, 1e-5)
    c_grads = backend.rmsnorm_backward(dout, cache)
    np_grads = ops.rmsnorm_backward(dout, cache)
    for g, r in zip(c_grads, np_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    a, b = _f32(rng, (2, 5, 64)), _f32(rng, (2, 5, 64))
    _, cache = ops.swiglu_forward(a, b)  # NumPy forward, C backward: the same bits as NumPy's backward
    for g, r in zip(backend.swiglu_backward(dout[..., :1].repeat(64, -1), cache),
                    ops.swiglu_backward(dout[..., :1].repeat(64, -1), cache)):
        assert np.array_equal(g, r)
    # C forward (its cache without sig and silu), backward on either backend, float32 or a float64 dout
    _, lean = backend.swiglu_forward(a, b)
    assert lean[2] is None and lean[3] is None
    _, sig, silu = kernels.swiglu_forward(a, b)
    d32 = dout[..., :1].repeat(64, -1)
    for name in ("c", "numpy"):
        backend.set_backend(name)
        for d in (d32, d32.astype(np.float64)):
            for g, r in zip(backend.swiglu_backward(d, lean), ops.swiglu_backward(d, (a, b, sig, silu))):
                assert g.dtype == r.dtype == d.dtype and np.array_equal(g, r)
    backend.set_backend("c")


def test_the_loss_and_its_gradient_match_the_reference_through_the_backend():
    rng = np.random.default_rng(4)
    logits, targets = _f32(rng, (2, 7, 300), 4.0), rng.integers(0, 300, (2, 7))
    mask = rng.random((2, 7)) < 0.6
    mask[0, 0] = True
    backend.set_backend("c")
    loss, cache = backend.cross_entropy_forward(logits, targets, mask)
    loss64, cache64 = ops.cross_entropy_forward(logits.astype(np.float64), targets, mask)
    assert abs(loss - loss64) <= 1e-5 * abs(loss64)
    d = backend.cross_entropy_backward(0.7, cache)
    np.testing.assert_allclose(d, ops.cross_entropy_backward(0.7, cache64), rtol=1e-5, atol=1e-8)
    assert np.all(d[~mask] == 0), "masked positions get no gradient"
    # the model's loss_and_grads: both in one pass over the logits, written in place, with the very bits
    for m in (None, mask):
        loss, cache = backend.cross_entropy_forward(logits, targets, m)
        over = logits.copy()
        loss_f, d_f = backend.cross_entropy_loss_and_dlogits(over, targets, m)
        assert loss_f == loss and np.array_equal(d_f, backend.cross_entropy_backward(1.0, cache)) and d_f is over
    # float64 goes to NumPy, which leaves the logits as they were
    l64 = logits.astype(np.float64)
    loss64, d64 = backend.cross_entropy_loss_and_dlogits(l64, targets, mask)
    assert loss64 == ops.cross_entropy_forward(l64, targets, mask)[0]
    assert np.array_equal(d64, ops.cross_entropy_backward(1.0, cache64)) and np.array_equal(l64, logits)
    with pytest.raises(ValueError, match="selects no positions"):
        backend.cross_entropy_loss_and_dlogits(logits.copy(), targets, np.zeros((2, 7), bool))


def test_float64_and_non_contiguous_inputs_go_to_the_reference():
    rng = np.random.default_rng(6)
    x64 = rng.standard_normal((3, 8))
    w64 = rng.standard_normal(8)
    backend.set_backend("c")
    y, _ = backend.rmsnorm_forward(x64, w64, 1e-5)
    assert y.dtype == np.float64 and np.array_equal(y, ops.rmsnorm_forward(x64, w64, 1e-5)[0])
    a = _f32(rng, (8, 6)).T  # not C-contiguous
    out, _ = backend.swiglu_forward(a, a)
    assert np.array_equal(out, ops.swiglu_forward(a, a)[0])


# ---------------------------------------------------------------------------------------------------
# guard rails


def _read_only(x):
    x.flags.writeable = False
    return x


@pytest.mark.parametrize("call, error, match", [
    (lambda: kernels.swiglu_forward(np.ones(4), np.ones(4)), TypeError, "float32"),
    (lambda: kernels.swiglu_forward(np.ones(4, np.float32), np.ones(5, np.float32)), ValueError, "shape"),
    (lambda: kernels.swiglu_backward(*[np.ones(4, np.float32)] * 4), ValueError, "both sig and silu"),
    (lambda: kernels.swiglu_forward(np.ones((4, 4), np.float32).T, np.ones((4, 4), np.float32)), ValueError,
     "C-contiguous"),
    (lambda: kernels.rmsnorm_forward(np.ones((2, 4), np.float32), np.ones(3, np.float32), 1e-5), ValueError,
     "weight"),
    (lambda: kernels.rmsnorm_backward(*[np.ones((2, 4), np.float32)] * 2, np.ones((2, 4), np.float32),
                                      np.ones(4, np.float32)), ValueError, "rstd"),
    (lambda: kernels.rope_forward(np.ones((1, 2, 1, 3), np.float32), np.ones((2, 1), np.float32),
                                  np.ones((2, 1), np.float32)), ValueError, "even"),
    (lambda: kernels.cross_entropy_rows(np.ones((2, 5), np.float32), np.array([0, 5])), ValueError, "outside"),
    (lambda: kernels.cross_entropy_rows(np.ones((2, 5), np.float32), np.array([0.0, 1.0])), ValueError, "integers"),
    (lambda: kernels.cross_entropy_backward(np.ones((2, 5), np.float32), np.array([0, -1]), np.ones(2, np.float32),
                                            np.ones(2, np.float32)), ValueError, "outside"),
    (lambda: kernels.cross_entropy_fused(np.ones((2, 5), np.float32), np.array([0, 5]), np.ones(2, np.float32)),
     ValueError, "outside"),
    (lambda: kernels.cross_entropy_fused(np.ones((2, 5), np.float32), np.array([0, 1]), np.ones(3, np.float32)),
     ValueError, "scale"),
    (lambda: kernels.cross_entropy_fused(np.ones((2, 5), np.float32), np.array([0, 1]),
                                         np.ones(2, np.float64)), TypeError, "float32"),
    (lambda: kernels.cross_entropy_fused(_read_only(np.ones((2, 5), np.float32)), np.array([0, 1]),
                                         np.ones(2, np.float32)), ValueError, "writeable"),
    (lambda: kernels.embedding_backward(np.ones((2, 5), np.float32), np.array([0, 7]), 7), ValueError,
     "tokens hold ids outside"),
    (lambda: kernels.embedding_backward(np.ones((2, 5), np.float32), np.array([0, -1]), 7), ValueError, "outside"),
    (lambda: kernels.embedding_backward(np.ones((2, 5), np.float32), np.array([0]), 7), ValueError, "shape"),
    (lambda: kernels.embedding_backward(np.ones((2, 5), np.float32), np.array([0, 1]), 0), ValueError, "vocab_size"),
    (lambda: kernels.embedding_backward(np.ones((2, 5)), np.array([0, 1]), 3), TypeError, "float32"),
    (lambda: kernels.adamw_update(np.ones(3, np.float32), np.ones(4, np.float32), np.ones(3, np.float32),
                                  np.ones(3, np.float32), 1, 0.9, 0.95, 1, 1e-8, 1e-3), ValueError, "shape"),
])
def test_bad_input_is_a_clear_error_before_c_is_called(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_arrays_give_empty_results():
    e = np.ones((0, 4), np.float32)
    y, xhat, rstd = kernels.rmsnorm_forward(e, np.ones(4, np.float32), 1e-5)
    assert y.shape == (0, 4) and rstd.shape == (0, 1)
    assert kernels.swiglu_forward(e, e)[0].shape == (0, 4)
    nll, lse = kernels.cross_entropy_rows(np.ones((0, 3), np.float32), np.zeros(0, np.int64))
    assert nll.shape == lse.shape == (0,)
