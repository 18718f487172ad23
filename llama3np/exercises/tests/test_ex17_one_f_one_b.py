"""ex17: one_f_one_b(p, m), the 1F1B pipeline schedule as a list of actions per stage."""
import json
from fractions import Fraction

import pytest

from llama3np.exercises.testing import load_fixture
from llama3np.parallel import schedule

FX = load_fixture("ex17")
CASES = [tuple(c) for c in FX.meta["config"]["cases"]]


@pytest.mark.parametrize("p,m", CASES, ids=[f"p{p}m{m}" for p, m in CASES])
def test_actions_match_the_reference(p, m):
    """Every stage's list of actions (F, B, sends, receives, in order) equals the reference's."""
    want = [[tuple(a) for a in acts] for acts in json.loads(str(FX[f"p{p}m{m}"]))]
    got = [[tuple(a) for a in acts] for acts in schedule.one_f_one_b(p, m)]
    assert len(got) == p, f"{len(got)} stages, expected {p}"
    for s, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"stage {s} of p={p}, m={m}: first difference at action " \
                       f"{next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))}"


def test_runs_to_the_end_with_bounded_memory_and_the_textbook_bubble():
    """p=4, m=8: valid and deadlock-free; stage s holds at most p - s micro-batches; bubble (p-1)/(m+p-1)."""
    stages = schedule.one_f_one_b(4, 8)
    schedule.validate(stages, 8)
    assert schedule.peak_activations(stages) == [4, 3, 2, 1]
    assert schedule.bubble_fraction(schedule.simulate(stages)) == Fraction(3, 11)
