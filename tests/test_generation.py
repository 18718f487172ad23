"""Generation: the KV cache changes nothing, greedy is deterministic, seeded sampling reproducible."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import ModelArgs, Transformer
from llama3np.generation import generate, generate_stream, sample_next

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=48, max_seq_len=48)


@pytest.fixture(scope="module")
def model64():
    """float64 so that the cached and uncached paths agree to ~1e-15 and argmax ties cannot differ."""
    m = Transformer(ARGS, seed=3, dtype=np.float64)
    # sharper logits than the N(0, 0.02) init, so sampling is not uniform noise
    m.params["output.weight"] *= 40
    return m


PROMPT = [5, 17, 3, 88, 41]


def test_kv_cache_generation_equals_generation_without_cache(model64):
    """One forward per token with the cache == recomputing the whole sequence each time (greedy and sampled)."""
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=7), dict(temperature=0.7, top_k=5, seed=1)):
        cached = generate(model64, PROMPT, 20, **kw)
        uncached = generate(model64, PROMPT, 20, use_cache=False, **kw)
        assert cached == uncached and len(cached) == 20


def test_kv_cache_logits_match_a_full_forward(model64):
    """The logits of the last position after incremental decoding equal a full forward's (float64: 1e-10)."""
    ids = PROMPT + generate(model64, PROMPT, 10, temperature=0)
    cache = model64.new_cache(1)
    model64.forward(np.array([ids[:5]]), 0, cache)
    for pos in range(5, len(ids)):
        step_logits = model64.forward(np.array([[ids[pos]]]), pos, cache)[0, -1]
    full = model64.forward(np.array([ids]))[0, -1]
    np.testing.assert_allclose(step_logits, full, rtol=1e-10, atol=1e-10)


def test_greedy_decoding_is_deterministic_and_picks_the_argmax(model64):
    a = generate(model64, PROMPT, 15, temperature=0)
    assert a == generate(model64, PROMPT, 15, temperature=0, seed=123)
    first = model64.forward(np.array([PROMPT]))[0, -1].argmax()
    assert a[0] == first
    assert generate(model64, PROMPT, 15, temperature=0.9, top_k=1, seed=5) == a  # top-k 1 is greedy too


def test_sampling_with_a_seed_is_reproducible_and_seeds_differ(model64):
    a = generate(model64, PROMPT, 25, temperature=1.0, top_p=1.0, seed=42)
    assert a == generate(model64, PROMPT, 25, temperature=1.0, top_p=1.0, seed=42)
    assert a != generate(model64, PROMPT, 25, temperature=1.0, top_p=1.0, seed=43)


def test_streaming_yields_the_same_tokens_one_at_a_time(model64):
    stream = generate_stream(model64, PROMPT, 12, temperature=0.8, seed=9)
    assert next(stream) == generate(model64, PROMPT, 1, temperature=0.8, seed=9)[0]
    assert [*generate(model64, PROMPT, 12, temperature=0.8, seed=9, stream=True)] == \
        generate(model64, PROMPT, 12, temperature=0.8, seed=9)


def test_generation_stops_at_a_stop_token_without_returning_it(model64):
    greedy = generate(model64, PROMPT, 10, temperature=0)
    stop = greedy[3]
    cut = generate(model64, PROMPT, 10, temperature=0, stop_tokens=[stop])
    assert cut == greedy[:greedy.index(stop)]


def test_generation_stops_at_the_end_of_the_context_and_says_so(model64):
    from llama3np.generation import ContextLimitWarning

    with pytest.warns(ContextLimitWarning, match=f"only {ARGS.max_seq_len - 40} of the 100 new tokens fit"):
        out = generate(model64, list(range(1, 41)), 100, temperature=0)
    assert len(out) == ARGS.max_seq_len - 40


def test_float_token_ids_are_refused_not_truncated(model64):
    with pytest.raises(TypeError, match="must be integers"):
        generate(model64, [1.9, 2.9], 3)
    with pytest.raises(TypeError, match="must be integers"):
        generate(model64, np.array([1.0, 2.0]), 3)
    assert generate(model64, np.array([1, 2], dtype=np.int32), 3, temperature=0) == \
        generate(model64, [1, 2], 3, temperature=0)


def test_batched_prompts_are_decoded_like_single_ones(model64):
    outs = generate(model64, [PROMPT, PROMPT[:2]], 6, temperature=0)
    assert outs == [generate(model64, PROMPT, 6, temperature=0), generate(model64, PROMPT[:2], 6, temperature=0)]


def test_top_p_sampling_draws_from_the_truncated_renormalised_distribution():
    """p = (0.5, 0.3, 0.15, 0.05), top_p 0.7: only the first two survive, renormalised to 0.625 / 0.375."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = np.array([sample_next(logits, temperature=1.0, top_p=0.7, rng=rng)[0] for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.625) < 0.03  # ~4 standard errors
    # temperature 0.5 squares the odds: 0.5^2 : 0.3^2 : ... -> token 0 has 0.25/0.3650
    draws = np.array([sample_next(logits, temperature=0.5, top_p=1.0, rng=rng)[0] for _ in range(4000)])
    assert abs((draws == 0).mean() - 0.25 / 0.365) < 0.03


@settings(max_examples=25)
@given(rows=st.integers(1, 9), vocab=st.integers(1, 300), scale=st.floats(0.0, 30.0), top_p=st.floats(1.0, 3.0),
       seed=st.integers(0, 2**31 - 1))
def test_sampling_without_a_nucleus_draws_what_one_row_at_a_time_draws(rows, vocab, scale, top_p, seed):
    """top_p >= 1 draws every row at once (_draw_unsorted); it must give the tokens of the row-by-row inverse
    CDF (one rng.random() per row, in row order), on flat and on very peaked distributions alike."""
    logits = np.random.default_rng(seed).standard_normal((rows, vocab)) * scale
    got = sample_next(logits, 1.0, top_p, rng=np.random.default_rng(seed))
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    rng = np.random.default_rng(seed)
    want = []
    for p in probs:  # the exercise's loop, with every token in its own order
        cum = np.cumsum(p)
        cum = np.cumsum(np.where(cum - p > top_p, 0.0, p))
        want.append(min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), vocab - 1))
    assert got.tolist() == want


def test_the_partial_sort_finds_the_same_nucleus_as_a_full_sort():
    """Large vocabularies sort only the 1024 likeliest tokens: the nucleus must be the full sort's prefix."""
    from llama3np.generation import _likeliest_first

    rng = np.random.default_rng(0)
    for scale, top_p in ((3.0, 0.9), (8.0, 0.5), (0.1, 0.9)):  # peaked, very peaked, flat (falls back)
        z = rng.standard_normal(20000) * scale
        p = np.exp(z - z.max())
        p /= p.sum()
        full = np.argsort(-p, kind="stable")
        n = int(np.searchsorted(np.cumsum(p[full]), top_p)) + 1  # tokens in the nucleus
        assert np.array_equal(_likeliest_first(p, top_p)[:n], full[:n])


def test_bad_generation_arguments_are_explained(model64):
    with pytest.raises(ValueError, match="empty"):
        generate(model64, [], 5)
    with pytest.raises(ValueError, match="context"):
        generate(model64, list(range(48)), 5)
    with pytest.raises(ValueError, match="token ids"):
        generate(model64, [1, 500], 5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model64, PROMPT, 5, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model64, PROMPT, 5, top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model64, PROMPT, 5, top_k=0)
    with pytest.raises(ValueError, match="empty"):  # at the call, not at the first next()
        generate_stream(model64, [], 5)
