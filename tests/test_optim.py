"""AdamW, the warmup + cosine schedule and global-norm clipping (llama3np.optim)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np.optim import AdamW, clip_grad_norm, get_lr, global_grad_norm


def test_adamw_first_two_steps_match_a_hand_computation():
    """Two AdamW steps on a 1x1 matrix and a 1-D weight, worked out by hand with the textbook formulas."""
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.95, 1e-8, 0.1
    params = {"w": np.array([[1.0]]), "norm": np.array([2.0])}
    opt = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    g1, g2 = 0.5, -0.25
    opt.step({"w": np.array([[g1]]), "norm": np.array([g1])})
    opt.step({"w": np.array([[g2]]), "norm": np.array([g2])})

    def by_hand(p, decay):
        m = v = 0.0
        for t, g in enumerate((g1, g2), start=1):
            if decay:
                p = p - lr * wd * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + eps)
        return p

    assert params["w"][0, 0] == pytest.approx(by_hand(1.0, decay=True), rel=1e-12)
    # 1-D weights (norm gains) are not decayed
    assert params["norm"][0] == pytest.approx(by_hand(2.0, decay=False), rel=1e-12)


def test_adamw_updates_the_params_arrays_in_place():
    """The optimizer changes the arrays the model holds, not copies of them."""
    w = np.ones((2, 3), np.float32)
    params = {"w": w}
    AdamW(params, lr=0.01).step({"w": np.full((2, 3), 0.3, np.float32)})
    assert params["w"] is w and not np.all(w == 1)


def test_adamw_matches_torch_adamw_over_ten_steps(torch):
    """Same gradients, same hyper-parameters: our weights track torch.optim.AdamW to float64 precision."""
    rng = np.random.default_rng(0)
    shapes = {"a.weight": (4, 3), "b.weight": (5,), "c.weight": (2, 2)}
    ours = {k: rng.standard_normal(s) for k, s in shapes.items()}
    theirs = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in ours.items()}
    decay = [theirs[k] for k in shapes if len(shapes[k]) >= 2]
    no_decay = [theirs[k] for k in shapes if len(shapes[k]) < 2]
    kw = dict(lr=0.03, betas=(0.9, 0.95), eps=1e-8)
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], **kw)
    opt = AdamW(ours, weight_decay=0.1, **kw)
    for step in range(10):
        lr = 0.03 * (0.5 + 0.05 * step)  # the lr changes every step, as under a schedule
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        for g in topt.param_groups:
            g["lr"] = lr
        for k, t in theirs.items():
            t.grad = torch.tensor(grads[k])
        topt.step()
        opt.step(grads, lr=lr)
    for k in shapes:
        np.testing.assert_allclose(ours[k], theirs[k].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adamw_state_dict_round_trip_continues_bit_for_bit():
    """Saving the state after 3 steps and loading it into a new optimizer gives the same 4th step."""
    rng = np.random.default_rng(1)
    p1 = {"w": rng.standard_normal((3, 3)).astype(np.float32), "n": np.ones(3, np.float32)}
    p2 = {k: v.copy() for k, v in p1.items()}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p1.items()} for _ in range(4)]
    a = AdamW(p1, lr=0.01)
    for g in grads:
        a.step(g)
    b = AdamW(p2, lr=0.01)
    for g in grads[:3]:
        b.step(g)
    state = b.state_dict()
    c = AdamW(p2, lr=0.5)  # different hyper-parameters are overwritten by the state
    c.load_state_dict(state)
    c.step(grads[3])
    for k in p1:
        assert np.array_equal(p1[k], p2[k])


def test_adamw_rejects_mismatched_gradients():
    opt = AdamW({"w": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="lack"):
        opt.step({})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": np.zeros(3)})
    with pytest.raises(TypeError):
        AdamW([np.zeros(2)])


def test_schedule_warms_up_linearly_then_decays_along_a_cosine_to_the_floor():
    """Warmup 10 steps to 1.0, cosine to 0.1 at the last of 110 steps; the midpoint is the mean of both."""
    assert get_lr(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert get_lr(4, 1.0, 10, 110) == pytest.approx(0.5)
    assert get_lr(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert get_lr(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert get_lr(10 + 99 // 2, 1.0, 10, 110) == pytest.approx(0.55 + 0.45 * math.cos(math.pi * 49 / 99), rel=1e-12)
    assert get_lr(109, 1.0, 10, 110) == pytest.approx(0.1)
    assert get_lr(500, 1.0, 10, 110) == pytest.approx(0.1)


@given(warmup=st.integers(1, 50), decay=st.integers(1, 400), floor=st.floats(0.0, 1.0))
def test_schedule_is_monotone_after_warmup_and_within_bounds(warmup, decay, floor):
    """Warmup rises to max_lr; after it the rate never increases and stays in [floor * max_lr, max_lr]."""
    total = warmup + decay
    lrs = [get_lr(s, 3e-3, warmup, total, floor) for s in range(total + 5)]
    rising = lrs[:warmup]
    assert all(0 < a < b for a, b in zip(rising, rising[1:])) and rising[-1] == pytest.approx(3e-3)
    after = lrs[warmup:]
    assert all(floor * 3e-3 - 1e-15 <= x <= 3e-3 + 1e-15 for x in after)
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:]))


@settings(max_examples=20)
@given(scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_clipping_bounds_the_global_norm_and_keeps_the_direction(scale, max_norm, seed):
    """After clipping the global norm is <= max_norm, and every gradient is the old one times one factor."""
    rng = np.random.default_rng(seed)
    grads = {"a": rng.standard_normal((3, 4)) * scale, "b": rng.standard_normal(5) * scale}
    before = {k: g.copy() for k, g in grads.items()}
    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(math.sqrt(sum((g ** 2).sum() for g in before.values())))
    assert global_grad_norm(grads) <= max_norm * (1 + 1e-9)
    factor = grads["a"].ravel()[0] / before["a"].ravel()[0]
    for k in grads:
        np.testing.assert_allclose(grads[k], before[k] * factor, rtol=1e-12)
    if norm <= max_norm:
        assert factor == 1.0


def test_clipping_leaves_non_finite_gradients_for_the_caller_to_skip():
    grads = {"a": np.array([1.0, np.nan])}
    assert math.isnan(clip_grad_norm(grads, 1.0))
