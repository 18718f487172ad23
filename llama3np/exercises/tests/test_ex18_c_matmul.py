"""ex18: naive_sgemm in csrc/gemm.c, called through cffi (llama3np.kernels.naive_matmul)."""
import sys
from pathlib import Path

import numpy as np
import pytest

import llama3np
from llama3np import kernels
from llama3np.exercises.testing import assert_close, load_fixture

FX = load_fixture("ex18")


def _matmul(a, b):
    if not kernels.available():
        pytest.skip("the C kernels are not built: python csrc/build_kernels.py (or pip install -e .)")
    built = Path(sys.modules["llama3np._kernels"].__file__).resolve().parent
    if built != Path(llama3np.__file__).resolve().parent:
        # an editable install of another copy can hand us its library: that is not this package's C code
        pytest.skip(f"this package's C kernels are not built (the loaded library is {built}'s): "
                    "python csrc/build_kernels.py")
    c = kernels.naive_matmul(np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32))
    if c.size and np.all(np.isnan(c)):
        raise NotImplementedError("ex18: naive_sgemm still holds the stub (it returns NaN); implement it in "
                                  "csrc/gemm.c and rebuild")
    return c


def test_matches_the_reference_product():
    """C = A B for A (5, 7), B (7, 3) float32 equals the float64 product to float32 accuracy."""
    assert_close(_matmul(FX["a"], FX["b"]), FX["c"], "C", rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 4), (17, 9, 33), (2, 64, 5)])
def test_any_shape_row_major(shape):
    """Rectangular and degenerate shapes (M, K, N): every entry is row i of A dotted with column j of B."""
    M, K, N = shape
    rng = np.random.default_rng(M * 100 + K * 10 + N)
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    assert_close(_matmul(a, b), a.astype(np.float64) @ b, f"C of shape {(M, N)}", rtol=1e-5, atol=1e-5)
