"""ex11: get_lr, linear warmup then cosine decay to a floor."""
import math

import numpy as np

from llama3np.exercises.testing import assert_close, load_fixture
from llama3np.optim import get_lr

FX = load_fixture("ex11")
CASES = FX.meta["config"]["cases"]


def test_every_step_matches_the_reference():
    """Four schedules (warmup 10/100, 1/20, 5/6, 0/50), every step up to 5 past the end, equal the reference."""
    for i, (max_lr, warmup, total, ratio) in enumerate(CASES):
        got = np.array([get_lr(s, max_lr, warmup, total, ratio) for s in range(total + 5)])
        assert_close(got, FX[f"case{i}"], f"lr of schedule {i} (max_lr {max_lr}, warmup {warmup}, total {total})",
                     rtol=1e-12)


def test_warmup_is_linear_and_the_end_is_the_floor():
    """Warmup gives max_lr (s+1)/warmup; the middle of the decay is halfway; the last step and after are the floor."""
    max_lr, warmup, total = 1.0, 4, 25
    assert_close([get_lr(s, max_lr, warmup, total, 0.1) for s in range(warmup)], [0.25, 0.5, 0.75, 1.0],
                 "warmup", rtol=1e-12)
    mid = warmup + (total - 1 - warmup) / 2
    assert_close(get_lr(int(mid), max_lr, warmup, total, 0.1), 0.55, "lr halfway through the decay", rtol=1e-12)
    assert_close([get_lr(s, max_lr, warmup, total, 0.1) for s in (total - 1, total, total + 10)], [0.1] * 3,
                 "the floor", rtol=1e-12)
    assert math.isclose(get_lr(warmup, max_lr, warmup, total, 0.1), max_lr), "the decay starts at max_lr"
