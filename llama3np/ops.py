"""The ops of Llama 3, each a forward/backward pair in plain NumPy: the reference.

Contract (as in CS231n's layer files and llm.c): `*_forward(inputs...) -> (out, cache)` and
`*_backward(dout, cache) -> gradients`, pure functions on arrays. The model composes them; its backward
calls the backwards in reverse order. Everything works in float32 and float64 (float64 for gradient
checks against finite differences).

Shapes: B batch, T sequence, C = dim, H = n_heads, KV = n_kv_heads, hd = head_dim, S = keys in view.

This module imports nothing from the package: every line here is NumPy. The model reaches the hot
ops (linear_*, attention_*) through `llama3np.backend`, which sends float32 work to the C kernels when
they are active and everything else here; the functions of this file are the reference both are
tested against.
"""
import numpy as np

# ----------------------------------------------------------------------------------------------------
# embedding: tokens (B, T) -> rows of the table (B, T, C)


def embedding_forward(tokens, weight):
    out = weight[tokens]  # (B, T, C)
    return out, (tokens, weight.shape)


def embedding_backward(dout, cache):
    tokens, shape = cache
    # BEGIN SOLUTION ex02
    dweight = np.zeros(shape, dtype=dout.dtype)
    # a token that appears several times gets the sum of its gradients: scatter-add, not assignment
    np.add.at(dweight, tokens.reshape(-1), dout.reshape(-1, shape[1]))
    # END SOLUTION
    return dweight


# ----------------------------------------------------------------------------------------------------
# RMSNorm: y = x / rms(x) * weight, rms(x) = sqrt(mean(x^2) + eps) over the last axis.
# Unlike LayerNorm there is no mean subtraction and no bias: only the scale is normalised.


def rmsnorm_forward(x, weight, eps):
    # BEGIN SOLUTION ex04a
    # mean(x^2) as sum / C: the same bits as np.mean, without its ~4 us of Python (twice per layer in
    # every decode step)
    rstd = 1.0 / np.sqrt(np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1] + eps)  # (B, T, 1)
    xhat = x * rstd  # (B, T, C)
    return xhat * weight, (xhat, rstd, weight)
    # END SOLUTION


def rmsnorm_backward(dout, cache):
    xhat, rstd, weight = cache
    # BEGIN SOLUTION ex04b
    dweight = np.sum(dout * xhat, axis=tuple(range(dout.ndim - 1)))
    dxhat = dout * weight
    # xhat = x * rstd and rstd depends on every x of the row, hence the projection term:
    # dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
    dx = rstd * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dweight
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# linear (no bias anywhere in Llama): y = x @ w.T, w of shape (out, in) as in PyTorch and Meta's files.
# `backend.linear_*` are the same functions with the products on the C kernels when they are active.


def linear_forward(x, weight, matmul=np.matmul):
    """x (..., in), weight (out, in) -> y (..., out). `matmul` does the 2-D product (the C kernel's, via
    backend.linear_forward); every other line is the same for both."""
    x2 = x.reshape(-1, x.shape[-1])  # (B*T, in)
    y = matmul(x2, weight.T)  # (B*T, out); weight.T is a view, no copy
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x, weight)


def linear_backward(dout, cache, matmul=np.matmul):
    return linear_backward_input(dout, cache, matmul), linear_backward_weight(dout, cache, matmul)


# The two halves of linear_backward. The previous layer waits only for dx; dweight can be computed
# later (zero-bubble pipeline schedules fill their idle time with it), so each half stands alone.
def linear_backward_input(dout, cache, matmul=np.matmul):
    # BEGIN SOLUTION ex03
    x, weight = cache
    return matmul(dout.reshape(-1, dout.shape[-1]), weight).reshape(x.shape)  # (B*T, out) @ (out, in)
    # END SOLUTION


def linear_backward_weight(dout, cache, matmul=np.matmul):
    # BEGIN SOLUTION ex03
    x, _ = cache
    return matmul(dout.reshape(-1, dout.shape[-1]).T, x.reshape(-1, x.shape[-1]))  # (out, in)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# RoPE: rotate each adjacent pair (x[2i], x[2i+1]) of a head by the angle pos * freqs[i].
# A rotation by angle(m) on q and angle(n) on k leaves q.k depending on m - n only: relative positions.


def rope_frequencies(args):
    """inv_freq (head_dim/2,) float64: theta^(-2i/hd), with Llama 3.1's long-context scaling if enabled.

    The scaling (Meta's `apply_scaling`) keeps high frequencies (wavelength < original_context /
    high_freq_factor), divides low ones (wavelength > original_context / low_freq_factor) by `factor`,
    and blends smoothly in between, so a model trained at 8K tokens reads 128K without retuning the
    fine-grained (short-wavelength) positions.
    """
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if not args.use_scaled_rope:
        return freqs
    factor, low, high = args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_len = args.rope_original_max_seq_len
    wavelen = 2 * np.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return np.where(wavelen < old_len / high, freqs, np.where(wavelen > old_len / low, freqs / factor, blended))


