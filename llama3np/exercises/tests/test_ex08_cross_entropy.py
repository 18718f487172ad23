"""ex08: cross_entropy_backward, softmax minus one-hot, averaged over the unmasked positions."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, check_gradient, load_fixture, numeric_grad

FX = load_fixture("ex08")


def _loss(logits, targets, mask):
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    w = np.ones_like(nll) if mask is None else mask.astype(float)
    return float((nll * w).sum() / w.sum())


def test_matches_the_reference_fixture():
    """dlogits (dloss 0.7) without a mask equals the reference."""
    _, cache = ops.cross_entropy_forward(FX["logits"], FX["targets"])
    assert_close(ops.cross_entropy_backward(0.7, cache), FX["plain.dlogits"], "dlogits")


def test_masked_positions_get_no_gradient():
    """With a mask the mean is over unmasked positions only and masked rows are 0 (equals the reference)."""
    _, cache = ops.cross_entropy_forward(FX["logits"], FX["targets"], FX["mask"])
    d = ops.cross_entropy_backward(0.7, cache)
    assert_close(d, FX["masked.dlogits"], "dlogits with a mask")


@given(st.integers(2, 6), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_gradient_matches_finite_differences(V, T, masked, seed):
    """dlogits matches central differences of the mean negative log-likelihood."""
    rng = np.random.default_rng(seed)
    logits, targets = rng.standard_normal((2, T, V)) * 3, rng.integers(0, V, (2, T))
    mask = None
    if masked:
        mask = rng.random((2, T)) < 0.6
        mask[0, 0] = True
    _, cache = ops.cross_entropy_forward(logits, targets, mask)
    num = numeric_grad(lambda l_: _loss(l_, targets, mask), logits)
    check_gradient("dlogits", ops.cross_entropy_backward(1.0, cache), num, exercise="ex08")
