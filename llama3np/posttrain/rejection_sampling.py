"""Rejection sampling (Llama 3, section 4.2.2): K replies per prompt from the current model, the reward model
picks the best, and the winners become SFT data for the next round.

    replies = sample_replies(policy, prompts, K)          # K replies per prompt, batched in one KV cache
    rm_scores = score_replies(rm, prompts, replies)       # (P, K)
    winners = [replies[p][argmax_k rm_scores[p, k]] ...]

Best-of-N in numbers: the expected true score of the RM's pick among the first N of the K samples rises
with N, and the KL of the best-of-N distribution from the policy is at most log N - (N - 1) / N
(Beirami et al. 2024). `best_of_n_kl` measures it exactly on the empirical pool of K samples (ties, e.g.
equal rewards, make it smaller).
"""
import math

import numpy as np

from ..generation import sample_batch
from .reward_model import reply_first, rows


def sample_replies(policy, prompts, k, max_new_tokens=160, temperature=1.0, top_p=1.0, seed=0, batch_size=128):
    """-> (replies, logps): replies[p][i] the i-th reply ids to prompt p (ending with the stop token if one
    was sampled), logps[p][i] their per-token log-probs. All P*K rows in batches of `batch_size` (a decode
    step of the tiny model costs little more for 128 rows than for 32: at one thread, beside another job, 256
    replies took 15 s in batches of 32 and 9 s in batches of 64 or 128; the demo at two threads gained little)."""
    flat = [(p, i) for p in range(len(prompts)) for i in range(k)]
    replies = [[None] * k for _ in prompts]
    logps = [[None] * k for _ in prompts]
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        r, lp = sample_batch(policy, [prompts[p] for p, _ in chunk], max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=[seed, start])
        for (p, i), ids, l in zip(chunk, r, lp):
            replies[p][i], logps[p][i] = ids, l
    return replies, logps


def score_replies(rm, prompts, replies, batch_size=32):
    """The reward model's score of every reply -> (P, K), read at each reply's last token."""
    if len(prompts) != len(replies):
        raise ValueError(f"replies must hold one list per prompt: {len(prompts)} prompts, {len(replies)} lists")
    if not any(len(rs) for rs in replies):  # nothing to score (no prompts, or k = 0)
        return np.zeros((len(prompts), 0))
    flat_p = [prompts[p] for p in range(len(prompts)) for _ in replies[p]]
    flat_r = [r for rs in replies for r in rs]
    tokens, last = rows(flat_p, flat_r)
    return rm.rewards(tokens, last, batch_size, reply_first(flat_p)).reshape(len(prompts), -1)


def best_of_n_curve(rm_scores, true_scores, ns=(1, 2, 4, 8, 16)):
    """For each N: the mean (over prompts) RM score and true score of the RM's pick among the first N."""
    out = {}
    for n in ns:
        if n > rm_scores.shape[1]:
            break
        pick = np.argmax(rm_scores[:, :n], axis=1)
        rows_ = np.arange(len(pick))
        out[n] = {"rm_score": float(rm_scores[rows_, pick].mean()), "true_score": float(true_scores[rows_, pick].mean()),
                  "kl": float(np.mean([best_of_n_kl(r, n) for r in rm_scores])), "kl_bound": best_of_n_kl_bound(n)}
    return out


def best_of_n_kl_bound(n):
    return math.log(n) - (n - 1) / n


def best_of_n_kl(scores, n):
    """KL(best-of-n || pi) exactly, for pi = the empirical distribution of these K samples' scores.

    Group equal scores; with F_g the fraction of samples scoring <= group g, best-of-n lands in group g with
    probability F_g^n - F_{g-1}^n (ties inside a group broken uniformly, as for pi), so
    KL = sum_g P_bon(g) log(P_bon(g) / pi(g)).
    """
    values, counts = np.unique(np.asarray(scores), return_counts=True)
    pi = counts / counts.sum()
    F = np.cumsum(pi)
    p_bon = F ** n - np.concatenate([[0.0], F[:-1]]) ** n
    keep = p_bon > 0
    return float(np.sum(p_bon[keep] * np.log(p_bon[keep] / pi[keep])))


def check_n_best(n_best):
    if isinstance(n_best, bool) or not isinstance(n_best, (int, float)) or int(n_best) != n_best or n_best < 1:
        raise ValueError(f"n_best must be a whole number >= 1, got {n_best!r}")


def winner_indices(replies, rm_scores, stop_id, n_best=1):
    """-> [(prompt index, reply index)]: the RM's n_best best replies to each prompt (Llama 3 keeps the best one),
    best first, ties to the earlier sample; a picked reply that never ended (no stop token) is dropped, not replaced
    by the next one (it is not an example of a whole answer)."""
    check_n_best(n_best)
    out = []
    for p, rs in enumerate(replies):
        order = np.argsort(-np.asarray(rm_scores[p]), kind="stable")
        out += [(p, int(k)) for k in order[:int(n_best)] if rs[int(k)] and rs[int(k)][-1] == stop_id]
    return out


def winners(prompts, replies, rm_scores, stop_id, n_best=1):
    """winner_indices' replies as SFT examples: (prompt + reply ids, loss mask on the reply)."""
    return [(list(prompts[p]) + list(replies[p][k]), [0] * len(prompts[p]) + [1] * len(replies[p][k]))
            for p, k in winner_indices(replies, rm_scores, stop_id, n_best)]
