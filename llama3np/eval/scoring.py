"""Multiple-choice scoring by log-likelihood: log P(continuation | context), summed over its tokens.

    ctx, conts = encode_choices(tokenizer, prompt, [" A", " B", " C", " D"])
    full   = [loglikelihood_full(model, ctx, c) for c in conts]      # the harness's way: 4 full forwards
    shared = PrefixCache(model, prefix_ids, max_len, rows=4)         # once per subject (the k-shot part)
    fast   = shared.loglikelihoods(ctx, conts)                       # == full, to rounding

Tokenization follows lm-evaluation-harness (`_encode_pair`): trailing whitespace of the context moves
to the continuation, the context is encoded alone, and the continuation's ids are those of
encode(context + continuation) after the context's length. With Llama 3's tokenizer "...Answer:" + " A"
gives the single token " A"; " 1" is two tokens (" ", "1"), whose log-probabilities are summed.

Why the cache is exact: a causal transformer's keys and values at position t depend only on tokens
0..t. A prefix shared by many prompts (BOS, the subject's header and its k-shot examples) therefore has
the same keys and values in every prompt, and computing them once changes nothing but the time.
Per prompt only the question's own tokens are run; the four answers are then a batch of four rows that
share the question's keys and values (copied into rows 1..3), one token each or a few for longer labels.
"""
import inspect

import numpy as np


def encode_choices(tokenizer, context, continuations, bos=True):
    """-> (context ids, [continuation ids, ...]) by lm-evaluation-harness's rule (see the module doc).

    bos=True puts <|begin_of_text|> first (Meta's evaluations; the harness only with add_bos_token).
    """
    if not isinstance(context, str) or not context:
        raise ValueError(f"the context must be a non-empty str, got {context!r}")
    n_spaces = len(context) - len(context.rstrip())
    moved = context[len(context) - n_spaces:] if n_spaces else ""
    context = context[:len(context) - n_spaces]
    ctx = tokenizer.encode(context, bos=bos, eos=False)
    out = []
    for cont in continuations:
        whole = tokenizer.encode(context + moved + cont, bos=bos, eos=False)
        ids = whole[len(ctx):]
        if not ids:
            raise ValueError(f"the continuation {cont!r} encodes to no tokens after {context[-40:]!r}")
        out.append(ids)
    if not ctx:
        raise ValueError("the context encodes to no tokens: pass bos=True or a longer context")
    return ctx, out


def log_softmax(logits):
    """(..., V) -> (..., V) log-probabilities in float64 (the max is subtracted first: no overflow)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def _accepts(fn, name):
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _lm_head(model):
    p = model.params
    return p["tok_embeddings.weight"] if model.args.tie_embeddings else p["output.weight"]


def forward_logits(model, tokens, start_pos=0, cache=None, last_only=False):
    """Logits (B, T or 1, V) for inference: no activations kept for a backward.

    last_only=True computes the LM head for the last position only when the model can return its hidden
    states (`return_hidden=True`): with a 128K vocabulary the head is ~10% of a 1B model's work per token.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    kw = {}
    if cache is None and _accepts(model.forward, "keep"):
        kw["keep"] = False  # no backward follows: hold no activations
    if last_only and _accepts(model.forward, "return_hidden") and hasattr(model, "params"):
        hidden = model.forward(tokens, start_pos, cache, return_hidden=True, **kw)  # (B, T, dim)
        return hidden[:, -1:] @ _lm_head(model).T  # (B, 1, V)
    logits = model.forward(tokens, start_pos, cache, **kw)
    if cache is None and not kw and getattr(model, "_acts", None) is not None:
        model._acts = None  # an older model API keeps them without a cache: drop them
    return logits[:, -1:] if last_only else logits


def loglikelihood_full(model, context_ids, continuation_ids):
    """log P(continuation | context) from one full forward over context + continuation (no cache).

    This is lm-evaluation-harness's way: every (prompt, choice) pair is recomputed from position 0.
    It is the reference the cached path is tested against.
    """
    tokens = list(context_ids) + list(continuation_ids)
    logits = forward_logits(model, np.array([tokens[:-1]]))  # (1, T-1, V): position t predicts t+1
    n_ctx = len(context_ids)
    lp = log_softmax(logits[0, n_ctx - 1:])  # (len(cont), V): the predictions of the continuation
    return float(sum(lp[j, t] for j, t in enumerate(continuation_ids)))


