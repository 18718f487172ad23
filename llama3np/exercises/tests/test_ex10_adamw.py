"""ex10: AdamW.step, decoupled weight decay and bias-corrected moments, in place."""
import numpy as np

from llama3np.exercises.testing import assert_close, load_fixture
from llama3np.optim import AdamW

FX = load_fixture("ex10")


def _run(steps):
    params = {"w": FX["w0"].copy(), "g": FX["g0"].copy()}
    opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t in range(steps):
        opt.step({"w": FX[f"grad{t}.w"], "g": FX[f"grad{t}.g"]}, lr=float(FX[f"lr{t}"]))
    return params, opt


def test_first_step_matches_the_reference():
    """After one step the matrix (decayed) and the vector (not decayed) equal the reference."""
    params, _ = _run(1)
    assert_close(params["w"], FX["after0.w"], "w after step 1")
    assert_close(params["g"], FX["after0.g"], "1-D weight after step 1 (no weight decay on norms)")


def test_three_steps_with_a_changed_lr_match_the_reference():
    """Three steps (the last with lr 5e-3) give the reference's weights and moments m, v."""
    params, opt = _run(3)
    assert_close(params["w"], FX["after2.w"], "w after step 3")
    assert_close(params["g"], FX["after2.g"], "1-D weight after step 3")
    assert_close(opt.m["w"], FX["m2.w"], "first moment m")
    assert_close(opt.v["w"], FX["v2.w"], "second moment v")
    assert opt.t == 3, f"opt.t is {opt.t} after 3 steps"


def test_the_first_step_moves_each_weight_by_about_lr():
    """Bias correction: without decay, step 1 changes every weight by lr * sign(g) (|m_hat / sqrt(v_hat)| = 1)."""
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((4, 5))}
    before = p["w"].copy()
    g = rng.standard_normal((4, 5))
    AdamW(p, lr=0.01, eps=1e-12, weight_decay=0.0).step({"w": g})
    assert_close(before - p["w"], 0.01 * np.sign(g), "first update", rtol=1e-8)
