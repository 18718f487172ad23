"""ex02: embedding_backward, a scatter-add into the rows of the table."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, check_gradient, load_fixture, numeric_grad

FX = load_fixture("ex02")


def test_matches_the_reference_fixture():
    """dweight for tokens with repeated ids equals the reference (repeats accumulate)."""
    dw = ops.embedding_backward(FX["dout"], (FX["tokens"], FX["weight"].shape))
    assert_close(dw, FX["dweight"], "dweight")


def test_gradient_matches_finite_differences():
    """dweight is the gradient of sum(weight[tokens] * dout) (central differences)."""
    tokens, w, dout = FX["tokens"], FX["weight"], FX["dout"]
    num = numeric_grad(lambda w_: float(np.sum(w_[tokens] * dout)), w)
    check_gradient("dweight", ops.embedding_backward(dout, (tokens, w.shape)), num, exercise="ex02")


@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_rows_of_unused_tokens_are_zero_and_totals_are_kept(B, T, V, seed):
    """Every row of dweight is the sum of dout over that token's positions: unused rows are 0."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T))
    dout = rng.standard_normal((B, T, 3))
    dw = ops.embedding_backward(dout, (tokens, (V, 3)))
    expected = np.stack([dout[tokens == v].sum(0) for v in range(V)])
    assert_close(dw, expected, "dweight rows", rtol=1e-12, atol=1e-12)
