"""The reward model: the transformer with a scalar head on its final hidden state, trained on preference
pairs with the Bradley-Terry loss (Llama 3, section 4.1.2; Ouyang et al. 2022).

    hidden = model.forward(tokens, return_hidden=True)      # (B, T, dim), the LM head is not run
    values = hidden @ score.weight^T                          # (B, T): a scalar per position
    reward = values[b, last[b]]                               # read at the reply's final <|eot_id|>
    loss   = mean -log sigmoid(r_chosen - r_rejected)

pooling="last" is Llama 3's (and TRL's) reading. pooling="mean" reads the mean of the values over the reply's
tokens, first[b]..last[b]: a demand met or missed shows at the tokens that write it, while the final
<|eot_id|> (after " The end." in every story) would have to gather all of that through attention first. Both are the same loss: reward = sum_t w[b, t] values[b, t] with
pooling weights w (one-hot at `last`, or uniform over the reply).

The backward runs the other way: d loss/d reward -> d values (one nonzero per row) -> score_head_backward
-> model.backward_hidden(dhidden). Llama 3 ranks an edited reply above the chosen one above the
rejected one: every ordered pair of the three is a Bradley-Terry term.
The same class is PPO's value model (`values` at every position, not only the last).
"""
import numpy as np

from ..optim import AdamW
from . import losses
from .logprobs import check_batch
from .stage import StageRun, run_steps, step_rng, update, warmup_lr

POOLINGS = ("last", "mean")
SCORE = "score.weight"  # HF's LlamaForSequenceClassification calls its head `score` (no bias)


