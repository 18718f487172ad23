"""ex15: top-p (nucleus) sampling in sample_next."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np.exercises.testing import load_fixture
from llama3np.generation import sample_next

FX = load_fixture("ex15")
CASES = FX.meta["config"]["cases"]


def test_a_seed_gives_the_reference_tokens():
    """For five (temperature, top_p) settings and 20 seeds each, the drawn tokens equal the reference's."""
    for i, (temperature, top_p) in enumerate(CASES):
        got = np.stack([sample_next(FX["logits"], temperature, top_p, None, np.random.default_rng(100 + s))
                        for s in range(20)])
        bad = np.argwhere(got != FX[f"case{i}"])
        assert not len(bad), (f"temperature {temperature}, top_p {top_p}: seed {100 + bad[0][0]}, row {bad[0][1]} "
                              f"drew {got[tuple(bad[0])]}, the reference {FX[f'case{i}'][tuple(bad[0])]} "
                              "(one rng.random() per row, inverse CDF over the kept tokens)")


@given(st.floats(0.05, 0.99), st.integers(0, 2**31 - 1))
def test_only_tokens_of_the_nucleus_are_drawn(top_p, seed):
    """Every drawn token is among the smallest set of likeliest tokens whose probability reaches top_p."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((3, 30)) * 3
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for s in range(5):
        ids = sample_next(logits, 1.0, top_p, None, np.random.default_rng(s))
        for b, t in enumerate(ids):
            order = np.argsort(-probs[b], kind="stable")
            before = np.cumsum(probs[b][order]) - probs[b][order]
            nucleus = set(order[before <= top_p + 1e-12].tolist())
            assert int(t) in nucleus, f"row {b}: token {t} is outside the top-{top_p:.2f} nucleus {sorted(nucleus)}"
