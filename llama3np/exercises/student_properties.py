"""ex22: your own property tests for softmax, RMSNorm and RoPE.

Write hypothesis tests named test_softmax_*, test_rmsnorm_*, test_rope_*. Each takes the implementation
under test as its first argument (`softmax(x)`, `rmsnorm(x, weight, eps)`, `rope(x, start_pos, theta)`,
see llama3np/exercises/mutants.py) and asserts properties every correct implementation has.
`llama3np check ex22` runs them on the correct code (they must pass) and on a bank of buggy mutants:
your score is the fraction of mutants your tests catch.
"""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

ROWS = st.lists(st.lists(st.floats(-30, 30), min_size=2, max_size=6), min_size=2, max_size=4).filter(
    lambda rows: len({len(r) for r in rows}) == 1)


@given(ROWS)
def test_softmax_properties(softmax, rows):
    """Rows sum to 1, shifting a row changes nothing, order is kept, large logits do not overflow."""
    # BEGIN SOLUTION ex22
    x = np.array(rows)
    p = softmax(x)
    assert p.shape == x.shape
    assert np.allclose(p.sum(-1), 1.0), "every row must sum to 1 (over the last axis)"
    shift = np.arange(len(x))[:, None] * 7.0
    assert np.allclose(softmax(x + shift), p), "adding a constant to a row must not change it"
    i, j = np.unravel_index(np.argmax(x), x.shape), np.unravel_index(np.argmin(x), x.shape)
    if i[0] == j[0] and x[i] > x[j]:
        assert p[i] > p[j], "a larger logit must get a larger probability"
    big = softmax(np.array([[1000.0, 999.0], [-1000.0, -1001.0]]))
    assert np.all(np.isfinite(big)), "large logits must not overflow"
    assert np.allclose(big, [[0.7310585786, 0.2689414214]] * 2), "softmax([1000, 999]) = [e/(e+1), 1/(e+1)]"
    # END SOLUTION


@given(ROWS, st.floats(1e-6, 1e-2))
def test_rmsnorm_properties(rmsnorm, rows, eps):
    """Unit rms for weight 1, the weight multiplies, a zero row stays 0, small rows follow the formula."""
    # BEGIN SOLUTION ex22
    x = np.array(rows) + 100.0  # large values: eps is negligible
    C = x.shape[-1]
    y = rmsnorm(x, np.ones(C), eps)
    assert np.allclose(np.sqrt(np.mean(y ** 2, -1)), 1.0, rtol=1e-4), "each row's rms must be 1 (last axis)"
    w = np.arange(1, C + 1, dtype=float)
    assert np.allclose(rmsnorm(x, w, eps), y * w), "the weight multiplies each feature"
    assert np.allclose(rmsnorm(x, np.ones(C), eps)[0], rmsnorm(x[:1], np.ones(C), eps)[0]), "rows are independent"
    assert np.all(rmsnorm(np.zeros((1, C)), np.ones(C), eps) == 0), "a zero row must stay 0 (eps keeps it finite)"
    small = np.full((1, C), 1e-3)
    assert np.allclose(rmsnorm(small, np.ones(C), eps), 1e-3 / np.sqrt(1e-6 + eps)), "eps inside the square root"
    # END SOLUTION


@given(st.integers(0, 50), st.integers(0, 2**31 - 1))
def test_rope_properties(rope, start_pos, seed):
    """Position 0 is the identity, pairs are adjacent and turn counter-clockwise by pos * theta^(-2i/hd)."""
    # BEGIN SOLUTION ex22
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, 2, 8))
    assert np.allclose(rope(x, 0, 10000.0)[:, 0], x[:, 0]), "position 0 must not rotate"
    y = rope(x, start_pos, 10000.0)
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1)), "a rotation keeps norms"
    e = np.zeros((1, 1, 1, 8))
    e[..., 2] = 1.0  # the first member of pair 1, whose frequency is theta^(-2/8)
    a = (start_pos + 0) * 10000.0 ** (-2 / 8)
    want = np.zeros(8)
    want[2], want[3] = np.cos(a), np.sin(a)
    assert np.allclose(rope(e, start_pos, 10000.0)[0, 0, 0], want), "pair (2, 3) turns by pos * theta^(-2/8)"
    # END SOLUTION