def rope_cos_sin(freqs, start_pos, seqlen, dtype):
    """cos, sin of shape (T, hd/2) for positions start_pos .. start_pos+T-1 (angles in float64)."""
    # np.outer's products, without its Python wrapper (called for every decoded token)
    angles = np.arange(start_pos, start_pos + seqlen, dtype=np.float64)[:, None] * freqs
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope_forward(x, cos, sin):
    """x (B, T, n, hd) -> rotated x; cos/sin (T, hd/2)."""
    # BEGIN SOLUTION ex06a
    x0, x1 = x[..., 0::2], x[..., 1::2]  # (B, T, n, hd/2) the two members of each pair
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2) broadcast over heads
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out, (cos, sin)
    # END SOLUTION


def rope_backward(dout, cache):
    # BEGIN SOLUTION ex06b
    # a rotation's inverse is its transpose: rotate the gradient by the negative angle
    cos, sin = cache
    return rope_forward(dout, cos, -sin)[0]
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# causal grouped-query attention, the reference for the fused C kernel (same signature).
# q (B, H, T, hd); k, v (B, KV, S, hd) with S >= T: the queries are the LAST T of the S positions, so a
# KV-cache decode step (T=1, S=start_pos+1) and a full forward (S=T) are the same code. Query head h
# reads kv head h // (H // KV): we view q as (B, KV, G, T, hd) and broadcast k, v over the G group
# members instead of copying them (Meta's repeat_kv, without the copy).
#
# kv_start (B, T) ints, optional: query i of row b sees only keys j >= kv_start[b, i]. With several
# documents packed in one row (Llama 3: "an attention mask that prevents self-attention between
# different documents within the same sequence"), kv_start is where the query's document begins, so
# no document reads another; with left-padded rows in one KV cache it is the row's first real
# position. A query always sees itself (kv_start is capped at its own position), so no row is empty.


