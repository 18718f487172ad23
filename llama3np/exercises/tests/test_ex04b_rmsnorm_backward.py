"""ex04b: rmsnorm_backward -> (dx, dweight)."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, check_gradient, load_fixture, numeric_grad

FX = load_fixture("ex04b")


def _cache(x, w, eps):  # built here, so the test never runs the student's rmsnorm_forward (ex04a)
    rstd = (np.mean(x ** 2, axis=-1, keepdims=True) + eps) ** -0.5
    return x * rstd, rstd, w


def _y(x, w, eps):
    return x * (np.mean(x ** 2, axis=-1, keepdims=True) + eps) ** -0.5 * w


def test_matches_the_reference_fixture():
    """dx and dweight for x (2, 3, 8) equal the reference."""
    dx, dw = ops.rmsnorm_backward(FX["dout"], (FX["xhat"], FX["rstd"], FX["weight"]))
    assert_close(dx, FX["dx"], "dx")
    assert_close(dw, FX["dweight"], "dweight")


@given(st.integers(2, 6), st.floats(1e-6, 1e-1), st.integers(0, 2**31 - 1))
def test_gradients_match_finite_differences(C, eps, seed):
    """dx and dweight match central differences of sum(rmsnorm(x) * dout), for any width and eps."""
    rng = np.random.default_rng(seed)
    x, w, dout = rng.standard_normal((2, 2, C)), rng.standard_normal(C), rng.standard_normal((2, 2, C))
    dx, dw = ops.rmsnorm_backward(dout, _cache(x, w, eps))
    check_gradient("dx", dx, numeric_grad(lambda x_: float(np.sum(_y(x_, w, eps) * dout)), x), exercise="ex04b")
    check_gradient("dweight", dw, numeric_grad(lambda w_: float(np.sum(_y(x, w_, eps) * dout)), w),
                   exercise="ex04b")


def test_a_gradient_along_x_is_removed():
    """RMSNorm is scale invariant (eps -> 0): a dout that only scales y gives dx orthogonal to x."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((1, 4, 6)), np.ones(6)
    xhat, rstd, _ = _cache(x, w, 1e-12)
    dx, _ = ops.rmsnorm_backward(xhat.copy(), (xhat, rstd, w))
    assert_close(np.sum(dx * x, axis=-1), np.zeros((1, 4)), "dx . x per row", atol=1e-9)
