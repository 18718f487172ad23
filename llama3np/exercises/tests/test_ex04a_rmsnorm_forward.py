"""ex04a: rmsnorm_forward, y = x / sqrt(mean(x^2) + eps) * weight over the last axis."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, load_fixture

FX = load_fixture("ex04a")


def test_output_matches_the_reference_fixture():
    """y for x (2, 3, 8) with eps 1e-5 equals the reference."""
    y, _ = ops.rmsnorm_forward(FX["x"], FX["weight"], 1e-5)
    assert_close(y, FX["y"], "y")


def test_cache_holds_xhat_and_rstd():
    """The cache is (xhat, rstd (..., 1), weight), what rmsnorm_backward unpacks."""
    _, cache = ops.rmsnorm_forward(FX["x"], FX["weight"], 1e-5)
    assert isinstance(cache, tuple) and len(cache) == 3, "return (y, (xhat, rstd, weight))"
    assert_close(cache[0], FX["xhat"], "cache xhat")
    assert_close(cache[1], FX["rstd"], "cache rstd (keepdims: shape (B, T, 1))")


@given(st.integers(1, 8), st.floats(1e-6, 1e-2), st.integers(0, 2**31 - 1))
def test_eps_is_inside_the_square_root(C, eps, seed):
    """For tiny x the output follows x / sqrt(mean(x^2) + eps) exactly: eps inside the root, last axis."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, C)) * 1e-3
    w = rng.standard_normal(C)
    y, _ = ops.rmsnorm_forward(x, w, eps)
    assert_close(y, x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * w, "y for small x",
                 rtol=1e-12, atol=1e-15)
