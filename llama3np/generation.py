"""Text generation with the KV cache: prefill the prompt once, then one forward per new token.

    ids = generate(model, prompt_tokens, max_new_tokens=100)       # the new token ids
    for id in generate_stream(model, prompt_tokens, 100): ...      # the same, one at a time

Decoding step by step (Meta's `Llama.generate`):
    cache = model.new_cache(B)
    logits = model.forward(prompt, start_pos=0, cache=cache)        # prefill: all prompt positions at once
    loop:  next = sample(logits[:, -1])                             # temperature, top-k, top-p
           logits = model.forward(next[:, None], start_pos=pos, cache=cache)   # ONE new position
The cache keeps every earlier position's keys and values, so each new token costs one position's
work instead of recomputing the whole sequence.
"""
import warnings

import numpy as np


class ContextLimitWarning(UserWarning):
    """Fewer new tokens than asked for fit in the model's context (generation stops at its end)."""


def sample_next(logits, temperature=0.6, top_p=0.9, top_k=None, rng=None):
    """logits (B, V) -> next ids (B,). temperature 0 is greedy (argmax).

    Temperature divides the logits (below 1 sharpens the distribution); top-k keeps the k likeliest
    tokens; top-p (nucleus, Meta's `sample_top_p`) keeps the smallest set of likeliest tokens whose
    probabilities add up to p. The kept probabilities are renormalised and one token is drawn.
    """
    if temperature == 0:
        # argmax needs no float64 copy: widening float32 is exact, so the largest (the first of ties) is the
        # same (a decode step of `tiny` spends ~0.5 ms in all; the copy of 4096 logits took ~10 us of it)
        return np.asarray(logits).argmax(-1)
    logits = np.asarray(logits, dtype=np.float64)
    rng = np.random.default_rng() if rng is None else rng
    z = logits / temperature
    if top_k is not None:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]  # the k-th largest logit per row
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(-1, keepdims=True)  # for exp: the largest becomes 0, nothing overflows
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    if top_p >= 1.0:
        return _draw_unsorted(probs, top_p, rng)
    out = np.empty(len(probs), dtype=np.int64)
    # BEGIN SOLUTION ex15
    for b in range(len(probs)):
        order = _likeliest_first(probs[b], top_p)
        p = probs[b][order]
        cum = np.cumsum(p)
        p = np.where(cum - p > top_p, 0.0, p)  # drop a token if the ones before it already reach top_p
        cum = np.cumsum(p)
        # one uniform draw, inverse-CDF: the first token whose cumulative probability exceeds it
        idx = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(order) - 1)
        out[b] = order[idx]
    # END SOLUTION
    return out


def _draw_unsorted(probs, top_p, rng):
    """The loop of sample_next for top_p >= 1, every row at once: with no nucleus to find, each row keeps
    its token order (_likeliest_first's arange) and the same arithmetic runs along axis 1 (a cumulative
    sum is sequential along a row either way), and rng.random(B) gives the B draws that B calls of
    rng.random() give: the same tokens. Rejection sampling and PPO sample at top_p 1 in batches of 128
    rows, where the loop took ~17% of the time of sampling (3.7 ms a step)."""
    cum = np.cumsum(probs, axis=1)
    p = np.where(cum - probs > top_p, 0.0, probs)
    cum = np.cumsum(p, axis=1)
    u = rng.random(len(probs)) * cum[:, -1]
    # searchsorted(cum, u, side="right") on a non-decreasing row: how many of its values are <= u
    return np.minimum((cum <= u[:, None]).sum(1), probs.shape[1] - 1)


def _likeliest_first(p, top_p, k=1024):
    """Token ids by decreasing probability, at least up to where they add up to top_p.

    Sorting Llama 3's 128,256 probabilities for every token costs ~10 ms; the nucleus is nearly
    always among the few hundred likeliest, so we sort only the k largest (found by a partition in
    linear time) and fall back to the full sort when they do not reach top_p.
    """
    if top_p >= 1.0:
        return np.arange(len(p))  # nothing is cut: any order will do
    if len(p) > 4 * k:
        top = np.argpartition(-p, k)[:k]  # the k largest, in no order
        top = top[np.argsort(-p[top], kind="stable")]
        if p[top].sum() >= top_p:
            return top
    return np.argsort(-p, kind="stable")


