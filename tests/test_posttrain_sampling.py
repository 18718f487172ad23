"""Batched sampling in one KV cache with ragged, left-padded prompts (llama3np.generation.sample_batch)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llama3np
from llama3np.generation import generate, sample_batch
from llama3np.posttrain.logprobs import token_logps


def model64():
    args = llama3np.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48,
                              max_seq_len=40)
    m = llama3np.Transformer(args, seed=3, dtype=np.float64)
    for p in m.params.values():
        p *= 4  # sharper logits: greedy paths are not decided by rounding
    return m


PROMPTS = [[1, 2, 3], [7], [4, 5, 6, 7, 8, 9, 10], [11, 12]]


def test_each_row_equals_greedy_sampling_of_its_prompt_alone():
    model = model64()
    replies, _ = sample_batch(model, PROMPTS, 12, temperature=0, stop_tokens=[])
    for p, r in zip(PROMPTS, replies):
        assert r == generate(model, p, 12, temperature=0, stop_tokens=[])


@settings(max_examples=12)
@given(n=st.integers(2, 9), rows_at_once=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       setting=st.sampled_from([(1.0, 1.0), (0.8, 0.7), (0.0, 1.0)]))
def test_prompts_decoded_in_groups_give_the_replies_of_one_decode(n, rows_at_once, seed, setting):
    """More than rows_at_once prompts decode in groups, each with the generator's draws for its rows (row b's
    uniform at step i is the (i * n + b)-th): the same replies and log-probs as all n rows at once, sampled
    (top_p 1 and the nucleus loop) or greedy, stop token or not."""
    temperature, top_p = setting
    model = model64()
    prompts = [PROMPTS[b % len(PROMPTS)][: 1 + b % 3] for b in range(n)]
    kw = dict(temperature=temperature, top_p=top_p, seed=seed, stop_tokens=[7, 13])
    together = sample_batch(model, prompts, 9, rows_at_once=100, **kw)
    grouped = sample_batch(model, prompts, 9, rows_at_once=rows_at_once, **kw)
    assert grouped[0] == together[0]
    for a, b in zip(grouped[1], together[1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_logps_are_the_models_log_probs_of_the_sampled_tokens():
    model = model64()
    replies, logps = sample_batch(model, PROMPTS, 8, temperature=1.0, seed=0, stop_tokens=[])
    for p, r, lp in zip(PROMPTS, replies, logps):
        full = token_logps(model, np.array([p + r]))[0, len(p):]
        np.testing.assert_allclose(lp, full, rtol=1e-9, atol=1e-10)


def test_a_row_stops_at_its_stop_token_which_is_included():
    model = model64()
    greedy, _ = sample_batch(model, PROMPTS, 12, temperature=0, stop_tokens=[])
    stop = greedy[0][2]  # the third greedy token of row 0 becomes a stop token
    replies, logps = sample_batch(model, PROMPTS, 12, temperature=0, stop_tokens=[stop])
    assert replies[0] == greedy[0][:greedy[0].index(stop) + 1]
    assert all(len(r) == len(lp) for r, lp in zip(replies, logps))


def test_bad_prompts_and_group_sizes_are_refused():
    model = model64()
    with pytest.raises(ValueError, match="empty"):
        sample_batch(model, [[1], []], 4)
    with pytest.raises(ValueError, match="no prompts"):
        sample_batch(model, [], 4)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="rows_at_once must be a whole number >= 1"):
            sample_batch(model, PROMPTS, 4, rows_at_once=bad)