def kv_start_from_doc_ids(doc_ids):
    """doc_ids (B, T) -> kv_start (B, T) int64: the index where each position's document begins.

    A document is a run of equal ids: a change of id starts a new document (an id that comes back
    later starts another one, it does not rejoin the earlier run)."""
    doc_ids = np.asarray(doc_ids)
    if doc_ids.ndim != 2 or doc_ids.dtype.kind not in "iub":
        raise ValueError(f"doc_ids must be a (batch, seqlen) integer array, got shape {doc_ids.shape} "
                         f"and dtype {doc_ids.dtype}")
    B, T = doc_ids.shape
    idx = np.broadcast_to(np.arange(T), (B, T))
    new_doc = np.ones((B, T), dtype=bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return np.maximum.accumulate(np.where(new_doc, idx, 0), axis=1).astype(np.int64)


def _visible(T, S, kv_start):
    """(T, S) or (B, 1, 1, T, S) bool: which keys each query may read (causal, then kv_start)."""
    pos = S - T + np.arange(T)  # absolute position of each query
    visible = np.arange(S)[None, :] <= pos[:, None]  # (T, S) query i sits at S - T + i
    if kv_start is None:
        return visible
    start = np.minimum(kv_start, pos[None, :])  # (B, T): a query always sees itself
    return (visible[None] & (np.arange(S)[None, None, :] >= start[..., None]))[:, None, None]


def _attention_scores(q, k, causal, kv_start=None):
    """scaled (and masked) scores (B, KV, G, T, S) with q viewed as (B, KV, G, T, hd)."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, KV, H // KV, T, hd)  # (B, KV, G, T, hd)
    scores = (qg @ k[:, :, None].swapaxes(-1, -2)) / np.sqrt(hd).astype(q.dtype)  # (B, KV, G, T, S)
    if causal or kv_start is not None:
        visible = _visible(T, S, kv_start) if causal else \
            (np.arange(S)[None, None, :] >= kv_start[..., None])[:, None, None]
        scores = np.where(visible, scores, -np.inf)
    return qg, scores


def check_attention_shapes(q, k, v, kv_start=None):
    """Raise ValueError unless q (B, H, T, hd), k and v (B, KV, S, hd) fit together (H divisible by KV,
    S >= T) and kv_start is None or (B, T) integers in [0, S)."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q (B, H, T, hd) and k, v (B, KV, S, hd); got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    B, H, T, hd = q.shape
    if k.shape[0] != B or k.shape[3] != hd or k.shape[1] == 0 or H % k.shape[1] or k.shape[2] < T:
        raise ValueError(f"attention shapes do not fit: q {q.shape}, k {k.shape} (need same B and hd, "
                         "H divisible by KV, S >= T)")
    if kv_start is not None:
        kv_start = np.asarray(kv_start)
        if kv_start.shape != (B, T) or kv_start.dtype.kind not in "iu":
            raise ValueError(f"kv_start must be a ({B}, {T}) integer array (batch, queries), got shape "
                             f"{kv_start.shape} and dtype {kv_start.dtype}")
        if kv_start.size and (kv_start.min() < 0 or kv_start.max() >= k.shape[2]):
            raise ValueError(f"kv_start holds key positions outside [0, {k.shape[2]}): "
                             f"min {kv_start.min()}, max {kv_start.max()}")


def attention_forward(q, k, v, causal=True, kv_start=None):
    """out (B, H, T, hd) = softmax(q k^T / sqrt(hd) + mask) v, and lse (B, H, T) for the backward."""
    check_attention_shapes(q, k, v, kv_start)
    B, H, T, hd = q.shape
    _, scores = _attention_scores(q, k, causal, kv_start)
    # BEGIN SOLUTION ex05a
    # subtract the row max before exp so that exp never overflows; lse = log(sum(exp(scores)))
    m = np.max(scores, axis=-1, keepdims=True)
    p = np.exp(scores - m)
    denom = np.sum(p, axis=-1, keepdims=True)
    out = (p / denom) @ v[:, :, None]  # (B, KV, G, T, hd)
    lse = (m + np.log(denom))[..., 0]  # (B, KV, G, T)
    return out.reshape(B, H, T, hd), lse.reshape(B, H, T)
    # END SOLUTION


def attention_backward(dout, q, k, v, out, lse, causal=True, kv_start=None):
    """Gradients of attention_forward; the probabilities are recomputed from lse, not stored."""
    B, H, T, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    qg, scores = _attention_scores(q, k, causal, kv_start)
    # BEGIN SOLUTION ex05b
    p = np.exp(scores - lse.reshape(B, KV, G, T, 1))  # (B, KV, G, T, S) the softmax, recomputed
    doutg = dout.reshape(B, KV, G, T, hd)
    dv = np.sum(p.swapaxes(-1, -2) @ doutg, axis=2)  # (B, KV, S, hd): summed over the group
    dp = doutg @ v[:, :, None].swapaxes(-1, -2)  # (B, KV, G, T, S)
    # softmax backward: ds = p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = dout . out per row
    delta = np.sum(doutg * out.reshape(B, KV, G, T, hd), axis=-1, keepdims=True)
    ds = p * (dp - delta) / np.sqrt(hd).astype(q.dtype)
    dq = (ds @ k[:, :, None]).reshape(B, H, T, hd)
    dk = np.sum(ds.swapaxes(-1, -2) @ qg, axis=2)  # (B, KV, S, hd)
    return dq, dk, dv
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# SwiGLU's gate: silu(a) * b with a = w1 x, b = w3 x, silu(a) = a * sigmoid(a).
# The backward needs a itself (not only silu(a)) because silu's derivative depends on sigmoid(a).


def swiglu_forward(a, b):
    # BEGIN SOLUTION ex07
    sig = 1.0 / (1.0 + np.exp(-a))
    silu = a * sig
    return silu * b, (a, b, sig, silu)
    # END SOLUTION


def swiglu_backward(dout, cache):
    # BEGIN SOLUTION ex07
    a, b, sig, silu = cache
    da = dout * b * sig * (1.0 + a * (1.0 - sig))  # d silu/da = sig + a sig (1 - sig)
    db = dout * silu
    return da, db
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# cross-entropy over the vocabulary, averaged over the unmasked positions


def logsumexp(logits):
    """log(sum(exp(logits))) over the last axis, after subtracting the row max (so exp never overflows)."""
    m = np.max(logits, axis=-1, keepdims=True)
    return m[..., 0] + np.log(np.sum(np.exp(logits - m), axis=-1))


def token_nll(logits, targets):
    """-log softmax(logits)[target] per position: (..., V), (...) ints -> (nll (...), logsumexp (...))."""
    lse = logsumexp(logits)
    return lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse


def cross_entropy_forward(logits, targets, mask=None, token_nll=token_nll):
    """logits (B, T, V), targets (B, T) ints, mask (B, T) or None -> scalar mean negative log-likelihood.
    `token_nll` computes the per-position nll and lse (the C kernel's, via backend.cross_entropy_forward);
    every other line is the same for both."""
    nll, lse = token_nll(logits, targets)  # (B, T) each
    weights, count = loss_weights(nll.shape, nll.dtype, mask)
    return mean_loss(nll, weights, count), (logits, targets, lse, weights, count)


def loss_weights(shape, dtype, mask=None):
    """Each position's weight in the mean loss (1, or the mask's value) and their sum, the mean's divisor."""
    weights = np.ones(shape, dtype) if mask is None else mask.astype(dtype)
    count = weights.sum()
    if count == 0:
        raise ValueError("the mask selects no positions: the mean loss is undefined")
    return weights, count


def mean_loss(nll, weights, count):
    """The loss: the positions' nll weighted by loss_weights and divided by their sum (one expression for every
    path that computes it, so they give the same bits)."""
    return float(np.sum(nll * weights) / count)


def cross_entropy_backward(dloss, cache):
    logits, targets, lse, weights, count = cache
    # BEGIN SOLUTION ex08
    dlogits = np.exp(logits - lse[..., None])  # softmax probabilities
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1, axis=-1)
    dlogits *= (dloss * weights / count)[..., None].astype(dlogits.dtype)
    return dlogits
    # END SOLUTION
