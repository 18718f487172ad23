"""ex09: block_backward, the block's forward read in reverse.

Every op backward the block calls is replayed from the reference (same inputs -> the reference's outputs),
so this grades the block's wiring alone: the order, the residual sums, the transposes, the weight
gradients. An op called with an input the reference never passes fails the test naming that op.
"""
import numpy as np
import pytest

from llama3np import model
from llama3np.exercises.testing import assert_close, load_fixture, replay

from ._block import BACKWARD_OPS, block_cache

FX = load_fixture("ex09")
WEIGHTS = [k[len("grad."):] for k in FX if k.startswith("grad.")]


@pytest.fixture
def run(monkeypatch):
    replay(monkeypatch, FX, "sub", BACKWARD_OPS)
    grads = {}
    dx = model.block_backward(0, FX["dout"].copy(), block_cache(FX), grads)
    return dx, grads


def test_dx_matches_the_reference(run):
    """The gradient flowing into the block, dx (2, 5, 16), equals the reference (both residual paths)."""
    assert_close(run[0], FX["dx"], "dx", rtol=1e-10)


def test_every_weight_gradient_matches_the_reference(run):
    """All nine weight gradients (wq, wk, wv, wo, w1, w2, w3, both norms) are in grads and equal the reference."""
    grads = run[1]
    missing = [k for k in WEIGHTS if k not in grads]
    assert not missing, f"grads lacks {missing}"
    for k in WEIGHTS:
        assert_close(grads[k], FX[f"grad.{k}"], f"grads[{k!r}]", rtol=1e-10)


def test_gradients_add_to_what_is_already_in_grads(monkeypatch):
    """With grads already holding a gradient (a second micro-batch), block_backward adds to it."""
    replay(monkeypatch, FX, "sub", BACKWARD_OPS)
    grads = {k: np.ones_like(FX[f"grad.{k}"]) for k in WEIGHTS}
    model.block_backward(0, FX["dout"].copy(), block_cache(FX), grads)
    for k in WEIGHTS:
        assert_close(grads[k], FX[f"grad.{k}"] + 1.0, f"grads[{k!r}] after accumulating", rtol=1e-10)