class RewardModel:
    """A Transformer plus `score.weight` (1, dim). `params` holds both (the transformer's arrays, shared)."""

    def __init__(self, model, seed=0, score=None, pooling="last"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model, self.pooling = model, pooling
        self.args, self.tokenizer, self.dtype = model.args, model.tokenizer, model.dtype
        if score is None:
            score = np.random.default_rng(seed).standard_normal((1, model.args.dim)) * 0.02
        self.score = np.asarray(score, dtype=model.dtype).reshape(1, model.args.dim).copy()
        self.params = dict(model.params, **{SCORE: self.score})
        self._cache = None

    def values(self, tokens, keep=False):
        """tokens (B, T) -> values (B, T): the head at every position (PPO's value model reads them all)."""
        hidden = self.model.forward(tokens, return_hidden=True, keep=keep)
        v, self._cache = losses.score_head_forward(hidden, self.score)
        return v

    def backward(self, dvalues):
        """dvalues (B, T) for the last values(keep=True) -> grads keyed like `params`."""
        dhidden, dscore = losses.score_head_backward(dvalues, self._cache)
        grads = self.model.backward_hidden(dhidden)
        grads[SCORE] = dscore
        return grads

    def pool_weights(self, T, last, first=None):
        """-> w (B, T) float64, reward = sum_t w[b, t] values[b, t]: one-hot at last[b] ("last"), or uniform
        over the reply positions first[b]..last[b] ("mean", which needs `first`)."""
        last = np.asarray(last)
        w = np.zeros((len(last), T))
        if self.pooling == "last":
            w[np.arange(len(last)), last] = 1.0
            return w
        if first is None:
            raise ValueError("a reward model with pooling='mean' needs `first`, the index of each reply's first token")
        first = np.asarray(first)
        if first.shape != last.shape or np.any(first > last) or np.any(first < 1):
            raise ValueError(f"first must be ({len(last)},) indices with 1 <= first <= last, got {first}")
        t = np.arange(T)
        w[(t >= first[:, None]) & (t <= last[:, None])] = 1.0
        return w / w.sum(1, keepdims=True)

    def rewards(self, tokens, last, batch_size=32, first=None):
        """tokens (B, T), last (B,) the index of each row's final token (first (B,): of its reply's first token)
        -> rewards (B,), no gradient."""
        out = []
        for i in range(0, len(tokens), batch_size):
            v = self.values(tokens[i:i + batch_size])
            f = None if first is None else first[i:i + batch_size]
            w = self.pool_weights(v.shape[1], last[i:i + batch_size], f)
            out.append((v * w).sum(1))
        return np.concatenate(out).astype(np.float64)

    def loss_and_grads(self, chosen, chosen_last, rejected, rejected_last, margin=0.0, chosen_first=None,
                       rejected_first=None):
        """Bradley-Terry on B pairs, one forward over the 2B rows -> (loss, grads, metrics)."""
        chosen, _ = check_batch(self.model, chosen, np.ones(np.shape(chosen), bool), "chosen")
        rejected, _ = check_batch(self.model, rejected, np.ones(np.shape(rejected), bool), "rejected")
        B, T = chosen.shape[0], max(chosen.shape[1], rejected.shape[1])
        tokens = np.zeros((2 * B, T), dtype=np.int64)
        tokens[:B, :chosen.shape[1]], tokens[B:, :rejected.shape[1]] = chosen, rejected
        last = np.concatenate([chosen_last, rejected_last])
        first = None if chosen_first is None or rejected_first is None else np.concatenate([chosen_first,
                                                                                            rejected_first])
        w = self.pool_weights(T, last, first)
        v = self.values(tokens, keep=True)
        r = (v * w).sum(1)
        loss, cache = losses.bradley_terry_forward(r[:B], r[B:], margin)
        dc, dr = losses.bradley_terry_backward(1.0, cache)
        dv = (np.concatenate([dc, dr])[:, None] * w).astype(v.dtype)  # reward = sum_t w v: dv = dr * w
        metrics = {"loss": loss, "accuracy": float(np.mean(r[:B] > r[B:])),
                   "rewards/chosen": float(r[:B].mean()), "rewards/rejected": float(r[B:].mean()),
                   "rewards/margins": float(np.mean(r[:B] - r[B:]))}
        return loss, self.backward(dv), metrics


def reply_first(prompts):
    """(B,) the index of each reply's first token in rows(prompts, replies): the prompt's length."""
    return np.array([len(p) for p in prompts])


def rows(prompts, replies, pad_id=0):
    """Prompt and reply id lists -> tokens (B, T) right-padded, last (B,) the index of each row's last token."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, replies)]
    T = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), T), pad_id, dtype=np.int64)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = s
    return tokens, np.array([len(s) - 1 for s in seqs])


def ranked_pairs(prompt, replies_best_first):
    """Llama 3's ranking edited > chosen > rejected as every ordered pair: [(prompt, better, worse), ...]."""
    r = replies_best_first
    return [(prompt, r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]


def pair_accuracy(rm, pairs, batch_size=32):
    """The fraction of (prompt, better, worse) pairs the reward model orders correctly (strictly)."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    prompts = [p for p, _, _ in pairs]
    tc, lc = rows(prompts, [c for _, c, _ in pairs])
    tr, lr = rows(prompts, [r for _, _, r in pairs])
    first = reply_first(prompts)
    return float(np.mean(rm.rewards(tc, lc, batch_size, first) > rm.rewards(tr, lr, batch_size, first)))


def train_rm(rm, pairs, out, steps=100, batch_size=8, lr=3e-4, seed=0, save_every=50, resume=False,
             progress=False, grad_clip=1.0, eval_pairs=None):
    """Bradley-Terry training on (prompt, better, worse) id triples -> log records."""
    if not pairs:
        raise ValueError("no preference pairs")
    run = StageRun(out, "rm", dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, n_pairs=len(pairs),
                                   pooling=rm.pooling), resume=resume)
    opt = AdamW(rm.params, lr=lr, weight_decay=0.0)

    def step_fn(step):
        idx = step_rng(seed, step).integers(0, len(pairs), batch_size)
        prompts = [pairs[i][0] for i in idx]
        tc, lc = rows(prompts, [pairs[i][1] for i in idx])
        tr, lr_ = rows(prompts, [pairs[i][2] for i in idx])
        first = reply_first(prompts)
        loss, grads, m = rm.loss_and_grads(tc, lc, tr, lr_, chosen_first=first, rejected_first=first)
        m["grad_norm"] = update(opt, grads, warmup_lr(step, lr, steps), grad_clip)
        if eval_pairs and ((step + 1) % save_every == 0 or step + 1 == steps):
            m["eval_accuracy"] = pair_accuracy(rm, eval_pairs)
        return m

    records = run_steps(run, steps, step_fn, rm.params, opt, rm.tokenizer, rm.args, save_every, progress)
    run.plot(["loss", "accuracy", "rewards/margins", "eval_accuracy"])
    return records


def load_reward_model(path, dtype=np.float32):
    """A reward model from its run folder: the transformer plus score.weight (pooling from its config.json)."""
    import json
    from pathlib import Path

    from .stage import load_stage_model

    model, params = load_stage_model(path, dtype=dtype)
    if SCORE not in params:
        raise ValueError(f"{path} is not a reward model run (no {SCORE} in its checkpoint)")
    cfg = Path(path) / "config.json"
    pooling = json.loads(cfg.read_text()).get("pooling", "last") if cfg.exists() else "last"
    return RewardModel(model, score=params[SCORE], pooling=pooling)
