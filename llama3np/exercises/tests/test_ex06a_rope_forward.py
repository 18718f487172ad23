"""ex06a: rope_forward, Meta's interleaved pairs (x[2i], x[2i+1]) rotated by pos * freq_i."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, load_fixture

FX = load_fixture("ex06a")


def _cos_sin(start, T, hd=8, theta=10000.0):
    return ops.rope_cos_sin(1.0 / (theta ** (np.arange(0, hd, 2) / hd)), start, T, np.float64)


def test_matches_the_reference_fixture():
    """x (2, 5, 3, 8) at positions 2..6 rotates exactly as the reference (interleaved pairs)."""
    out, cache = ops.rope_forward(FX["x"], FX["cos"], FX["sin"])
    assert_close(out, FX["out"], "rotated x")


def test_pairs_are_adjacent_not_half_split():
    """Meta's convention: a vector with only x[0], x[1] set stays in entries 0 and 1 (Hugging Face's
    half-split pairing would move it to entries 0 and hd/2)."""
    x = np.zeros((1, 1, 1, 8))
    x[..., 0], x[..., 1] = 1.0, 2.0
    cos, sin = _cos_sin(3, 1)
    out, _ = ops.rope_forward(x, cos, sin)
    c, s = np.cos(3.0), np.sin(3.0)
    expected = np.zeros(8)
    expected[0], expected[1] = c - 2 * s, s + 2 * c
    assert_close(out[0, 0, 0], expected, "rotation of the first pair", atol=1e-12)


@given(st.integers(0, 20), st.integers(0, 20), st.integers(0, 2**31 - 1))
def test_scores_depend_on_the_relative_position_only(m, n, seed):
    """q rotated at m dotted with k rotated at n equals the same at m + 7, n + 7, and norms are kept."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, 1, 2, 8)), rng.standard_normal((1, 1, 2, 8))

    def at(x, p):
        cos, sin = _cos_sin(p, 1)
        return ops.rope_forward(x, cos, sin)[0]

    dot = np.sum(at(q, m) * at(k, n), -1)
    assert_close(np.sum(at(q, m + 7) * at(k, n + 7), -1), dot, "q.k shifted by 7 positions", rtol=1e-9, atol=1e-12)
    assert_close(np.linalg.norm(at(q, m), axis=-1), np.linalg.norm(q, axis=-1), "norm after rotation", rtol=1e-12)
