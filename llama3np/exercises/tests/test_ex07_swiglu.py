"""ex07: swiglu_forward and swiglu_backward, silu(a) * b."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, check_gradient, load_fixture, numeric_grad

FX = load_fixture("ex07")


def _gate(a, b):
    return a / (1.0 + np.exp(-a)) * b


def test_forward_matches_the_reference_fixture():
    """silu(a) * b for a (2, 3, 6) equals the reference."""
    y, _ = ops.swiglu_forward(FX["a"], FX["b"])
    assert_close(y, FX["y"], "y")


def test_backward_matches_the_reference_fixture():
    """da, db from the forward's cache equal the reference."""
    da, db = ops.swiglu_backward(FX["dout"], ops.swiglu_forward(FX["a"], FX["b"])[1])
    assert_close(da, FX["da"], "da")
    assert_close(db, FX["db"], "db")


@given(st.integers(1, 6), st.floats(0.1, 5), st.integers(0, 2**31 - 1))
def test_gradients_match_finite_differences(n, scale, seed):
    """da and db match central differences of sum(silu(a) b dout), small and large pre-activations."""
    rng = np.random.default_rng(seed)
    a, b, dout = rng.standard_normal((2, n)) * scale, rng.standard_normal((2, n)), rng.standard_normal((2, n))
    y, cache = ops.swiglu_forward(a, b)
    assert_close(y, _gate(a, b), "y", rtol=1e-12)
    da, db = ops.swiglu_backward(dout, cache)
    check_gradient("da", da, numeric_grad(lambda a_: float(np.sum(_gate(a_, b) * dout)), a), exercise="ex07")
    check_gradient("db", db, numeric_grad(lambda b_: float(np.sum(_gate(a, b_) * dout)), b), exercise="ex07")