class PrefixCache:
    """A KV cache whose first P positions hold a fixed prefix, reused by every prompt that starts with it.

    cache.cache_k[l] is (rows, n_kv_heads, max_len, head_dim). Row 0 is where each prompt's own tokens go
    (positions P.. onwards, overwritten by the next prompt; stale positions beyond the current one are
    never read, because a forward at start_pos attends to positions < start_pos + T only). Rows 1.. get
    the prefix once, and the question's positions per prompt, so the continuations can run as a batch.
    A prompt that shares only L < P tokens with the prefix (a different tokenization at the boundary, a
    left-out shot) is still exact: it reuses positions < L and the prefix is restored afterwards.
    """

    def __init__(self, model, prefix_ids, max_len, rows=1):
        prefix_ids = [int(t) for t in prefix_ids]  # may be empty (0-shot, no header, no BOS)
        if max_len > model.args.max_seq_len:
            raise ValueError(f"prompts of up to {max_len} tokens do not fit the model's context of "
                             f"{model.args.max_seq_len} tokens (max_seq_len)")
        self.model, self.prefix, self.rows = model, prefix_ids, rows
        self.cache = model.new_cache(rows, max_len)
        self.n_prefix_forwards = 0  # how often the prefix was (re)computed, for the tests and the report
        self._fill(0)

    def _copy_row0(self, start, stop):
        """Rows 1.. get row 0's keys and values at positions start..stop-1 (a copy, not a recomputation)."""
        if self.rows > 1 and stop > start:
            for layer_cache in (*self.cache.cache_k, *self.cache.cache_v):
                layer_cache[1:, :, start:stop] = layer_cache[:1, :, start:stop]

    def _fill(self, start):
        """(Re)compute the prefix's positions start..P-1 in row 0, then copy them to the other rows."""
        P = len(self.prefix)
        if start < P:
            forward_logits(self.model, np.array([self.prefix[start:]]), start, self.cache, last_only=True)
            self._copy_row0(start, P)
            self.n_prefix_forwards += 1

    def shared_length(self, context_ids):
        """How many leading tokens the context shares with the prefix (at most len(context) - 1: the last
        context token must be run to get the prediction of the first continuation token)."""
        n = min(len(self.prefix), len(context_ids) - 1)
        for i in range(n):
            if self.prefix[i] != context_ids[i]:
                return i
        return n

    def loglikelihoods(self, context_ids, continuations):
        """[log P(cont | context) for cont in continuations] (float64), reusing the prefix's keys/values."""
        context_ids = [int(t) for t in context_ids]
        n, longest = len(continuations), max(len(c) for c in continuations)
        S = len(context_ids)
        if S + longest - 1 > self.cache.max_seq_len:
            raise ValueError(f"a prompt of {S} tokens + a continuation of {longest} does not fit the cache "
                             f"of {self.cache.max_seq_len} positions")
        if longest > 1 and n > self.rows:
            raise ValueError(f"{n} multi-token continuations need a cache with {n} rows, this one has {self.rows}")
        L = self.shared_length(context_ids)
        # the question's own tokens, on row 0, after the shared positions; only the last prediction matters
        last = log_softmax(forward_logits(self.model, np.array([context_ids[L:]]), L, self.cache,
                                          last_only=True)[0, -1])  # (V,)
        out = np.array([last[c[0]] for c in continuations], dtype=np.float64)
        if longest > 1:
            # the rest of every continuation as one batch: row j holds continuation j (right-padded; a pad
            # only influences positions after it, which are not read)
            self._copy_row0(L, S)
            pad = continuations[0][0]
            rows = np.array([c[:-1] + [pad] * (longest - len(c)) for c in continuations])  # (n, longest-1)
            lp = log_softmax(forward_logits(self.model, rows, S, self.cache))  # (n, longest-1, V)
            for j, c in enumerate(continuations):
                out[j] += sum(lp[j, t - 1, c[t]] for t in range(1, len(c)))
        if L < len(self.prefix):
            self._fill(L)  # this prompt overwrote prefix positions L..: put the prefix back
        return out
