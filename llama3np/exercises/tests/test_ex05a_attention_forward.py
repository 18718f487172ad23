"""ex05a: attention_forward, causal softmax(q k^T / sqrt(hd)) v and the log-sum-exp of each row."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np import ops
from llama3np.exercises.testing import assert_close, load_fixture

from ._attention import attention_definition

FX = load_fixture("ex05a")


def _case(name, kv_start=False):
    args = [FX[f"{name}.q"], FX[f"{name}.k"], FX[f"{name}.v"], True] + ([FX[f"{name}.kv_start"]] if kv_start else [])
    out, lse = ops.attention_forward(*args)
    assert_close(out, FX[f"{name}.out"], f"{name}: out")
    assert_close(lse, FX[f"{name}.lse"], f"{name}: lse")


def test_multi_head_matches_the_reference():
    """H = KV = 2, T = S = 5: out and lse equal the reference."""
    _case("mha")


def test_grouped_query_heads_share_their_kv_head():
    """H = 4 query heads over KV = 2 kv heads (Llama 3's GQA): out and lse equal the reference."""
    _case("gqa")


def test_a_decode_step_sees_every_cached_key():
    """T = 1 query at the last of S = 6 positions attends to all 6 keys: equals the reference."""
    _case("decode")


def test_packed_documents_do_not_read_each_other():
    """With kv_start (documents packed in a row) out and lse equal the reference."""
    _case("docs", kv_start=True)


def test_large_scores_do_not_overflow():
    """Scores near 1000 give finite outputs: the row max is subtracted before exp."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4, 4)) * 60
    k = rng.standard_normal((1, 2, 4, 4)) * 60
    v = rng.standard_normal((1, 2, 4, 4))
    out, lse = ops.attention_forward(q, k, v)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse)), "exp overflowed: subtract each row's max first"
    assert_close(out, attention_definition(q, k, v), "out with large scores", rtol=1e-9)


@given(st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_changing_a_future_key_never_changes_the_past(heads, T, seed):
    """Causality: replacing the keys and values of the last position leaves outputs before it unchanged."""
    H, KV = heads
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((1, H, T, 4)), rng.standard_normal((1, KV, T, 4)), rng.standard_normal((1, KV, T, 4))
    out, _ = ops.attention_forward(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, -1], v2[:, :, -1] = 9.0, -9.0
    out2, _ = ops.attention_forward(q, k2, v2)
    assert_close(out2[:, :, :-1], out[:, :, :-1], "outputs before the changed position", atol=1e-12)
    assert_close(out, attention_definition(q, k, v), "out vs the definition", rtol=1e-9)
