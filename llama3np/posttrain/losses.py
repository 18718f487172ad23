"""The losses of post-training, each a forward/backward pair like `llama3np.ops`.

Contract: `*_forward(inputs...) -> (out, cache)` and `*_backward(dout, cache) -> gradients`, pure
functions on arrays, float32 or float64 (float64 for the finite-difference tests). Names follow the
papers and TRL (`trl/trainer/dpo_trainer.py`, `ppo_trainer.py`), so the metrics read the same.

    per-token log-probs   logp[b, t] = log softmax(logits[b, t-1])[tokens[b, t]]      (token t given < t)
    sequence log-prob     logps[b]   = sum_t mask[b, t] logp[b, t]                    (mask[:, 0] ignored)
    SFT                   mean over masked tokens of -logp                              (loss on replies only)
    Bradley-Terry         -log sigmoid(r_chosen - r_rejected - margin)                  (reward model)
    DPO                   -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))          (Rafailov et al. 2023)
    PPO policy            max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logp - logp_old)
    PPO value             0.5 max((v - R)^2, (clip(v, v_old +- eps) - R)^2)
    KL estimators         k1 = logp - logp_ref,  k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp)
    GAE                   A_t = sum_l (gamma lambda)^l delta_{t+l},  delta_t = r_t + gamma V_{t+1} - V_t

Shapes: B sequences, T positions, V vocabulary. Masks are (B, T), boolean or 0/1.
"""
import numpy as np

from .. import ops


def _as_weights(mask, dtype):
    return np.asarray(mask).astype(dtype)


def masked_row_sums(x, w):
    """(B, T) values and weights -> (B,) float64 sums of x * w, added left to right.

    NumPy's .sum() adds in blocks whose boundaries depend on the row's length, so padding a row with zeros
    can change the last bit of its sum; added in order, the padding adds exact zeros at the end. A sequence's
    log-prob is then the same number in any batch: the DPO reference's, stored once, equals the policy's at
    the first step exactly (margins exactly 0)."""
    return np.cumsum(x * w, axis=-1, dtype=np.float64)[..., -1]


# ----------------------------------------------------------------------------------------------------
# log-probabilities of the given tokens, from the logits that predict them


def token_logps_forward(logits, tokens):
    """logits (B, T, V), tokens (B, T) -> logp (B, T): logp[:, t] = log p(tokens[:, t] | tokens[:, :t]).

    The logits at position t-1 predict token t, so logp[:, 0] (the first token has no prediction) is 0.
    """
    B, T, V = logits.shape
    pred = logits[:, :-1]  # (B, T-1, V) the predictions of tokens 1..T-1
    m = pred.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(pred - m).sum(-1))  # (B, T-1) log sum exp: the softmax's normaliser
    target = np.take_along_axis(pred, tokens[:, 1:, None], axis=-1)[..., 0]
    logp = np.zeros((B, T), dtype=logits.dtype)
    logp[:, 1:] = target - lse
    return logp, (logits, tokens, lse)


def token_logps_backward(dlogp, cache):
    """dlogp (B, T) -> dlogits (B, T, V). d logp_t / d z = onehot(token) - softmax(z); the last row is 0."""
    logits, tokens, lse = cache
    dlogits = np.zeros_like(logits)
    p = np.exp(logits[:, :-1] - lse[..., None])  # (B, T-1, V) softmax
    d = dlogp[:, 1:, None].astype(logits.dtype)
    dlogits[:, :-1] = -p * d
    np.put_along_axis(dlogits[:, :-1], tokens[:, 1:, None],
                      np.take_along_axis(dlogits[:, :-1], tokens[:, 1:, None], axis=-1) + d, axis=-1)
    return dlogits


def sequence_logps_forward(logits, tokens, mask):
    """logits (B, T, V), tokens (B, T), mask (B, T) -> logps (B,) = sum over mask[:, 1:] of log p(token).

    mask[:, 0] is ignored (no logit predicts the first token). This is TRL's `logps` for DPO: a sum, not a
    mean, so that the reference's and the policy's numbers are comparable per sequence.
    """
    logp, lp_cache = token_logps_forward(logits, tokens)
    w = _as_weights(mask, logits.dtype)
    w[:, 0] = 0
    return masked_row_sums(logp, w), (lp_cache, w)


def sequence_logps_backward(dlogps, cache):
    """dlogps (B,) -> dlogits (B, T, V)."""
    lp_cache, w = cache
    return token_logps_backward(np.asarray(dlogps)[:, None] * w, lp_cache)


# ----------------------------------------------------------------------------------------------------
# SFT: the mean cross-entropy of the masked tokens (the reply), from the logits at position t-1.
# It is ops.cross_entropy on the shifted arrays: one cross-entropy in the project, not two.


