"""PPO for RLHF (Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation details of RLHF with PPO";
TRL's PPO trainer), in NumPy with hand-written backwards.

One iteration:
  1. rollout: sample a reply to each prompt (one batched KV cache) -> tokens, response mask
  2. score: old log-probs (policy), reference log-probs (SFT model), values (value model), the reward
     model's score at the reply's last token; a reply without <|eot_id|> loses `missing_eos_penalty`
  3. per-token rewards: -kl_coef * KL_t (k1 or k3 estimator) at every reply token, + score at the last
  4. GAE (gamma 1, lambda 0.95) -> advantages (whitened over the batch) and returns
  5. ppo_epochs passes over minibatches: clipped policy loss (ratio clip 0.2) on the policy, clipped value
     loss (0.2) on the value model, each with its own AdamW
  6. the adaptive KL controller (Ziegler et al. 2019) moves kl_coef so that the KL tracks `target_kl`
Metrics use TRL's names: objective/kl, objective/scores, objective/rlhf_reward, policy/clipfrac_avg, ...

The value at the state before token t is the value head at position t-1 (what the model has read), so
vpred[:, t] = head(hidden)[:, t-1], as TRL's `values[:, context_length - 1 : -1]`.
The old log-probs are recomputed with the same full forward the update uses (not taken from sampling),
so on the first minibatch the ratio is exactly 1.
"""
from dataclasses import asdict, dataclass

import numpy as np

from ..generation import sample_batch
from ..optim import AdamW
from . import losses
from .logprobs import forward_logits, token_logps
from .reward_model import reply_first, reply_span, rows
from .stage import StageRun, run_steps, step_rng, update


@dataclass
class PPOConfig:
    iterations: int = 20
    batch_size: int = 16  # prompts (= replies) per rollout
    mini_batch_size: int = 8
    ppo_epochs: int = 2
    lr: float = 3e-5
    value_lr: float = 1e-4
    max_new_tokens: int = 160
    temperature: float = 1.0
    kl_estimator: str = "k1"
    init_kl_coef: float = 0.05
    target_kl: float = 6.0  # nats per reply; None: a fixed kl_coef
    kl_horizon: int = 100  # iterations (Ziegler et al.: 10,000 episodes)
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0


class AdaptiveKLController:
    """kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon): more pull when over budget."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl, n_steps=1):
        if self.target is None:
            return self.value
        error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


def rollout_rows(prompts, replies, pad_id=0):
    """-> tokens (B, T) right-padded (the reward model's rows), response mask (B, T) on the reply tokens (the
    actions): positions len(prompt) .. len(prompt) + len(reply) - 1."""
    tokens, last = rows(prompts, replies, pad_id)
    t = np.arange(tokens.shape[1])
    return tokens, (t >= reply_first(prompts)[:, None]) & (t <= last[:, None])


def shifted_values(v):
    """values (B, T) of the head at each position -> vpred (B, T): the value of the state before token t."""
    out = np.zeros_like(v)
    out[:, 1:] = v[:, :-1]
    return out


def unshift_grad(dvpred):
    dv = np.zeros_like(dvpred)
    dv[:, :-1] = dvpred[:, 1:]
    return dv


def policy_loss_and_grads(policy, tokens, old_logps, advantages, mask, cliprange):
    """The clipped surrogate through the whole policy -> (loss, grads, stats)."""
    logits = forward_logits(policy, tokens, keep=True)
    logp, lp_cache = losses.token_logps_forward(logits, tokens)
    loss, cache = losses.ppo_policy_loss_forward(logp, old_logps.astype(logp.dtype),
                                                 advantages.astype(logp.dtype), mask, cliprange)
    dlogp = losses.ppo_policy_loss_backward(1.0, cache)
    grads = policy.backward(losses.token_logps_backward(dlogp, lp_cache))
    return loss, grads, losses.ppo_policy_stats(cache)


def value_loss_and_grads(value_model, tokens, old_values, returns, mask, cliprange_value):
    """The clipped value loss through the value model (a RewardModel) -> (loss, grads, stats)."""
    vpred = shifted_values(value_model.values(tokens, keep=True))
    loss, cache = losses.ppo_value_loss_forward(vpred, old_values.astype(vpred.dtype), returns.astype(vpred.dtype),
                                                mask, cliprange_value)
    dv = unshift_grad(losses.ppo_value_loss_backward(1.0, cache))
    return loss, value_model.backward(dv), losses.ppo_value_stats(cache)


def ppo_iteration(policy, value_model, ref_model, reward_model, prompts, cfg, opt_policy, opt_value, kl_coef,
                  rng, true_score_fn=None):
    """One rollout and its PPO updates -> metrics (TRL's names). Updates policy and value model in place."""
    eot = policy.tokenizer.eot_id
    replies, _ = sample_batch(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
                              seed=int(rng.integers(2**31)))
    tokens, mask = rollout_rows(prompts, replies)
    B = len(prompts)
    # 2. score the rollout (no gradients)
    old_logps = token_logps(policy, tokens) * mask
    ref_logps = token_logps(ref_model, tokens) * mask
    old_values = shifted_values(value_model.values(tokens).astype(np.float64)) * mask
    first, last = reply_span(mask)  # (B,) each row's first and last reply token
    scores = reward_model.rewards(tokens, last, first=first)
    has_eos = np.array([len(r) > 0 and r[-1] == eot for r in replies])
    scores = np.where(has_eos, scores, scores - cfg.missing_eos_penalty)
    # 3. per-token rewards: the KL penalty everywhere, the score at the end
    kl, _ = losses.kl_forward(old_logps, ref_logps, cfg.kl_estimator)
    kl = kl * mask
    non_score = -kl_coef * kl
    rewards = non_score.copy()
    rewards[np.arange(B), last] += scores
    # 4. advantages
    adv, returns = losses.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = losses.masked_whiten(adv, mask)
    # 5. PPO epochs over minibatches
    stats = []
    for _ in range(cfg.ppo_epochs):
        order = rng.permutation(B)
        for s in range(0, B, cfg.mini_batch_size):
            mb = order[s:s + cfg.mini_batch_size]
            if not mask[mb].any():
                continue
            pl, pg, ps = policy_loss_and_grads(policy, tokens[mb], old_logps[mb], adv[mb], mask[mb], cfg.cliprange)
            update(opt_policy, pg, cfg.lr, cfg.grad_clip)
            vl, vg, vs = value_loss_and_grads(value_model, tokens[mb], old_values[mb], returns[mb], mask[mb],
                                              cfg.cliprange_value)
            update(opt_value, vg, cfg.value_lr, cfg.grad_clip)
            stats.append(dict(ps, **vs, **{"loss/policy_avg": pl, "loss/value_avg": vl}))
    m = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]} if stats else {}
    kl_seq = kl.sum(1)
    m.update({"objective/kl": float(kl_seq.mean()), "objective/entropy": float((-old_logps).sum(1).mean()),
              "objective/non_score_reward": float(non_score.sum(1).mean()),
              "objective/scores": float(scores.mean()),
              "objective/rlhf_reward": float(scores.mean() + non_score.sum(1).mean()),
              "val/num_eos_tokens": int(has_eos.sum()), "kl_coef": float(kl_coef),
              "val/ratio_first": stats[0]["val/ratio"] if stats else 1.0})
    if true_score_fn is not None:
        m["objective/true_score"] = float(np.mean([true_score_fn(i, r) for i, r in enumerate(replies)]))
    return m