def _check(model, prompt_tokens, max_new_tokens, temperature, top_p, top_k):
    if isinstance(prompt_tokens, np.ndarray):
        if prompt_tokens.dtype.kind not in "iu":
            raise TypeError(f"prompt token ids must be integers, got an array of {prompt_tokens.dtype}")
        prompt_tokens = prompt_tokens.tolist()
    bad = [t for t in prompt_tokens if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_))]
    if bad:  # int(1.9) would silently make it 1
        raise TypeError(f"prompt token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
    prompt = [int(t) for t in prompt_tokens]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. the BOS id)")
    V = model.args.vocab_size
    if min(prompt) < 0 or max(prompt) >= V:
        raise ValueError(f"prompt token ids must be in [0, {V}), got min {min(prompt)}, max {max(prompt)}")
    ctx = model.args.max_seq_len
    if len(prompt) >= ctx:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {ctx} (max_seq_len), "
                         "which leaves no room to generate: shorten the prompt")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= V):
        raise ValueError(f"top_k must be None or an int in [1, {V}], got {top_k!r}")
    n_new = min(int(max_new_tokens), ctx - len(prompt))
    if n_new < max_new_tokens:
        warnings.warn(f"only {n_new} of the {max_new_tokens} new tokens fit: the prompt has {len(prompt)} tokens and "
                      f"the model's context is {ctx} (max_seq_len), so generation stops at its end",
                      ContextLimitWarning, stacklevel=3)
    return prompt, n_new


def generate_stream(model, prompt_tokens, max_new_tokens, temperature=0.6, top_p=0.9, top_k=None, seed=None,
                    stop_tokens=None, use_cache=True):
    """Yield new token ids one at a time (stops after max_new_tokens, at the context's end or a stop token).

    When the context's end comes first (prompt + max_new_tokens > max_seq_len) a ContextLimitWarning
    says so at the call.

    The stop token itself is not yielded. stop_tokens defaults to model.tokenizer.stop_tokens when the
    model has a tokenizer. use_cache=False recomputes the whole sequence for every token (slow; it
    exists to test that the cache changes nothing).
    """
    # checked here, so a bad argument fails at the call and not at the first next()
    prompt, n_new = _check(model, prompt_tokens, max_new_tokens, temperature, top_p, top_k)
    if stop_tokens is None:
        stop_tokens = getattr(getattr(model, "tokenizer", None), "stop_tokens", None) or []
    stop = set(int(t) for t in stop_tokens)
    return _decode(model, prompt, n_new, stop, np.random.default_rng(seed),
                   dict(temperature=temperature, top_p=top_p, top_k=top_k), use_cache)


def _decode(model, prompt, n_new, stop, rng, sampling, use_cache):
    if n_new == 0:
        return
    tokens = list(prompt)
    if use_cache:
        cache = model.new_cache(1, max_seq_len=len(prompt) + n_new)
        logits = model.forward(np.array([prompt]), start_pos=0, cache=cache)  # (1, T, V): prefill
    else:
        logits = model.forward(np.array([tokens]), keep=False)  # no backward will follow: keep nothing
    for i in range(n_new):
        next_id = int(sample_next(logits[:, -1], rng=rng, **sampling)[0])
        if next_id in stop:
            return
        yield next_id
        tokens.append(next_id)
        if i == n_new - 1:
            return
        if use_cache:
            logits = model.forward(np.array([[next_id]]), start_pos=len(tokens) - 1, cache=cache)  # (1, 1, V)
        else:
            logits = model.forward(np.array([tokens]), keep=False)


def generate(model, prompt_tokens, max_new_tokens, temperature=0.6, top_p=0.9, top_k=None, seed=None,
             stop_tokens=None, stream=False, use_cache=True):
    """The new token ids for one prompt (a list of ints); a list of lists for a batch of prompts.

    stream=True returns the generator of `generate_stream` instead (one prompt). Same seed, same ids.
    """
    kwargs = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_tokens=stop_tokens,
                  use_cache=use_cache)
    batched = len(prompt_tokens) > 0 and isinstance(prompt_tokens[0], (list, tuple, np.ndarray))
    if stream:
        if batched:
            raise ValueError("stream=True takes one prompt (a list of ints), not a batch")
        return generate_stream(model, prompt_tokens, max_new_tokens, **kwargs)
    if batched:
        # each prompt decoded on its own: simple, and the result does not depend on the batch's padding
        out = []
        for i, p in enumerate(prompt_tokens):
            kw = dict(kwargs, seed=None if seed is None else [seed, i])
            out.append(list(generate_stream(model, p, max_new_tokens, **kw)))
        return out
    return list(generate_stream(model, prompt_tokens, max_new_tokens, **kwargs))


