"""The decode path of the C matmul: a few rows of x times a transposed weight (x @ w.T, w (N, K)).

A KV-cache decode step multiplies ONE row per sequence by every weight matrix, so sgemm sends M <= 16
rows with B stored transposed to its GEMV micro-kernels (csrc/gemm.c, `dot_rows_*`), which read eight
rows of w at once, far apart in a chunk of rows for 1-3 rows of x (eight memory streams) and side by
side for more, each row's sum with a masked (AVX-512) or scalar tail.

What must hold:
- the product equals float64 NumPy within the float32 dot-product bound, on every instruction set,
  for K on both sides of the 8 / 16 / 32 / 64-float steps of the kernels (the tails) and any N;
- a row's result does not depend on the other rows of x (a decode step gives the same bits as the
  same token inside a small batch) nor on the number of threads (bitwise: training resumes rely on it).

Tolerance: |C - A@B| <= (K + 2) * 2**-24 * (|A| @ |B|), the float32 bound (see test_kernels.py).
"""
import numpy as np
import pytest
from hypothesis import given
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
