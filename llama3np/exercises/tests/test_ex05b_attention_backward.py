"""ex05b: attention_backward -> (dq, dk, dv), with grouped-query heads summed into their kv head."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, check_gradient, load_fixture, numeric_grad

from ._attention import attention_definition

FX = load_fixture("ex05b")


def _case(name):
    g = {k: FX[f"{name}.{k}"] for k in ("q", "k", "v", "out", "lse", "dout")}
    dq, dk, dv = ops.attention_backward(g["dout"], g["q"], g["k"], g["v"], g["out"], g["lse"])
    assert_close(dq, FX[f"{name}.dq"], f"{name}: dq")
    assert_close(dk, FX[f"{name}.dk"], f"{name}: dk")
    assert_close(dv, FX[f"{name}.dv"], f"{name}: dv")


def test_multi_head_matches_the_reference():
    """H = KV = 2: dq, dk, dv equal the reference."""
    _case("mha")


def test_grouped_query_gradients_sum_over_the_group():
    """H = 4, KV = 2: dk and dv of a kv head are the sums over its 2 query heads (equal the reference)."""
    _case("gqa")


def test_multi_query_attention():
    """H = 3 query heads, one kv head: dk, dv sum over all three (equal the reference)."""
    _case("mqa")


def test_queries_at_the_end_of_a_longer_key_sequence():
    """T = 2 queries at positions 3, 4 of S = 5 keys: equal the reference."""
    _case("decode")


@given(st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_gradients_match_finite_differences(heads, T, seed):
    """dq, dk, dv match central differences of sum(attention(q, k, v) * dout) (the forward from its definition)."""
    H, KV = heads
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((1, H, T, 4)), rng.standard_normal((1, KV, T, 4)), rng.standard_normal((1, KV, T, 4))
    dout = rng.standard_normal((1, H, T, 4))
    out = attention_definition(q, k, v)
    # lse from the definition too (the student's forward is ex05a)
    s = np.einsum("bhtd,bhsd->bhts", q, np.repeat(k, H // KV, axis=1)) / 2.0
    s = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, s)
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse)
    f = lambda q_, k_, v_: float(np.sum(attention_definition(q_, k_, v_) * dout))  # noqa: E731
    check_gradient("dq", dq, numeric_grad(lambda x: f(x, k, v), q), exercise="ex05b")
    check_gradient("dk", dk, numeric_grad(lambda x: f(q, x, v), k), exercise="ex05b")
    check_gradient("dv", dv, numeric_grad(lambda x: f(q, k, x), v), exercise="ex05b")
