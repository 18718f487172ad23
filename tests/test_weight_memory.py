"""The weights of a model live side by side in one private memory map (model._weights_in_one_block).

It is there for speed only (a decode step streams every weight once: one sequential block on 2 MB
pages reads ~1.6x faster than one array per weight), so what must hold is that nothing else changes:
- every weight is its own C-contiguous, aligned, writeable array, not a view of another array, and
  no two weights overlap;
- a model made for a loader starts at zero; a random one holds exactly the weights drawn as before;
- the numbers a model computes do not depend on where its weights live (bitwise, against copies);
- the map is private: a forked child that writes to its weights leaves the parent's unchanged.
"""
import itertools
import multiprocessing
import sys

import numpy as np
import pytest

from llama3np.args import preset
from llama3np.model import Transformer, param_shapes


def test_each_weight_is_its_own_contiguous_writeable_array_and_none_overlap():
    """Separate arrays (base not an ndarray), C-contiguous, 64-byte aligned, writeable, disjoint."""
    params = Transformer(preset("tiny", n_layers=2), seed=0).params
    spans = []
    for name, w in params.items():
        assert w.shape == param_shapes(preset("tiny", n_layers=2))[name]
        assert w.flags.c_contiguous and w.flags.writeable and w.ctypes.data % 64 == 0, name
        assert not isinstance(w.base, np.ndarray), f"{name} is a view of another array"
        spans.append((w.ctypes.data, w.ctypes.data + w.nbytes))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), "two weights overlap"


def test_a_model_for_a_loader_starts_at_zero_and_a_random_one_draws_the_same_weights_as_before():
    """init=False gives zeros; init=True gives exactly (standard_normal * std).astype(dtype), norms 1."""
    args = preset("tiny", n_layers=2)
    assert all(not w.any() for w in Transformer(args, init=False).params.values())
    for dtype in (np.float32, np.float64):
        params = Transformer(args, seed=3, dtype=dtype).params
        rng = np.random.default_rng(3)
        for name, shape in param_shapes(args).items():
            if len(shape) == 1:
                expected = np.ones(shape, dtype)
            else:
                std = 0.02 / np.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                expected = (rng.standard_normal(shape) * std).astype(dtype)
            assert params[name].dtype == dtype and np.array_equal(params[name], expected), name


def test_logits_do_not_depend_on_where_the_weights_live():
    """The same weights as separate copies give bitwise the same logits, with and without a KV cache."""
    model = Transformer(preset("tiny", n_layers=2), seed=1)
    copied = Transformer(preset("tiny", n_layers=2), seed=1)
    copied.params = {k: np.array(v) for k, v in copied.params.items()}
    tokens = np.arange(12)[None] % model.args.vocab_size
    assert np.array_equal(model.forward(tokens), copied.forward(tokens))
    caches = model.new_cache(1, 16), copied.new_cache(1, 16)
    a = model.forward(tokens, 0, caches[0])
    b = copied.forward(tokens, 0, caches[1])
    assert np.array_equal(a, b)
    nxt = np.array([[7]])
    assert np.array_equal(model.forward(nxt, 12, caches[0]), copied.forward(nxt, 12, caches[1]))


def _zero_the_weights(model, queue):
    for w in model.params.values():
        w[...] = 0
    queue.put(float(sum(np.abs(w).sum() for w in model.params.values())))


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
@pytest.mark.timeout(60)
def test_a_forked_child_writing_its_weights_leaves_the_parents_unchanged():
    """The map is private (copy-on-write after fork), not shared between processes."""
    model = Transformer(preset("tiny", n_layers=1), seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_zero_the_weights, args=(model, queue))
    child.start()
    assert queue.get(timeout=30) == 0.0  # the child did zero its copy
    child.join(30)
    assert child.exitcode == 0
    assert all(np.array_equal(model.params[k], before[k]) for k in before)
