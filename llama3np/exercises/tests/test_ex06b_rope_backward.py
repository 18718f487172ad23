"""ex06b: rope_backward, the rotation by the negative angle."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, check_gradient, load_fixture, numeric_grad

FX = load_fixture("ex06b")


def _rotate(x, cos, sin):
    """The grader's own RoPE: pairs as complex numbers times e^{i angle}."""
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * (cos + 1j * sin)[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


@pytest.fixture(autouse=True)
def own_rope_forward(monkeypatch):
    """rope_backward may call rope_forward (ex06a): it gets the grader's own, so ex06b stands alone."""
    monkeypatch.setattr(ops, "rope_forward", lambda x, cos, sin: (_rotate(x, cos, sin), (cos, sin)))


def test_matches_the_reference_fixture():
    """The gradient for x (2, 5, 3, 8), theta 500000 equals the reference."""
    assert_close(ops.rope_backward(FX["dout"], (FX["cos"], FX["sin"])), FX["dx"], "dx")


@given(st.integers(1, 4), st.integers(0, 9), st.integers(0, 2**31 - 1))
def test_gradient_matches_finite_differences(T, start, seed):
    """dx matches central differences of sum(rope(x) * dout), at any start position."""
    rng = np.random.default_rng(seed)
    x, dout = rng.standard_normal((1, T, 2, 4)), rng.standard_normal((1, T, 2, 4))
    cos, sin = ops.rope_cos_sin(1.0 / (100.0 ** (np.arange(0, 4, 2) / 4)), start, T, np.float64)
    num = numeric_grad(lambda x_: float(np.sum(_rotate(x_, cos, sin) * dout)), x)
    check_gradient("dx", ops.rope_backward(dout, (cos, sin)), num, exercise="ex06b")
