"""The decode path of the C matmul: a few rows of x times a transposed weight (x @ w.T, w (N, K)).

A KV-cache decode step multiplies ONE row per sequence by every weight matrix, so sgemm sends M <= 16
rows with B stored transposed to its GEMV micro-kernels (csrc/gemm.c, `dot_rows_*`), which read eight
rows of w at once, far apart in a chunk of rows for 1-3 rows of x (eight memory streams) and side by
side for more, each row's sum with a masked (AVX-512) or scalar tail.

What must hold:
- the product equals float64 NumPy within the float32 dot-product bound, on every instruction set,
  for K on both sides of the 8 / 16 / 32 / 64-float steps of the kernels (the tails) and any N;
- a row's result does not depend on the other rows of x (a decode step gives the same bits as the
  same token inside a small batch) nor on the number of threads (bitwise: training resumes rely on it);
- kernels.block_decode, a whole block for one new token in one call (csrc/decode.c), gives bitwise the
  output and cache of the block run op by op, and the model's decode steps the logits of block_forward.

Tolerance: |C - A@B| <= (K + 2) * 2**-24 * (|A| @ |B|), the float32 bound (see test_kernels.py).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"C kernels not built ({kernels.import_error})")

ISAS = kernels.available_isas() if kernels.available() else ["portable"]
# every tail of the kernels: below, at and above 8, 16, 32 and 64 floats, and a model-sized row
K_VALUES = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 512, 777]


def _x_wt(seed, M, N, K):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)  # (out, in), as the model stores its weights
    return x, w


@given(M=st.integers(1, 16), N=st.sampled_from([1, 3, 4, 5, 130, 257]), K=st.sampled_from(K_VALUES),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_decode_product_equals_float64_numpy_on_every_isa_for_every_tail(M, N, K, isa, seed):
    """x @ w.T for 1..16 rows is within the float32 bound of the float64 product, whatever K % 64."""
    kernels.set_isa(isa)
    x, w = _x_wt(seed, M, N, K)
    c = kernels.matmul(x, w.T)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    bound = (K + 2) * 2.0**-24 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    err = np.abs(c.astype(np.float64) - x64 @ w64.T)
    assert c.dtype == np.float32 and c.shape == (M, N)
    assert np.all(err <= bound), f"max error {err.max():.3g} exceeds the float32 bound"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("N", [7, 8, 300, 1000])
def test_one_token_gives_the_same_bits_alone_as_inside_a_small_batch(isa, N):
    """Row i of (x @ w.T) for a batch of rows is bitwise the product of row i alone (alone, the rows of w
    are read eight far-apart ones at a time; in a batch of 9, side by side: the grouping changes nothing)."""
    kernels.set_isa(isa)
    x, w = _x_wt(1, 9, N, 515)
    batch = kernels.matmul(x, w.T)
    for i in range(len(x)):
        assert np.array_equal(kernels.matmul(x[i:i + 1], w.T)[0], batch[i])


@pytest.mark.parametrize("M", [1, 8])
def test_decode_product_has_the_same_bits_on_one_and_two_threads(M):
    """The thread count changes who computes a row of w.T, never how: same bits (M = 8, 16 MFLOP, uses two)."""
    x, w = _x_wt(2, M, 1000, 1000)
    kernels.set_num_threads(1)
    one = kernels.matmul(x, w.T)
    kernels.set_num_threads(2)
    assert np.array_equal(kernels.matmul(x, w.T), one)


def test_decode_product_reads_a_strided_x_and_a_sliced_weight_in_place():
    """x a row of a wider array (lda > K) and w.T a column slice of a bigger weight: same as the copies."""
    rng = np.random.default_rng(3)
    big_x = rng.standard_normal((4, 600)).astype(np.float32)
    big_w = rng.standard_normal((70, 600)).astype(np.float32)
    x, w = big_x[:, :513], big_w[3:67, :513]  # rows 600 floats apart
    assert np.array_equal(kernels.matmul(x, w.T), kernels.matmul(np.ascontiguousarray(x), np.ascontiguousarray(w).T))


@pytest.mark.parametrize("shape", [(1, 1, 512), (2, 3, 100), (1, 0, 64), (0, 64), (5, 17)])
def test_the_models_linear_short_path_gives_matmuls_bits(shape):
    """backend.linear_forward sends dense float32 x and weight to kernels.linear_dense (fewer checks, for a
    decode step's ~60 calls): the same bits and shape as matmul(x2, weight.T), empty inputs included."""
    from llama3np import backend

    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((300, shape[-1])).astype(np.float32)
    y, cache = backend.linear_forward(x, w)
    want = kernels.matmul(x.reshape(-1, shape[-1]), w.T).reshape(shape[:-1] + (300,))
    assert y.shape == want.shape and y.dtype == np.float32 and np.array_equal(y, want)
    assert cache[0] is x and cache[1] is w


# ----------------------------------------------------------------------------------------------------
# kernels.block_decode: a whole block for one new token in one C call (csrc/decode.c)


def _block(seed, B, dim, H, KV, hd, hidden, L, pos, in_one_block):
    """Random float32 weights of one block (model.LAYER_PARAM_NAMES order: wq, wk, wv, wo, w1, w2, w3,
    the norms), side by side in one array (wq wk wv back to back, as in model.params' block: decode.c
    stacks them into one product) or each its own; x (B, 1, dim); caches (B + 1, KV, L, hd) with random
    earlier positions; cos, sin of position pos."""
    from llama3np.model import _weights_in_one_block

    rng = np.random.default_rng(seed)
    shapes = {"wq": (H * hd, dim), "wk": (KV * hd, dim), "wv": (KV * hd, dim), "wo": (dim, H * hd),
              "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim), "an": (dim,), "fn": (dim,)}
    layer = (_weights_in_one_block(shapes, np.dtype(np.float32)) if in_one_block else
             {k: np.empty(s, np.float32) for k, s in shapes.items()})
    for w in layer.values():
        w[...] = rng.standard_normal(w.shape) * (1.0 if w.ndim == 1 else dim**-0.5)
    x = rng.standard_normal((B, 1, dim)).astype(np.float32)
    caches = [rng.standard_normal((B + 1, KV, L, hd)).astype(np.float32) for _ in range(2)]
    angles = pos * 10000.0 ** (-np.arange(hd // 2) / (hd // 2))
    cos, sin = np.cos(angles)[None].astype(np.float32), np.sin(angles)[None].astype(np.float32)
    return list(layer.values()), x, caches, (cos, sin)


def _block_op_by_op(layer, x, cache_k, cache_v, pos, cos, sin, eps, H, kv_start):
    """The block of model.block_forward with a KV cache, each op the kernels.* call the C backend makes for
    it (written with kernels.* so that it also runs on the portable micro-kernel, where the backend sends
    products to NumPy)."""
    wq, wk, wv, wo, w1, w2, w3, an, fn = layer
    B, _, dim = x.shape
    KV, hd = cache_k.shape[1], cache_k.shape[3]

    def linear(a, w):  # backend.linear_forward's call (matmul(a, w.T) may read a (n, 1) w.T as untransposed)
        return kernels.linear_dense(np.ascontiguousarray(a), w)

    xn = kernels.rmsnorm_forward(x, an, eps)[0]
    xq, xk, xv = linear(xn, wq), linear(xn, wk), linear(xn, wv)
    q = kernels.rope_forward(xq.reshape(B, 1, H, hd), cos, sin).transpose(0, 2, 1, 3)  # (B, H, 1, hd)
    k = kernels.rope_forward(xk.reshape(B, 1, KV, hd), cos, sin).transpose(0, 2, 1, 3)  # (B, KV, 1, hd)
    cache_k[:B, :, pos:pos + 1] = k
    cache_v[:B, :, pos:pos + 1] = xv.reshape(B, 1, KV, hd).transpose(0, 2, 1, 3)
    att, _ = kernels.attention_forward(q, cache_k[:B, :, :pos + 1], cache_v[:B, :, :pos + 1], True, kv_start)
    h = x + linear(att.transpose(0, 2, 1, 3).reshape(B, 1, H * hd), wo)
    hn = kernels.rmsnorm_forward(h, fn, eps)[0]
    gate = kernels.swiglu_forward(linear(hn, w1), linear(hn, w3))[0]
    return h + linear(gate, w2)


@settings(max_examples=20)
@given(B=st.integers(1, 5), heads=st.sampled_from([(1, 1), (4, 2), (6, 3), (8, 2)]), hd=st.sampled_from([2, 8, 64]),
       dim=st.sampled_from([8, 17, 64]), hidden=st.sampled_from([1, 24, 100]), pos=st.integers(0, 9),
       masked=st.booleans(), in_one_block=st.booleans(), isa=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_block_decode_gives_the_bits_of_the_block_op_by_op(B, heads, hd, dim, hidden, pos, masked, in_one_block,
                                                           isa, seed):
    """One new token through a whole block in one call: bitwise the output and the caches of the same block
    run op by op (every micro-kernel, 1-5 sequences, with and without left padding, the weights in one
    block, where decode.c stacks wq wk wv into one product, or apart); earlier positions are untouched."""
    kernels.set_isa(isa)
    H, KV = heads
    layer, x, (ck, cv), (cos, sin) = _block(seed, B, dim, H, KV, hd, hidden, 10, pos, in_one_block)
    kv_start = np.random.default_rng(seed).integers(0, pos + 1, size=(B, 1)) if masked else None
    want_k, want_v = ck.copy(), cv.copy()
    want = _block_op_by_op(layer, x, want_k, want_v, pos, cos, sin, 1e-5, H, kv_start)
    out = kernels.block_decode(x, layer, ck, cv, pos, cos, sin, 1e-5, H, kv_start)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.array_equal(out, want)
    assert np.array_equal(ck, want_k) and np.array_equal(cv, want_v)


def test_block_decode_has_the_same_bits_on_one_and_two_threads():
    """A `small`-sized block (wq wk wv 1.5 MB: its product uses two threads when there are two)."""
    layer, x, caches, rope = _block(5, 1, 512, 8, 2, 64, 1536, 12, 11, True)
    outs = []
    for n in (1, 2):
        kernels.set_num_threads(n)
        ck, cv = caches[0].copy(), caches[1].copy()
        outs.append((kernels.block_decode(x, layer, ck, cv, 11, *rope, 1e-5, 8), ck, cv))
    assert all(np.array_equal(a, b) for a, b in zip(*outs))


def test_a_decode_step_of_the_model_gives_the_bits_of_block_forward(monkeypatch):
    """Transformer.forward with one new token sends its blocks, final norm and LM head to backend.decode_blocks
    (one C call) on the C backend: the logits and caches of 6 greedy steps are bitwise those of block_forward
    op by op (and the norm and head from Python), also after
    a weight is replaced by a new array (the checked plan no longer holds and is made again), and the NumPy
    backend (where decode_blocks declines) still decodes."""
    from llama3np import backend
    from llama3np.args import preset
    from llama3np.model import Transformer

    model = Transformer(preset("tiny", n_layers=3), seed=0)  # 3: C passes the activations through both scratch rows

    def decode(steps=6):
        cache = model.new_cache(1, 16)
        logits = [model.forward(np.array([[3, 1, 4, 1]]), 0, cache)]
        for i in range(steps):
            logits.append(model.forward(np.array([[int(logits[-1][0, -1].argmax())]]), 4 + i, cache))
        return logits, cache

    def fused_and_op_by_op():
        fused, fused_cache = decode()
        with monkeypatch.context() as m:
            m.setattr(backend, "decode_blocks", lambda *a, **k: None)  # every block op by op
            ref, ref_cache = decode()
        assert all(np.array_equal(a, b) for a, b in zip(fused, ref))
        assert all(np.array_equal(a, b) for a, b in zip(fused_cache.cache_k + fused_cache.cache_v,
                                                         ref_cache.cache_k + ref_cache.cache_v))
        return fused

    before = fused_and_op_by_op()
    name = "layers.2.feed_forward.w2.weight"
    model.params[name] = model.params[name] * 3  # a new array: decoding must follow it
    fused = fused_and_op_by_op()
    assert not np.array_equal(fused[-1], before[-1])
    backend.set_backend("numpy")
    numpy_logits, _ = decode()
    assert np.allclose(numpy_logits[-1], fused[-1], atol=1e-4)


def test_the_decode_step_with_the_head_gives_the_logits_of_the_norm_and_head_after_it():
    """decode_blocks(..., head=(norm, w_out)): the logits of rmsnorm_forward and linear_dense applied to the blocks'
    output, bitwise (the same kernels, called from C), the caches written alike; a head of the wrong shape or
    dtype is refused before C runs."""
    layer, x, (ck, cv), (cos, sin) = _block(5, 2, 16, 4, 2, 8, 24, 6, 3, True)
    rng = np.random.default_rng(5)
    norm, w_out = rng.random(16).astype(np.float32) + 0.5, rng.standard_normal((37, 16)).astype(np.float32)
    caches = [(ck.copy(), cv.copy()) for _ in range(2)]
    plans = [kernels.decode_plan([layer], [k], [v], 4) for k, v in caches]
    h = kernels.decode_blocks(plans[0], x, 3, cos, sin, 1e-5)
    want = kernels.linear_dense(kernels.rmsnorm_forward(h, norm, 1e-5)[0], w_out)
    got = kernels.decode_blocks(plans[1], x, 3, cos, sin, 1e-5, head=(norm, w_out))
    assert got.shape == (2, 1, 37) and np.array_equal(got, want)
    assert all(np.array_equal(a, b) for a, b in zip(caches[0], caches[1]))
    for head, error, words in [((norm[:8], w_out), ValueError, "head must be"),
                               ((norm, w_out[:, :8].copy()), ValueError, "head must be"),
                               ((norm.astype(np.float64), w_out), TypeError, "float32"),
                               ((norm, w_out.T), ValueError, "C-contiguous")]:
        with pytest.raises(error, match=words):
            kernels.decode_blocks(plans[1], x, 3, cos, sin, 1e-5, head=head)


def test_block_decode_rejects_what_it_cannot_read_before_calling_c():
    """Wrong shapes, dtypes, layouts, positions and masks are a ValueError or TypeError naming the problem."""
    layer, x, (ck, cv), (cos, sin) = _block(0, 2, 16, 4, 2, 8, 24, 6, 3, True)

    def call(**kw):
        a = dict(x=x, layer=layer, cache_k=ck, cache_v=cv, start_pos=3, cos=cos, sin=sin, eps=1e-5, n_heads=4)
        a.update(kw)
        return kernels.block_decode(**a)

    bad_wq = [np.zeros((33, 16), np.float32)] + layer[1:]
    cases = [(dict(x=x.astype(np.float64)), TypeError, "x must be float32"),
             (dict(x=np.zeros((2, 2, 16), np.float32)), ValueError, "x must have shape"),
             (dict(layer=layer[:8]), ValueError, "9 weights"),
             (dict(layer=bad_wq), ValueError, "wq has shape"),
             (dict(cache_k=ck[:, :, ::2]), ValueError, "cache_k"),
             (dict(cache_v=cv[:, :1].copy()), ValueError, "one shape"),
             (dict(cache_v=ck), ValueError, "share memory"),
             (dict(start_pos=6), ValueError, "does not fit the cache"),
             (dict(start_pos=3.0), TypeError, "start_pos must be an int"),
             (dict(n_heads=3), ValueError, "n_heads"),
             (dict(cos=cos[:, :2]), ValueError, "cos, sin"),
             (dict(kv_start=np.array([[0], [4]])), ValueError, "kv_start holds"),
             (dict(kv_start=np.zeros((2,), np.int64)), ValueError, "kv_start must be")]
    for kw, error, words in cases:
        with pytest.raises(error, match=words):
            call(**kw)
    ro = ck.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        call(cache_k=ro)
    with pytest.raises(ValueError, match="x must not share memory"):
        call(x=np.ndarray((2, 1, 16), np.float32, buffer=ck))  # x laid over the cache it would write
    with pytest.raises(ValueError, match="share memory with each other or with the weights"):
        call(cache_v=np.ndarray(cv.shape, np.float32, buffer=np.zeros(cv.size + 64, np.float32)),
             layer=layer[:7] + [np.ndarray((16,), np.float32, buffer=ck)] + layer[8:])  # a weight inside cache_k
