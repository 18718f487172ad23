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

logp_weight (an option, not Llama 3's): the reward also adds logp_weight * the reply's mean log-likelihood under
the model's own LM head, read from the same forward, and trained with the rest (logp_weight too). Started from the
SFT model, that term already knows what the instruction asked for one token at a time ("named Max" after an
instruction for Leo is an unlikely token), which a pooled scalar head has to learn to compare through attention.
On the demo's task the SFT model's mean log-likelihood alone ordered 0.94-0.99 of held-out wrong-value pairs and
0.92-0.98 of the built-in pairs (two SFT models), where the head alone, trained on the same pairs, stayed at
0.66 / 0.74 (issue 11).

Packed rows (Llama 3, 4.1.2: "we concatenate the prompt and multiple responses into a single row with responses
randomly shuffled"): a group (prompt, [replies best first]) becomes one row, the prompt once and then the K replies
in a seeded random order, each ending with <|eot_id|>; every ordered pair (better, worse) of the row is a
Bradley-Terry term on the rewards read per reply. K replies cost len(prompt) + sum len(reply) positions instead of
K(K-1)/2 pairs of two rows each. Attention stays plainly causal, Meta's approximation: a later reply sees the
prompt AND the replies before it, so only the first reply of a row is scored as it would be alone.
    batch = packed_rows(groups, rng, eot_id)              # PackedRows: tokens (B, T), per reply row/first/last/rank
    loss, grads, metrics = rm.packed_loss_and_grads(batch)
    train_rm(rm, groups, out, packed=True)                # batch_size groups per step
"""
from typing import NamedTuple

import numpy as np

from ..optim import AdamW
from . import losses
from .logprobs import check_batch, pad_right
from .stage import StageRun, run_steps, step_rng, update, warmup_lr

POOLINGS = ("last", "mean")
SCORE = "score.weight"  # HF's LlamaForSequenceClassification calls its head `score` (no bias)
LOGP = "score.logp_weight"  # (1,) the weight of the reply's mean log-likelihood in the reward (logp_weight)


class RewardModel:
    """A Transformer plus `score.weight` (1, dim), and with logp_weight set `score.logp_weight` (1,) too. `params`
    holds them all (the transformer's arrays, shared)."""

    def __init__(self, model, seed=0, score=None, pooling="last", logp_weight=None):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model, self.pooling = model, pooling
        self.args, self.tokenizer, self.dtype = model.args, model.tokenizer, model.dtype
        if score is None:
            score = np.random.default_rng(seed).standard_normal((1, model.args.dim)) * 0.02
        self.score = np.asarray(score, dtype=model.dtype).reshape(1, model.args.dim).copy()
        self.params = dict(model.params, **{SCORE: self.score})
        self.logp_weight = None
        if logp_weight is not None:
            self.logp_weight = np.asarray(logp_weight, dtype=np.float64).reshape(1).copy()
            if not np.isfinite(self.logp_weight[0]):
                raise ValueError(f"logp_weight must be a finite number, got {logp_weight!r}")
            self.params[LOGP] = self.logp_weight
        self._cache = self._read_cache = None

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
        if LOGP in self.params:
            grads[LOGP] = np.zeros(1)
        return grads

    def pool_weights(self, T, last, first=None):
        """-> w (B, T) float64, reward = sum_t w[b, t] values[b, t]: one-hot at last[b] ("last"), or uniform
        over the reply positions first[b]..last[b] ("mean", which needs `first`)."""
        last = np.asarray(last)
        if self.pooling == "last":
            w = np.zeros((len(last), T))
            w[np.arange(len(last)), last] = 1.0
            return w
        return reply_weights(T, first, last, "a reward model with pooling='mean'")

    def _read(self, tokens, row, first, last, keep=False):
        """The rewards of J replies inside B rows -> (J,) float64: reply j lies in row[j] at first[j]..last[j].

            reward_j = sum_t w[j, t] values[row_j, t]                          (the head, pooled)
                     + logp_weight * mean_{t in reply j} log p(tokens[row_j, t] | tokens[row_j, :t])

        The second term (only with logp_weight) is the reply's mean log-likelihood under the reward model's own
        LM head, read from the same forward: it sees a token the context did not call for (a name other than the
        one asked for) one token at a time, which the pooled head has to learn to compare through attention."""
        hidden = self.model.forward(tokens, return_hidden=True, keep=keep)
        v, head_c = losses.score_head_forward(hidden, self.score)
        w = self.pool_weights(v.shape[1], last, first)
        r = (v[row] * w).sum(1).astype(np.float64)
        lm = None
        if self.logp_weight is not None:
            logits, out_c = self.model.lm_head_forward(hidden)
            logp, lp_c = losses.token_logps_forward(logits, tokens)
            m = w if self.pooling == "mean" else reply_weights(v.shape[1], first, last,
                                                               "a reward model with logp_weight")
            ll = (logp[row] * m).sum(1).astype(np.float64)  # each reply's mean log-likelihood
            r = r + self.logp_weight[0] * ll
            lm = (out_c, lp_c, m, ll)
        self._read_cache = (head_c, lm, row, w, v.shape) if keep else None
        return r

    def _read_backward(self, dr):
        """dr (J,) d loss / d reward for the last _read(keep=True) -> grads keyed like `params`."""
        if self._read_cache is None:
            raise RuntimeError("no kept forward: call _read(..., keep=True) first")
        head_c, lm, row, w, shape = self._read_cache
        dv = np.zeros(shape)
        np.add.at(dv, row, dr[:, None] * w)  # a row holds several replies when packed
        dhidden, dscore = losses.score_head_backward(dv, head_c)
        doutput = None
        if lm is not None:
            out_c, lp_c, m, ll = lm
            dlogp = np.zeros(shape)
            np.add.at(dlogp, row, (dr * self.logp_weight[0])[:, None] * m)
            dh, doutput = self.model.lm_head_backward(losses.token_logps_backward(dlogp, lp_c), out_c)
            dhidden = dhidden + dh
        grads = self.model.backward_hidden(dhidden, doutput)
        grads[SCORE] = dscore
        if lm is not None:
            grads[LOGP] = np.array([np.dot(dr, lm[3])])
        return grads

    def rewards(self, tokens, last, batch_size=32, first=None):
        """tokens (B, T), last (B,) the index of each row's final token (first (B,): of its reply's first token)
        -> rewards (B,), no gradient.

        The rows go in batches of similar length, each cut after its longest row's last token: a reward is
        read at or before `last`, and a causal model's values there do not depend on what follows. Sampled
        replies padded to the longest of thousands carry much padding (RS's 2048 replies: 26 s in input
        order on 2 cores, 21 s so)."""
        last = np.asarray(last)
        first = None if first is None else np.asarray(first)
        out = np.empty(len(tokens))
        order = np.argsort(last, kind="stable")
        for i in range(0, len(tokens), batch_size):
            idx = order[i:i + batch_size]
            chunk = tokens[idx, :last[idx].max() + 1]
            f = None if first is None else first[idx]
            out[idx] = self._read(chunk, np.arange(len(idx)), f, last[idx])
        return out

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
        r = self._read(tokens, np.arange(2 * B), first, last, keep=True)
        loss, cache = losses.bradley_terry_forward(r[:B], r[B:], margin)
        dc, dr = losses.bradley_terry_backward(1.0, cache)
        return loss, self._read_backward(np.concatenate([dc, dr])), bt_metrics(loss, r[:B], r[B:])

    def packed_rewards(self, batch, keep=False):
        """batch: PackedRows -> rewards (J,) float64, one per reply, read inside its packed row (no gradient
        unless keep=True, for packed_loss_and_grads)."""
        return self._read(batch.tokens, batch.row, batch.first, batch.last, keep=keep)

    def packed_loss_and_grads(self, batch, margin=0.0):
        """Bradley-Terry over every ordered pair (better, worse) inside each packed row: one forward and one
        backward over the B rows -> (loss, grads, metrics), the loss the mean over all pairs of the batch (each
        pair weighs as much as in the unpacked loss).

        Causal attention as in Meta's approximation: a reply sees the prompt and the replies before it in its
        row. No exact variant here: "the prompt and its own reply only" is not a contiguous key range, so the
        model's kv_start masks cannot say it; the exact computation is the unpacked one (loss_and_grads)."""
        better, worse = packed_pairs(batch)
        r = self.packed_rewards(batch, keep=True)
        loss, cache = losses.bradley_terry_forward(r[better], r[worse], margin)
        db, dw = losses.bradley_terry_backward(1.0, cache)
        dr = np.zeros(len(r))
        np.add.at(dr, better, db)  # a reply is the better one of some pairs and the worse one of others
        np.add.at(dr, worse, dw)
        return loss, self._read_backward(dr), bt_metrics(loss, r[better], r[worse])


def bt_metrics(loss, r_better, r_worse):
    return {"loss": loss, "accuracy": float(np.mean(r_better > r_worse)),
            "rewards/chosen": float(r_better.mean()), "rewards/rejected": float(r_worse.mean()),
            "rewards/margins": float(np.mean(r_better - r_worse))}


def reply_weights(T, first, last, who="this reward"):
    """-> (J, T) float64, uniform over each reply's positions first[j]..last[j] (rows summing to 1)."""
    last = np.asarray(last)
    if first is None:
        raise ValueError(f"{who} needs `first`, the index of each reply's first token")
    first = np.asarray(first)
    if first.shape != last.shape or np.any(first > last) or np.any(first < 1):
        raise ValueError(f"first must be ({len(last)},) indices with 1 <= first <= last, got {first}")
    t = np.arange(T)
    w = ((t >= first[:, None]) & (t <= last[:, None])).astype(np.float64)
    return w / w.sum(1, keepdims=True)


def reply_first(prompts):
    """(B,) the index of each reply's first token in rows(prompts, replies): the prompt's length."""
    return np.array([len(p) for p in prompts])


def reply_span(mask):
    """response mask (B, T) bool, True on each row's reply tokens -> (first, last) (B,): the index of each
    reply's first and last token: for a prompt and a reply, reply_first(prompts) and rows()'s `last`. A row
    without a reply (its prompt already filled max_seq_len) gets last = T - 1 and first = 1 (T > 1): the
    bounds 1 <= first <= last that pool_weights asks of every row."""
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    return np.clip(np.argmax(mask, axis=1), 1, last), last


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


def group_pairs(groups):
    """Groups (prompt, [replies best first]) -> every ordered (prompt, better, worse) pair: the unpacked data of
    the same rankings."""
    return [pair for prompt, replies in groups for pair in ranked_pairs(prompt, replies)]


class PackedRows(NamedTuple):
    """B packed rows holding J replies in all; the reply arrays are flat over the batch, in row order."""
    tokens: np.ndarray  # (B, T) int64: prompt, then the row's replies, right-padded
    row: np.ndarray  # (J,) the row of each reply
    first: np.ndarray  # (J,) the index of its first token in that row
    last: np.ndarray  # (J,) the index of its final <|eot_id|>
    rank: np.ndarray  # (J,) its place in its group's ranking, 0 = best


def check_group(prompt, replies, eot_id, max_seq_len=None, where="group"):
    """A group is a non-empty prompt and >= 2 distinct replies, each ending with <|eot_id|> (which marks where one
    reply ends and the next begins in a packed row); prompt + replies must fit max_seq_len."""
    if len(prompt) == 0:
        raise ValueError(f"{where}: the prompt is empty (a packed row starts with the prompt)")
    if len(replies) < 2 or len({tuple(r) for r in replies}) != len(replies):
        raise ValueError(f"{where}: a group needs >= 2 distinct replies ranked best first, got {len(replies)} "
                         f"replies of which {len({tuple(r) for r in replies})} distinct")
    for k, r in enumerate(replies):
        if len(r) == 0 or r[-1] != eot_id:
            raise ValueError(f"{where}: reply {k} does not end with <|eot_id|> ({eot_id}); in a packed row it "
                             "is what ends one reply before the next")
    n = len(prompt) + sum(len(r) for r in replies)
    if max_seq_len is not None and n > max_seq_len:
        raise ValueError(f"{where}: the packed row (prompt and {len(replies)} replies) is {n} tokens, longer than "
                         f"max_seq_len={max_seq_len}; drop replies from the group or use unpacked pairs")


def fit_groups(groups, max_seq_len):
    """-> the groups whose packed row fits max_seq_len, each cut to the longest best-first prefix of its ranking
    that fits (a group left with < 2 replies is dropped): K long replies may not fit one row."""
    out = []
    for prompt, replies in groups:
        n, k = len(prompt), 0
        while k < len(replies) and n + len(replies[k]) <= max_seq_len:
            n, k = n + len(replies[k]), k + 1
        if k >= 2:
            out.append((prompt, list(replies[:k])))
    return out


def packed_row(prompt, replies_best_first, rng, eot_id, max_seq_len=None):
    """One group -> (ids, first (K,), last (K,), rank (K,)): the prompt once, then the K replies in the order
    rng.permutation(K) draws (Llama 3 shuffles them so that position in the row says nothing about rank)."""
    check_group(prompt, replies_best_first, eot_id, max_seq_len)
    order = rng.permutation(len(replies_best_first))
    ids, first, last = list(prompt), [], []
    for k in order:
        first.append(len(ids))
        ids += list(replies_best_first[k])
        last.append(len(ids) - 1)
    return ids, np.array(first), np.array(last), order


def packed_rows(groups, rng, eot_id, max_seq_len=None, pad_id=0):
    """Groups (prompt, [replies best first]) -> PackedRows, one row per group, each shuffled by `rng`."""
    if len(groups) == 0:
        raise ValueError("no groups to pack")
    rows_ = [packed_row(p, rs, rng, eot_id, max_seq_len) for p, rs in groups]
    tokens, _ = pad_right([ids for ids, *_ in rows_], pad_id=pad_id)
    row = np.concatenate([np.full(len(f), b) for b, (_, f, _, _) in enumerate(rows_)])
    cat = lambda i: np.concatenate([r[i] for r in rows_])
    return PackedRows(tokens, row, cat(1), cat(2), cat(3))


def packed_pairs(batch):
    """-> (better (P,), worse (P,)): indices into the batch's replies of every ordered pair of one row."""
    same = batch.row[:, None] == batch.row[None, :]
    better, worse = np.nonzero(same & (batch.rank[:, None] < batch.rank[None, :]))
    return better, worse


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
             progress=False, grad_clip=1.0, eval_pairs=None, packed=False):
    """Bradley-Terry training -> log records. packed=False: `pairs` are (prompt, better, worse) id triples and a
    step draws batch_size of them, two rows each. packed=True: `pairs` are groups (prompt, [replies best first],
    see group_pairs for the same data unpacked) and a step draws batch_size groups, one packed row each (every
    ordered pair of a row is a term). eval_pairs are (prompt, better, worse) triples scored in separate rows, as
    the reward model is used afterwards."""
    if not pairs:
        raise ValueError("no preference groups" if packed else "no preference pairs")
    eot_id = None
    if packed:
        if rm.tokenizer is None:
            raise ValueError("packed reward-model training needs the model's tokenizer (its <|eot_id|>)")
        eot_id = rm.tokenizer.eot_id
        for i, (prompt, replies) in enumerate(pairs):  # all bad input now, not at the step that draws it
            check_group(prompt, replies, eot_id, rm.args.max_seq_len, where=f"group {i}")
    config = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, n_pairs=len(pairs), pooling=rm.pooling)
    if rm.logp_weight is not None:  # only then: run folders made before the option still resume
        config["logp_weight"] = float(rm.logp_weight[0])
    if packed:  # only then: run folders made before the option still resume
        config.update(packed=True, n_groups=config.pop("n_pairs"))
    run = StageRun(out, "rm", config, resume=resume)
    opt = AdamW(rm.params, lr=lr, weight_decay=0.0)

    def step_fn(step):
        batch = rm_step_batch(pairs, seed, step, batch_size, eot_id)
        if packed:
            loss, grads, m = rm.packed_loss_and_grads(batch)
        else:
            loss, grads, m = rm.loss_and_grads(*batch)
        m["grad_norm"] = update(opt, grads, warmup_lr(step, lr, steps), grad_clip)
        if eval_pairs and ((step + 1) % save_every == 0 or step + 1 == steps):
            m["eval_accuracy"] = pair_accuracy(rm, eval_pairs)
        return m

    records = run_steps(run, steps, step_fn, rm.params, opt, rm.tokenizer, rm.args, save_every, progress)
    run.plot(["loss", "accuracy", "rewards/margins", "eval_accuracy"])
    return records


def rm_step_batch(data, seed, step, batch_size, eot_id=None):
    """The batch of train_rm's step `step`, a function of (seed, step) only (exact resume). eot_id None: `data` are
    pairs -> the arguments of loss_and_grads (chosen, chosen_last, rejected, rejected_last, margin, chosen_first,
    rejected_first); else `data` are groups -> PackedRows, the order of each row's replies drawn from the same rng."""
    rng = step_rng(seed, step)
    idx = rng.integers(0, len(data), batch_size)
    if eot_id is not None:
        return packed_rows([data[i] for i in idx], rng, eot_id)
    prompts = [data[i][0] for i in idx]
    tc, lc = rows(prompts, [data[i][1] for i in idx])
    tr, lr = rows(prompts, [data[i][2] for i in idx])
    first = reply_first(prompts)
    return tc, lc, tr, lr, 0.0, first, first


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
    return RewardModel(model, score=params[SCORE], pooling=pooling, logp_weight=params.get(LOGP))
