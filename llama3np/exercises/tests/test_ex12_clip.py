"""ex12: clip_grad_norm, one global norm and one factor for every gradient."""
import math

import numpy as np

from llama3np.exercises.testing import assert_close, load_fixture
from llama3np.optim import clip_grad_norm

FX = load_fixture("ex12")


def _case(name):
    grads = {"a": FX[f"{name}.a"].copy(), "b": FX[f"{name}.b"].copy()}
    norm = clip_grad_norm(grads, float(FX[f"{name}.max_norm"]))
    assert_close(norm, FX[f"{name}.norm"], f"{name}: the returned norm (before clipping)")
    assert_close(grads["a"], FX[f"{name}.a_out"], f"{name}: grads['a'] after clipping")
    assert_close(grads["b"], FX[f"{name}.b_out"], f"{name}: grads['b'] after clipping")


def test_gradients_above_max_norm_are_scaled_in_place():
    """With max_norm 1 both arrays are scaled by one factor, in place; the norm before is returned."""
    _case("clipped")


def test_gradients_below_max_norm_are_untouched():
    """With max_norm 100 nothing changes, and the norm is still returned."""
    _case("kept")


def test_a_non_finite_norm_leaves_the_gradients_alone():
    """An inf in a gradient gives norm inf and no scaling (the caller skips the step)."""
    grads = {"a": np.array([1.0, np.inf]), "b": np.array([3.0])}
    norm = clip_grad_norm(grads, 1.0)
    assert math.isinf(norm), f"norm {norm}, expected inf"
    assert grads["b"][0] == 3.0, "a non-finite norm must not scale the gradients"
