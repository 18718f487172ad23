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
More generally the cache keeps the last prompt and the next one reuses the longest prefix they share.
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
    # BEGIN SOLUTION ex21
    tokens = list(context_ids) + list(continuation_ids)
    logits = forward_logits(model, np.array([tokens[:-1]]))  # (1, T-1, V): position t predicts t+1
    n_ctx = len(context_ids)
    lp = log_softmax(logits[0, n_ctx - 1:])  # (len(cont), V): the predictions of the continuation
    return float(sum(lp[j, t] for j, t in enumerate(continuation_ids)))
    # END SOLUTION


class PrefixCache:
    """A KV cache that holds the keys and values of the last prompt; the next prompt reuses the part it
    shares with it (its longest common prefix) and runs only the rest.

    Built with the k-shot prefix of a subject (BOS, header, shots), which is computed once: every prompt of
    the subject starts with it, so per prompt only the question's own tokens are run. A prompt that shares
    less (another tokenization at the boundary, leave-one-out shots) is still exact: it reuses what it
    shares with the previous prompt, whatever that is. Positions beyond the current prompt hold stale
    keys/values that are never read (a forward at start_pos attends to positions < start_pos + T only).

    cache.cache_k[l] is (rows, n_kv_heads, max_len, head_dim). Prompts run on row 0; rows 1.. receive a copy
    of row 0 (only the positions they lack) when the continuations are several tokens and run as a batch.
    """

    def __init__(self, model, prefix_ids, max_len, rows=1):
        if max_len > model.args.max_seq_len:
            raise ValueError(f"prompts of up to {max_len} tokens do not fit the model's context of "
                             f"{model.args.max_seq_len} tokens (max_seq_len)")
        self.model, self.rows = model, rows
        self.cache = model.new_cache(rows, max_len)
        self.tokens = []  # the tokens whose keys/values row 0 holds, from position 0
        self.rows_valid = 0  # how many of them rows 1.. hold too
        self.n_forwards = 0  # forwards run on row 0, for the tests
        prefix_ids = [int(t) for t in prefix_ids]  # may be empty (0-shot, no header, no BOS)
        if prefix_ids:
            self._run(prefix_ids)  # the shared prefix, once

    def shared_length(self, context_ids):
        """How many leading tokens the context shares with what the cache holds (at most len(context) - 1:
        the last context token must be run to get the prediction of the first continuation token)."""
        n = min(len(self.tokens), len(context_ids) - 1)
        for i in range(n):
            if self.tokens[i] != context_ids[i]:
                return i
        return n

    def _run(self, context_ids):
        """Run the context's tokens after the shared part on row 0 -> log-probabilities (V,) of the token
        that follows the context."""
        L = self.shared_length(context_ids)
        logits = forward_logits(self.model, np.array([context_ids[L:]]), L, self.cache, last_only=True)
        self.n_forwards += 1
        self.tokens = list(context_ids)
        self.rows_valid = min(self.rows_valid, L)
        return log_softmax(logits[0, -1])

    def _copy_row0(self, stop):
        """Rows 1.. get row 0's keys and values at the positions they lack, up to `stop` (a copy, not a
        recomputation)."""
        start = self.rows_valid
        if self.rows > 1 and stop > start:
            for layer_cache in (*self.cache.cache_k, *self.cache.cache_v):
                layer_cache[1:, :, start:stop] = layer_cache[:1, :, start:stop]
        self.rows_valid = stop

    def loglikelihoods(self, context_ids, continuations):
        """[log P(cont | context) for cont in continuations] (float64), reusing the cached keys/values."""
        context_ids = [int(t) for t in context_ids]
        n, longest = len(continuations), max(len(c) for c in continuations)
        S = len(context_ids)
        if S + longest - 1 > self.cache.max_seq_len:
            raise ValueError(f"a prompt of {S} tokens + a continuation of {longest} does not fit the cache "
                             f"of {self.cache.max_seq_len} positions")
        if longest > 1 and n > self.rows:
            raise ValueError(f"{n} multi-token continuations need a cache with {n} rows, this one has {self.rows}")
        last = self._run(context_ids)  # (V,): the prediction after the whole context
        out = np.array([last[c[0]] for c in continuations], dtype=np.float64)
        if longest > 1:
            # the rest of every continuation as one batch: row j holds continuation j (right-padded; a pad
            # only influences positions after it, which are not read). Rows 1.. need the context first.
            self._copy_row0(S)
            pad = continuations[0][0]
            rows = np.array([c[:-1] + [pad] * (longest - len(c)) for c in continuations])  # (n, longest-1)
            lp = log_softmax(forward_logits(self.model, rows, S, self.cache))  # (n, longest-1, V)
            for j, c in enumerate(continuations):
                out[j] += sum(lp[j, t - 1, c[t]] for t in range(1, len(c)))
        return out
