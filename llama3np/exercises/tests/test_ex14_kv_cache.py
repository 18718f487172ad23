"""ex14: the KV-cache step of block_forward (write this step's keys and values, attend over all cached).

The ops block_forward calls are replayed from the reference, so only the cache handling is graded.
"""
import numpy as np
from llama3np import model
from llama3np.exercises.testing import assert_close, load_fixture, replay

from ._block import FORWARD_OPS, args_of

FX = load_fixture("ex14")
ARGS = args_of(FX)


def _layer():
    return {k[len("p."):]: FX[k] for k in FX if k.startswith("p.")}


def _run(monkeypatch, cache, x, start_pos, key):
    replay(monkeypatch, FX, key, FORWARD_OPS)
    rope = (FX[f"rope{int(start_pos > 0)}.cos"], FX[f"rope{int(start_pos > 0)}.sin"])
    return model.block_forward(_layer(), 0, x, rope, ARGS, None, start_pos, cache)


def _cache(step):
    cache = model.KVCache(ARGS, 2, FX.meta["config"]["max_seq_len_cache"], np.float64)
    if step == 1:
        cache.cache_k[0][:], cache.cache_v[0][:] = FX["cache_k0"], FX["cache_v0"]
    return cache


def test_prefill_writes_the_prompt_into_the_cache(monkeypatch):
    """A 3-token prefill at start_pos 0 writes positions 0..2 of the cache and gives the reference's output."""
    cache = _cache(0)
    out, kept = _run(monkeypatch, cache, FX["x0"], 0, "prefill")
    assert kept is None, "with a cache, block_forward keeps nothing for a backward (returns None)"
    assert_close(cache.cache_k[0], FX["cache_k0"], "cache_k after the prefill")
    assert_close(cache.cache_v[0], FX["cache_v0"], "cache_v after the prefill")
    assert_close(out, FX["out0"], "block output of the prefill")


def test_a_decode_step_attends_to_every_cached_position(monkeypatch):
    """One new token at start_pos 3 is written at position 3 and attends to positions 0..3 (the reference's output)."""
    cache = _cache(1)
    out, _ = _run(monkeypatch, cache, FX["x1"], 3, "decode")
    assert_close(cache.cache_k[0], FX["cache_k1"], "cache_k after the decode step")
    assert_close(cache.cache_v[0], FX["cache_v1"], "cache_v after the decode step")
    assert_close(out, FX["out1"], "block output of the decode step")