def train_ppo(policy, value_model, ref_model, reward_model, prompts, out, cfg: PPOConfig, resume=False,
              progress=False, save_every=5, true_score_fn=None):
    """PPO for cfg.iterations rollouts of cfg.batch_size prompts drawn from `prompts` by (seed, iteration).

    The run folder holds policy and value model in one checkpoint (the value model's weights under
    "value/"), the KL coefficient in its metadata: a resumed run continues exactly.
    true_score_fn(prompt_index, reply_ids) -> the ground truth of a reply, logged as objective/true_score.
    """
    if ref_model.args.vocab_size != policy.args.vocab_size:
        raise ValueError(f"the reference model's vocabulary ({ref_model.args.vocab_size} ids) differs from the "
                         f"policy's ({policy.args.vocab_size}): they must share one tokenizer")
    run = StageRun(out, "ppo", asdict(cfg), resume=resume)
    params = dict(policy.params, **{"value/" + k: v for k, v in value_model.params.items()})
    opt_policy = AdamW(policy.params, lr=cfg.lr, weight_decay=0.0)
    opt_value = AdamW(value_model.params, lr=cfg.value_lr, weight_decay=0.0)
    kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)

    class BothOptimisers:  # one state_dict for the checkpoint, keyed like `params`
        @staticmethod
        def state_dict():
            a, b = opt_policy.state_dict(), opt_value.state_dict()
            return dict(a, m=dict(a["m"], **{"value/" + k: v for k, v in b["m"].items()}),
                        v=dict(a["v"], **{"value/" + k: v for k, v in b["v"].items()}))

        @staticmethod
        def load_state_dict(st):
            split = lambda d, value: {k[6:] if value else k: v for k, v in d.items() if k.startswith("value/") == value}
            opt_policy.load_state_dict(dict(st, m=split(st["m"], False), v=split(st["v"], False)))
            opt_value.load_state_dict(dict(st, m=split(st["m"], True), v=split(st["v"], True)))

    def step_fn(it):
        rng = step_rng(cfg.seed, it)
        idx = rng.choice(len(prompts), size=min(cfg.batch_size, len(prompts)), replace=False)
        fn = None if true_score_fn is None else (lambda i, r: true_score_fn(int(idx[i]), r))
        m = ppo_iteration(policy, value_model, ref_model, reward_model, [prompts[i] for i in idx], cfg,
                          opt_policy, opt_value, kl_ctl.value, rng, fn)
        kl_ctl.update(m["objective/kl"], 1)
        return m

    def start_meta(meta):
        kl_ctl.value = float(meta["kl_coef"])
        # the checkpoint's optimizer state has one step count (the policy's); a non-finite gradient skips
        # one optimizer's step and not the other's, so the value optimizer's count rides in the metadata
        opt_value.t = int(meta.get("value_t", opt_policy.t))

    records = run_steps(run, cfg.iterations, step_fn, params, BothOptimisers, policy.tokenizer, policy.args,
                        save_every, progress, meta_fn=lambda: {"kl_coef": kl_ctl.value, "value_t": opt_value.t},
                        start_meta=start_meta)
    run.plot(["objective/scores", "objective/kl", "objective/true_score", "policy/clipfrac_avg", "kl_coef"])
    return records