def complete(model, text, max_new_tokens=100, **kwargs):
    """Text in, text out, with the model's tokenizer: BOS + text, then the continuation as a string."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer (model.tokenizer is None): pass token ids to generate()")
    ids = tok.encode(text, bos=True, eos=False)
    return tok.decode(generate(model, ids, max_new_tokens, **kwargs))


# ----------------------------------------------------------------------------------------------------
# many prompts at once in one KV cache (rejection sampling, PPO rollouts)


def sample_batch(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=None, seed=None,
                 stop_tokens=None, rows_at_once=128):
    """Sample a reply to every prompt in one batched decode -> (replies, logps).

    replies[b]: the new ids of prompt b, INCLUDING the stop token that ended it (a reply without one was cut
    at max_new_tokens); logps[b] (len(replies[b]),) float64: log p(token | everything before it) under the
    model at temperature 1 (what PPO's ratio and KL need, whatever the sampling settings were).

    The prompts have different lengths, so they are LEFT-padded to one length L: row b's prompt sits at
    positions n_pad[b]..L-1 and every new token lands at the same position in all rows, one forward per
    step for the whole batch. kv_start = n_pad[b] keeps the pad positions out of every attention; RoPE
    only sees position differences, so a row's logits are those of its prompt alone (up to rounding).

    More than `rows_at_once` prompts decode in a few equal groups, one after the other, with the same L and
    the same draws (row b's uniform at step i is the (i * B + b)-th of the generator, as when all B rows
    decode together): the same replies. 256 replies of the demo's tiny model: 7.3 s at once, 5.6-6.0 s as
    two groups of 128 (with 256 rows the KV cache and the activations no longer stay in the caches).
    """
    prompts = [_check(model, p, max_new_tokens, temperature, top_p, top_k)[0] for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    if isinstance(rows_at_once, bool) or not isinstance(rows_at_once, (int, np.integer)) or rows_at_once < 1:
        raise ValueError(f"rows_at_once must be a whole number >= 1, got {rows_at_once!r}")
    if stop_tokens is None:
        stop_tokens = getattr(getattr(model, "tokenizer", None), "stop_tokens", None) or []
    stop = np.array(sorted(set(int(t) for t in stop_tokens)), dtype=np.int64)
    B, L = len(prompts), max(len(p) for p in prompts)
    n_new = min(int(max_new_tokens), model.args.max_seq_len - L)
    n_pad = np.array([L - len(p) for p in prompts])
    tokens = np.zeros((B, L), dtype=np.int64)  # pad id 0: never attended, so any id will do
    for b, p in enumerate(prompts):
        tokens[b, n_pad[b]:] = p
    if n_new <= 0:
        return [[] for _ in range(B)], [np.zeros(0) for _ in range(B)]
    # every uniform the generator would give one decode of all B rows: B per step (sample_next draws one a row)
    draws = np.random.default_rng(seed).random((n_new, B)) if temperature != 0 else np.zeros((n_new, B))
    groups = max(1, B // int(rows_at_once))  # groups of at least rows_at_once rows (smaller ones
    size = -(-B // groups)  # decode more steps for fewer rows each: 130 rows as 2 x 65 took 1.2x as long)
    replies, logps = [], []
    for g0 in range(0, B, size):
        rows = slice(g0, g0 + size)
        r, lp = _decode_rows(model, tokens[rows], n_pad[rows], n_new, draws[:, rows], temperature, top_p, top_k,
                             stop)
        replies += r
        logps += lp
    return replies, logps


class _Draws:
    """Stands in for sample_next's Generator for one step: hands out that step's uniforms in order
    (random() one at a time, or random(n))."""

    def __init__(self, u):
        self.u, self.next = u, 0

    def random(self, size=None):
        n = 1 if size is None else int(size)
        out = self.u[self.next:self.next + n]
        self.next += n
        return out[0] if size is None else out


def _decode_rows(model, tokens, n_pad, n_new, draws, temperature, top_p, top_k, stop):
    """sample_batch's decode of one group of rows, left-padded (n_pad), with draws[i] for the rows at step i."""
    B, L = tokens.shape
    replies, logps = [[] for _ in range(B)], [[] for _ in range(B)]
    cache = model.new_cache(B, max_seq_len=L + n_new)
    logits = model.forward(tokens, 0, cache, kv_start=np.repeat(n_pad[:, None], L, axis=1))[:, -1]  # (B, V)
    done = np.zeros(B, dtype=bool)
    for i in range(n_new):
        z = np.asarray(logits, dtype=np.float64)
        next_ids = sample_next(z, temperature=temperature, top_p=top_p, top_k=top_k, rng=_Draws(draws[i]))
        m = z.max(-1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(-1))  # log-softmax normaliser at temperature 1
        lp = z[np.arange(B), next_ids] - lse
        for b in np.flatnonzero(~done):
            replies[b].append(int(next_ids[b]))
            logps[b].append(float(lp[b]))
        done |= np.isin(next_ids, stop)
        if done.all() or i == n_new - 1:
            break
        logits = model.forward(next_ids[:, None], L + i, cache, kv_start=n_pad[:, None])[:, -1]
    return replies, [np.array(x) for x in logps]
