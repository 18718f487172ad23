"""ex03: linear_backward_input and linear_backward_weight for y = x @ W.T."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, check_gradient, load_fixture, numeric_grad

FX = load_fixture("ex03")


def test_dx_matches_the_reference_fixture():
    """dx of y = x W^T for x (2, 3, 6), W (4, 6) equals the reference."""
    assert_close(ops.linear_backward_input(FX["dout"], (FX["x"], FX["weight"])), FX["dx"], "dx")


def test_dweight_matches_the_reference_fixture():
    """dW (4, 6) summed over every leading position equals the reference."""
    assert_close(ops.linear_backward_weight(FX["dout"], (FX["x"], FX["weight"])), FX["dweight"], "dweight")


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_gradients_match_finite_differences(n_in, n_out, T, seed):
    """Both gradients match central differences of sum((x W^T) * dout), any sizes."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((2, T, n_in)), rng.standard_normal((n_out, n_in))
    dout = rng.standard_normal((2, T, n_out))
    dx = ops.linear_backward_input(dout, (x, w))
    dw = ops.linear_backward_weight(dout, (x, w))
    check_gradient("dx", dx, numeric_grad(lambda x_: float(np.sum((x_ @ w.T) * dout)), x), exercise="ex03")
    check_gradient("dweight", dw, numeric_grad(lambda w_: float(np.sum((x @ w_.T) * dout)), w), exercise="ex03")
