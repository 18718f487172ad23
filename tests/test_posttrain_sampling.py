"""Batched sampling in one KV cache with ragged, left-padded prompts (llama3np.generation.sample_batch)."""
import numpy as np
import pytest

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


def test_bad_prompts():
    model = model64()
    with pytest.raises(ValueError, match="empty"):
        sample_batch(model, [[1], []], 4)
    with pytest.raises(ValueError, match="no prompts"):
        sample_batch(model, [], 4)