def sft_cross_entropy_forward(logits, tokens, mask):
    """logits (B, T, V), tokens (B, T), mask (B, T) -> mean of -log p(tokens[b, t]) over mask[:, 1:]."""
    m = np.asarray(mask)[:, 1:]
    loss, ce_cache = ops.cross_entropy_forward(logits[:, :-1], tokens[:, 1:], m)
    return loss, (ce_cache, logits.shape)


def sft_cross_entropy_backward(dloss, cache):
    ce_cache, shape = cache
    dlogits = np.zeros(shape, dtype=ce_cache[0].dtype)
    dlogits[:, :-1] = ops.cross_entropy_backward(dloss, ce_cache)  # the last position predicts nothing
    return dlogits


# ----------------------------------------------------------------------------------------------------
# log sigmoid, written to never overflow: log sigmoid(x) = -log(1 + e^-x) = min(x, 0) - log(1 + e^-|x|)


def log_sigmoid(x):
    x = np.asarray(x)
    return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))


def sigmoid(x):
    x = np.asarray(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


# ----------------------------------------------------------------------------------------------------
# Bradley-Terry: p(chosen > rejected) = sigmoid(r_c - r_r). Llama 2's reward model adds a margin for
# pairs rated far apart; Llama 3 drops it (margin 0), we keep the argument.


def bradley_terry_forward(r_chosen, r_rejected, margin=0.0):
    """r_chosen, r_rejected (B,) -> mean over the batch of -log sigmoid(r_c - r_r - margin)."""
    z = np.asarray(r_chosen) - np.asarray(r_rejected) - margin
    return float(-np.mean(log_sigmoid(z))), (z,)


def bradley_terry_backward(dloss, cache):
    """-> (dr_chosen, dr_rejected), each (B,). d/dz -log sigmoid(z) = -sigmoid(-z)."""
    (z,) = cache
    dz = -sigmoid(-z) * dloss / z.size
    return dz, -dz


# ----------------------------------------------------------------------------------------------------
# DPO (Rafailov et al. 2023). With Delta = (pi_c - ref_c) - (pi_r - ref_r), the implicit rewards are
# beta (pi - ref) (TRL's rewards/chosen, rewards/rejected) and
#   sigmoid (DPO):  L = -(1 - ls) log sigmoid(beta Delta) - ls log sigmoid(-beta Delta)
#                   (ls > 0 is cDPO: a fraction ls of the labels is assumed flipped)
#   ipo:            L = (Delta - 1 / (2 beta))^2                (Azar et al. 2023; a squared, bounded target)
# averaged over the batch.

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def check_dpo_loss_type(loss_type):
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")


def check_dpo_beta(beta):
    if not beta > 0:
        raise ValueError(f"DPO's beta must be > 0, got {beta}")


def dpo_forward(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=0.1, label_smoothing=0.0, loss_type="sigmoid"):
    """Four (B,) arrays of sequence log-probs -> (mean loss, cache). See `dpo_metrics` for the rewards."""
    check_dpo_loss_type(loss_type)
    check_dpo_beta(beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing (cDPO) must be in [0, 0.5), got {label_smoothing}")
    # BEGIN SOLUTION ex19
    delta = (np.asarray(policy_chosen_logps) - ref_chosen_logps) - (np.asarray(policy_rejected_logps)
                                                                     - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        z = beta * delta
        losses = -(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)
    else:
        losses = (delta - 1 / (2 * beta)) ** 2
    return float(np.mean(losses)), (delta, beta, label_smoothing, loss_type)
    # END SOLUTION


def dpo_backward(dloss, cache):
    """-> (dpolicy_chosen_logps, dpolicy_rejected_logps), each (B,): dL/dDelta and its negative.

    At policy = reference (Delta = 0) the sigmoid loss has dL/dDelta = -beta / 2 per pair (before the mean).
    """
    # BEGIN SOLUTION ex19
    delta, beta, ls, loss_type = cache
    if loss_type == "sigmoid":
        z = beta * delta
        # d/dz [-(1-ls) log s(z) - ls log s(-z)] = -(1-ls) s(-z) + ls s(z)
        ddelta = beta * (-(1 - ls) * sigmoid(-z) + ls * sigmoid(z))
    else:
        ddelta = 2 * (delta - 1 / (2 * beta))
    ddelta = ddelta * dloss / delta.size
    return ddelta, -ddelta
    # END SOLUTION


def dpo_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """TRL's DPO metrics: implicit rewards beta (pi - ref), their margin and accuracy (strictly greater)."""
    chosen = beta * (np.asarray(policy_chosen_logps) - ref_chosen_logps)
    rejected = beta * (np.asarray(policy_rejected_logps) - ref_rejected_logps)
    return {"rewards/chosen": float(np.mean(chosen)), "rewards/rejected": float(np.mean(rejected)),
            "rewards/accuracies": float(np.mean(chosen > rejected)),
            "rewards/margins": float(np.mean(chosen - rejected)),
            "logps/chosen": float(np.mean(policy_chosen_logps)),
            "logps/rejected": float(np.mean(policy_rejected_logps))}


# ----------------------------------------------------------------------------------------------------
# masked statistics (TRL's masked_mean / masked_var / masked_whiten)


def masked_mean(x, mask):
    w = _as_weights(mask, np.float64)
    n = w.sum()
    if n == 0:
        raise ValueError("the mask selects no positions: the masked mean is undefined")
    return float((np.asarray(x, dtype=np.float64) * w).sum() / n)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); masked-out entries -> 0.

    Advantage whitening: PPO's step size then does not depend on the scale of the rewards.
    """
    w = _as_weights(mask, np.float64)
    n = w.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 masked entries, got {int(n)}")
    x = np.asarray(x, dtype=np.float64)
    mean = (x * w).sum() / n
    var = (((x - mean) ** 2) * w).sum() / (n - 1)
    out = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * w


# ----------------------------------------------------------------------------------------------------
# PPO's clipped surrogate (Schulman et al. 2017), per token, averaged over the masked response tokens.
# Taking the max of the two losses (min of the objectives) removes the incentive to move the ratio
# beyond 1 +- eps in the direction the advantage favours: there the clipped branch is flat.


def ppo_policy_loss_forward(logps, old_logps, advantages, mask, cliprange=0.2):
    """logps, old_logps, advantages, mask (B, T) -> (loss, cache). Stats: `ppo_policy_stats(cache)`."""
    w = _as_weights(mask, np.asarray(logps).dtype)
    n = w.sum()
    if n == 0:
        raise ValueError("the mask selects no response tokens")
    log_ratio = logps - old_logps
    ratio = np.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * np.clip(ratio, 1 - cliprange, 1 + cliprange)
    loss = float((np.maximum(pg_losses, pg_losses2) * w).sum() / n)
    return loss, (ratio, log_ratio, advantages, pg_losses, pg_losses2, w, n)


def ppo_policy_loss_backward(dloss, cache):
    """-> dlogps (B, T). Where the clipped branch is the larger one and clipped, the gradient is 0."""
    ratio, _, advantages, pg_losses, pg_losses2, w, n = cache
    # the unclipped branch is active where it is >= the clipped one (ties: the same value, same slope
    # unless clipped, and then the clipped branch is flat only strictly outside the interval)
    use_unclipped = pg_losses >= pg_losses2
    dratio = np.where(use_unclipped, -advantages, 0.0)
    return (dratio * ratio * w * dloss / n).astype(ratio.dtype)  # d ratio / d logp = ratio


def ppo_policy_stats(cache):
    """TRL's names: policy/clipfrac_avg, policy/approxkl_avg (0.5 mean (log ratio)^2), val/ratio."""
    ratio, log_ratio, _, pg_losses, pg_losses2, w, n = cache
    return {"policy/clipfrac_avg": float(((pg_losses2 > pg_losses) * w).sum() / n),
            "policy/approxkl_avg": float((0.5 * log_ratio ** 2 * w).sum() / n),
            "val/ratio": float((ratio * w).sum() / n)}


def ppo_value_loss_forward(vpreds, old_values, returns, mask, cliprange_value=0.2):
    """vpreds, old_values, returns, mask (B, T) -> 0.5 masked mean of max((v - R)^2, (v_clip - R)^2)."""
    w = _as_weights(mask, np.asarray(vpreds).dtype)
    n = w.sum()
    if n == 0:
        raise ValueError("the mask selects no response tokens")
    vclipped = np.clip(vpreds, old_values - cliprange_value, old_values + cliprange_value)
    l1 = (vpreds - returns) ** 2
    l2 = (vclipped - returns) ** 2
    loss = float(0.5 * (np.maximum(l1, l2) * w).sum() / n)
    return loss, (vpreds, vclipped, returns, old_values, cliprange_value, l1, l2, w, n)


def ppo_value_loss_backward(dloss, cache):
    """-> dvpreds (B, T)."""
    vpreds, vclipped, returns, old_values, c, l1, l2, w, n = cache
    inside = (vpreds > old_values - c) & (vpreds < old_values + c)  # where the clip is the identity
    d_unclipped = vpreds - returns
    d_clipped = np.where(inside, vclipped - returns, 0.0)
    d = np.where(l1 >= l2, d_unclipped, d_clipped)
    return (d * w * dloss / n).astype(vpreds.dtype)


def ppo_value_stats(cache):
    *_, l1, l2, w, n = cache
    return {"val/clipfrac_avg": float(((l2 > l1) * w).sum() / n)}


# ----------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020), per sampled token x ~ pi:
#   k1 = log pi(x) - log ref(x)                         unbiased, can be negative
#   k3 = (r - 1) - log r,  r = ref(x) / pi(x)           unbiased and always >= 0 (log r <= r - 1)
# Their mean over samples estimates KL(pi || ref). The backward is with respect to log pi.


def kl_forward(logps, ref_logps, estimator="k1"):
    """logps, ref_logps (...) -> per-token KL estimates (...), and the cache."""
    if estimator == "k1":
        return logps - ref_logps, (estimator, None)
    if estimator == "k3":
        log_r = ref_logps - logps
        r = np.exp(log_r)
        return (r - 1) - log_r, (estimator, r)
    raise ValueError(f"KL estimator must be 'k1' or 'k3', got {estimator!r}")


def kl_backward(dkl, cache):
    """-> dlogps. k1: 1; k3: d/dlogp [(r - 1) - log r] with r = exp(ref - logp) gives 1 - r."""
    estimator, r = cache
    return dkl * (1.0 if estimator == "k1" else 1 - r)


# ----------------------------------------------------------------------------------------------------
# GAE (Schulman et al. 2016). Per response token t with reward r_t and value V_t:
#   delta_t = r_t + gamma V_{t+1} - V_t        (V past the last response token is 0: the episode ended)
#   A_t = delta_t + gamma lambda A_{t+1}       returns R_t = A_t + V_t are the value model's targets.
# lambda = 1 gives the Monte-Carlo return minus V; lambda = 0 gives the one-step TD error.


def gae_loop(rewards, values, mask, gamma=1.0, lam=0.95):
    """rewards, values, mask (B, T) -> (advantages, returns), the recursion backwards in time (TRL's loop)."""
    rewards, values, w = _gae_inputs(rewards, values, mask)
    # BEGIN SOLUTION ex20
    B, T = rewards.shape
    adv = np.zeros((B, T))
    last = np.zeros(B)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * w[:, t + 1] if t + 1 < T else 0.0
        delta = (rewards[:, t] + gamma * next_v - values[:, t]) * w[:, t]
        last = delta + gamma * lam * last * w[:, t]
        adv[:, t] = last
    return adv, (adv + values) * w
    # END SOLUTION


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """The same as `gae_loop`, vectorised: A = delta @ D with D[s, t] = (gamma lambda)^(s - t) for s >= t.

    The response mask must be one contiguous run per row (left to right), as it is after generation.
    """
    rewards, values, w = _gae_inputs(rewards, values, mask)
    B, T = rewards.shape
    next_v = np.zeros_like(values)
    next_v[:, :-1] = values[:, 1:] * w[:, 1:]
    delta = (rewards + gamma * next_v - values) * w  # (B, T)
    s, t = np.arange(T)[:, None], np.arange(T)[None, :]
    # (gamma lambda)^(s-t) for s >= t; 0^0 = 1 so lambda = 0 keeps the diagonal (the TD error)
    discount = np.where(s >= t, np.power(gamma * lam, np.maximum(s - t, 0).astype(np.float64)), 0.0)  # (T, T)
    adv = delta @ discount
    return adv * w, (adv + values) * w


def _gae_inputs(rewards, values, mask):
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    w = _as_weights(mask, np.float64)
    if rewards.shape != values.shape or rewards.shape != w.shape or rewards.ndim != 2:
        raise ValueError(f"rewards, values and mask must share one (B, T) shape, got {rewards.shape}, "
                         f"{values.shape}, {w.shape}")
    return rewards, values, w


# ----------------------------------------------------------------------------------------------------
# a scalar head on the final hidden state (reward model, PPO's value model): r = hidden @ w^T.
# As HF's LlamaForSequenceClassification (`score`, no bias); the reward of a sequence is the head's
# output at its last token (the end-of-turn), which has read the whole prompt and reply.


def score_head_forward(hidden, weight):
    """hidden (B, T, C), weight (1, C) -> values (B, T)."""
    return (hidden @ weight[0]), (hidden, weight)


def score_head_backward(dvalues, cache):
    """dvalues (B, T) -> (dhidden (B, T, C), dweight (1, C))."""
    hidden, weight = cache
    dvalues = np.asarray(dvalues, dtype=hidden.dtype)
    dhidden = dvalues[..., None] * weight[0]
    dweight = np.einsum("bt,btc->c", dvalues, hidden)[None]
    return dhidden, dweight
