"""Every post-training loss against central finite differences (float64, relative error < 1e-6), and the
exact values the issue lists: DPO at policy = reference, PPO's first minibatch, GAE's limits, KL estimators.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from llama3np.gradcheck import numerical_grad, rel_error
from llama3np.posttrain import losses as L

TOL = 1e-6


def _check(f, analytic, x):
    num = numerical_grad(f, x)
    err = rel_error(analytic, num)
    assert err < TOL, f"relative error {err:.2e}"


def _logits_tokens_mask(rng, B=3, T=6, V=7):
    logits = rng.standard_normal((B, T, V))
    tokens = rng.integers(0, V, (B, T))
    mask = rng.random((B, T)) < 0.7
    mask[:, 1] = True
    return logits, tokens, mask


def test_sequence_logps_matches_log_softmax_and_gradcheck():
    rng = np.random.default_rng(0)
    logits, tokens, mask = _logits_tokens_mask(rng)
    logps, cache = L.sequence_logps_forward(logits, tokens, mask)
    # the definition written out: sum over t >= 1 with mask of log softmax(logits[t-1])[tokens[t]]
    ls = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [sum(ls[b, t - 1, tokens[b, t]] for t in range(1, tokens.shape[1]) if mask[b, t]) for b in range(3)]
    np.testing.assert_allclose(logps, want, rtol=1e-12)
    w = rng.standard_normal(3)
    dlogits = L.sequence_logps_backward(w, cache)
    _check(lambda: float(w @ L.sequence_logps_forward(logits, tokens, mask)[0]), dlogits, logits)
    assert np.all(dlogits[:, -1] == 0), "the last position predicts nothing"


def test_mask_position_zero_is_ignored():
    rng = np.random.default_rng(1)
    logits, tokens, mask = _logits_tokens_mask(rng)
    m0, m1 = mask.copy(), mask.copy()
    m0[:, 0], m1[:, 0] = False, True
    assert np.array_equal(L.sequence_logps_forward(logits, tokens, m0)[0], L.sequence_logps_forward(logits, tokens, m1)[0])


def test_sft_cross_entropy_gradcheck_and_prompt_gets_no_gradient():
    rng = np.random.default_rng(2)
    logits, tokens, mask = _logits_tokens_mask(rng)
    mask[:, :3] = False  # a prompt of 3 tokens
    loss, cache = L.sft_cross_entropy_forward(logits, tokens, mask)
    dlogits = L.sft_cross_entropy_backward(1.0, cache)
    _check(lambda: L.sft_cross_entropy_forward(logits, tokens, mask)[0], dlogits, logits)
    # the logits at t-1 predict token t: positions 0 and 1 predict prompt tokens 1, 2 -> no gradient
    assert np.all(dlogits[:, :2] == 0)
    seq, _ = L.sequence_logps_forward(logits, tokens, mask)
    assert math.isclose(loss, -seq.sum() / mask[:, 1:].sum(), rel_tol=1e-12)


def test_bradley_terry_gradcheck_and_value():
    rng = np.random.default_rng(3)
    rc, rr = rng.standard_normal(5), rng.standard_normal(5)
    loss, cache = L.bradley_terry_forward(rc, rr, margin=0.3)
    assert math.isclose(loss, np.mean(np.log1p(np.exp(-(rc - rr - 0.3)))), rel_tol=1e-12)
    drc, drr = L.bradley_terry_backward(1.0, cache)
    _check(lambda: L.bradley_terry_forward(rc, rr, 0.3)[0], drc, rc)
    _check(lambda: L.bradley_terry_forward(rc, rr, 0.3)[0], drr, rr)
    assert L.bradley_terry_forward(np.zeros(4), np.zeros(4))[0] == pytest.approx(math.log(2), abs=1e-15)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_gradcheck(loss_type, ls):
    rng = np.random.default_rng(4)
    pc, pr, rc, rr = (rng.standard_normal(6) * 3 for _ in range(4))
    f = lambda: L.dpo_forward(pc, pr, rc, rr, beta=0.1, label_smoothing=ls, loss_type=loss_type)[0]
    _, cache = L.dpo_forward(pc, pr, rc, rr, beta=0.1, label_smoothing=ls, loss_type=loss_type)
    dpc, dpr = L.dpo_backward(1.0, cache)
    _check(f, dpc, pc)
    _check(f, dpr, pr)


def test_dpo_at_policy_equal_reference_is_ln2_with_zero_margin_and_accuracy():
    logps_c, logps_r = np.array([-12.5, -3.0, -40.0]), np.array([-11.0, -9.0, -2.0])
    loss, cache = L.dpo_forward(logps_c, logps_r, logps_c, logps_r, beta=0.1)
    assert loss == math.log(2), "Delta = 0 -> -log sigmoid(0) = ln 2, exactly"
    m = L.dpo_metrics(logps_c, logps_r, logps_c, logps_r, 0.1)
    assert m["rewards/margins"] == 0 and m["rewards/accuracies"] == 0 and m["rewards/chosen"] == 0
    dpc, dpr = L.dpo_backward(1.0, cache)
    # dL/dDelta = -beta/2 per pair, divided by B for the batch mean
    np.testing.assert_array_equal(dpc * 3, np.full(3, -0.05))
    np.testing.assert_array_equal(dpr, -dpc)


def test_dpo_bad_arguments():
    z = np.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_forward(z, z, z, z, loss_type="hinge2")
    with pytest.raises(ValueError, match="beta"):
        L.dpo_forward(z, z, z, z, beta=0)


def _ppo_inputs(rng, B=4, T=7):
    logps = rng.standard_normal((B, T)) * 0.3 - 2
    old = logps + rng.standard_normal((B, T)) * 0.3  # ratios spread over both sides of the clip range
    adv = rng.standard_normal((B, T))
    mask = rng.random((B, T)) < 0.8
    return logps, old, adv, mask


def test_ppo_policy_loss_gradcheck():
    rng = np.random.default_rng(5)
    logps, old, adv, mask = _ppo_inputs(rng)
    loss, cache = L.ppo_policy_loss_forward(logps, old, adv, mask, 0.2)
    stats = L.ppo_policy_stats(cache)
    assert 0 < stats["policy/clipfrac_avg"] < 1, "the test should exercise both branches"
    d = L.ppo_policy_loss_backward(1.0, cache)
    _check(lambda: L.ppo_policy_loss_forward(logps, old, adv, mask, 0.2)[0], d, logps)


def test_ppo_first_minibatch_ratio_one_no_clipping_no_kl():
    rng = np.random.default_rng(6)
    logps, _, adv, mask = _ppo_inputs(rng)
    loss, cache = L.ppo_policy_loss_forward(logps, logps.copy(), adv, mask)
    s = L.ppo_policy_stats(cache)
    assert s["val/ratio"] == 1.0 and s["policy/clipfrac_avg"] == 0.0 and s["policy/approxkl_avg"] == 0.0
    assert loss == pytest.approx(-(adv * mask).sum() / mask.sum(), rel=1e-12)
    np.testing.assert_allclose(L.ppo_policy_loss_backward(1.0, cache), -adv * mask / mask.sum(), rtol=1e-12)


def test_ppo_value_loss_gradcheck():
    rng = np.random.default_rng(7)
    v = rng.standard_normal((4, 7))
    old = v + rng.standard_normal((4, 7)) * 0.3
    ret = rng.standard_normal((4, 7))
    mask = rng.random((4, 7)) < 0.8
    loss, cache = L.ppo_value_loss_forward(v, old, ret, mask, 0.2)
    assert 0 < L.ppo_value_stats(cache)["val/clipfrac_avg"] < 1
    d = L.ppo_value_loss_backward(1.0, cache)
    _check(lambda: L.ppo_value_loss_forward(v, old, ret, mask, 0.2)[0], d, v)


@pytest.mark.parametrize("est", ["k1", "k3"])
def test_kl_estimators_gradcheck(est):
    rng = np.random.default_rng(8)
    lp, ref = rng.standard_normal(10) - 2, rng.standard_normal(10) - 2
    kl, cache = L.kl_forward(lp, ref, est)
    w = rng.standard_normal(10)
    _check(lambda: float(w @ L.kl_forward(lp, ref, est)[0]), L.kl_backward(w, cache), lp)


def test_k1_k3_estimate_the_exact_kl_and_k3_is_nonnegative():
    """Sample x ~ pi from a softmax; both means agree with sum pi log(pi/ref) within 3 standard errors."""
    rng = np.random.default_rng(9)
    V = 20
    logpi = rng.standard_normal(V)
    logpi -= np.log(np.exp(logpi).sum())
    logref = logpi + 0.5 * rng.standard_normal(V)
    logref -= np.log(np.exp(logref).sum())
    exact = float(np.sum(np.exp(logpi) * (logpi - logref)))
    x = rng.choice(V, size=20000, p=np.exp(logpi))
    for est in ("k1", "k3"):
        k, _ = L.kl_forward(logpi[x], logref[x], est)
        se = k.std(ddof=1) / math.sqrt(len(k))
        assert abs(k.mean() - exact) < 3 * se, (est, k.mean(), exact, se)
        if est == "k3":
            assert np.all(k >= 0)


@given(st.integers(1, 4), st.integers(1, 9), st.floats(0, 1), st.floats(0, 1), st.integers(0, 2**31))
def test_gae_loop_equals_vectorised(B, T, gamma, lam, seed):
    rng = np.random.default_rng(seed)
    r, v = rng.standard_normal((B, T)), rng.standard_normal((B, T))
    lengths = rng.integers(0, T + 1, B)
    mask = np.arange(T)[None] < lengths[:, None]
    a1, ret1 = L.gae_loop(r, v, mask, gamma, lam)
    a2, ret2 = L.gae(r, v, mask, gamma, lam)
    np.testing.assert_allclose(a1, a2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ret1, ret2, rtol=0, atol=1e-12)


def test_gae_limits():
    rng = np.random.default_rng(10)
    r, v = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    mask = np.ones((3, 6), bool)
    adv, _ = L.gae(r, v, mask, gamma=1.0, lam=1.0)
    returns = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]  # sum of the rewards from t to the end
    np.testing.assert_allclose(adv, returns - v, atol=1e-12)
    adv0, _ = L.gae(r, v, mask, gamma=0.9, lam=0.0)
    next_v = np.concatenate([v[:, 1:], np.zeros((3, 1))], axis=1)
    np.testing.assert_allclose(adv0, r + 0.9 * next_v - v, atol=1e-12)


def test_masked_whiten():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 5)) * 4 + 2
    mask = rng.random((3, 5)) < 0.7
    w = L.masked_whiten(x, mask)
    assert abs(w[mask].mean()) < 1e-12 and abs(w[mask].std(ddof=1) - 1) < 1e-6 and np.all(w[~mask] == 0)


def test_score_head_gradcheck():
    rng = np.random.default_rng(12)
    h, wt = rng.standard_normal((2, 4, 5)), rng.standard_normal((1, 5))
    g = rng.standard_normal((2, 4))
    _, cache = L.score_head_forward(h, wt)
    dh, dw = L.score_head_backward(g, cache)
    _check(lambda: float((L.score_head_forward(h, wt)[0] * g).sum()), dh, h)
    _check(lambda: float((L.score_head_forward(h, wt)[0] * g).sum()), dw, wt)


@given(st.integers(1, 300), st.integers(0, 200), st.integers(0, 2**31 - 1))
def test_masked_row_sums_do_not_change_when_a_row_is_padded(n, pad, seed):
    """A sequence's log-prob must be one number whatever batch it is in (DPO stores the reference's once)."""
    rng = np.random.default_rng(seed)
    x = (-rng.exponential(2.0, (2, n)) * rng.random((2, n)) ** 8).astype(np.float32)  # confident tokens: tiny values
    w = rng.random((2, n)) < 0.8
    padded_x = np.concatenate([x, rng.standard_normal((2, pad)).astype(np.float32)], 1)
    padded_w = np.concatenate([w, np.zeros((2, pad), bool)], 1)
    assert np.array_equal(L.masked_row_sums(x, w), L.masked_row_sums(padded_x, padded_w))
