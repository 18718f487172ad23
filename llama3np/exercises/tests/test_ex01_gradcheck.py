"""ex01: numerical_grad, central differences one entry at a time."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np.exercises.testing import assert_close, load_fixture

FX = load_fixture("ex01")


def _grad():
    from llama3np.gradcheck import numerical_grad
    return numerical_grad


def test_matches_the_reference_on_the_fixture():
    """numerical_grad of sum(sin(x) * w * x) equals the reference's central differences (h = 1e-5)."""
    x, w = FX["x"].copy(), FX["w"]
    g = _grad()(lambda: float(np.sum(np.sin(x) * w * x)), x)
    assert_close(g, FX["grad"], "numerical gradient", rtol=1e-8)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_agrees_with_the_analytic_gradient(n, m, seed):
    """For f(x) = sum(w * x^3) the differences match 3 w x^2 to 1e-6 (relative), for any shape."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((n, m)), rng.standard_normal((n, m))
    g = _grad()(lambda: float(np.sum(w * x ** 3)), x)
    assert_close(g, 3 * w * x ** 2, "numerical gradient vs 3 w x^2", rtol=1e-6, atol=1e-8)


def test_puts_x_back_and_honours_indices():
    """x is unchanged afterwards, and with `indices` only those entries are computed (the others stay 0)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(6)
    before = x.copy()
    g = _grad()(lambda: float(np.sum(x ** 2)), x, indices=[1, 4])
    assert np.array_equal(x, before), "x was left perturbed: restore each entry after its two evaluations"
    expected = np.zeros(6)
    expected[[1, 4]] = 2 * x[[1, 4]]
    assert_close(g, expected, "gradient at indices 1 and 4 (others 0)", rtol=1e-8)
