"""The ops of Llama 3, each a forward/backward pair in plain NumPy.

Contract (as in CS231n's layer files and llm.c): `*_forward(inputs...) -> (out, cache)` and
`*_backward(dout, cache) -> gradients`, pure functions on arrays. The model composes them; its backward
calls the backwards in reverse order. Everything works in float32 and float64 (float64 for gradient
checks against finite differences).

Shapes: B batch, T sequence, C = dim, H = n_heads, KV = n_kv_heads, hd = head_dim, S = keys in view.
"""
import numpy as np

from . import backend  # matmul and attention go through it: the C kernels when active, else NumPy

# ----------------------------------------------------------------------------------------------------
# embedding: tokens (B, T) -> rows of the table (B, T, C)


def embedding_forward(tokens, weight):
    out = weight[tokens]  # (B, T, C)
    return out, (tokens, weight.shape)


def embedding_backward(dout, cache):
    tokens, shape = cache
    dweight = np.zeros(shape, dtype=dout.dtype)
    # a token that appears several times gets the sum of its gradients: scatter-add, not assignment
    np.add.at(dweight, tokens.reshape(-1), dout.reshape(-1, shape[1]))
    return dweight


# ----------------------------------------------------------------------------------------------------
# RMSNorm: y = x / rms(x) * weight, rms(x) = sqrt(mean(x^2) + eps) over the last axis.
# Unlike LayerNorm there is no mean subtraction and no bias: only the scale is normalised.


def rmsnorm_forward(x, weight, eps):
    # mean(x^2) as sum / C: the same bits as np.mean, without its ~4 us of Python (twice per layer in
    # every decode step)
    rstd = 1.0 / np.sqrt(np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1] + eps)  # (B, T, 1)
    xhat = x * rstd  # (B, T, C)
    return xhat * weight, (xhat, rstd, weight)


def rmsnorm_backward(dout, cache):
    xhat, rstd, weight = cache
    dweight = np.sum(dout * xhat, axis=tuple(range(dout.ndim - 1)))
    dxhat = dout * weight
    # xhat = x * rstd and rstd depends on every x of the row, hence the projection term:
    # dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
    dx = rstd * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dweight


# ----------------------------------------------------------------------------------------------------
# linear (no bias anywhere in Llama): y = x @ w.T, w of shape (out, in) as in PyTorch and Meta's files.
# The matrix products go through `backend.matmul`, which uses the C kernels when they are active.


def linear_forward(x, weight):
    x2 = x.reshape(-1, x.shape[-1])  # (B*T, in)
    y = backend.matmul(x2, weight.T)  # (B*T, out); weight.T is a view, no copy
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x, weight)


def linear_backward(dout, cache):
    return linear_backward_input(dout, cache), linear_backward_weight(dout, cache)


# The two halves of linear_backward. The previous layer waits only for dx; dweight can be computed
# later (zero-bubble pipeline schedules fill their idle time with it), so each half stands alone.
def linear_backward_input(dout, cache):
    x, weight = cache
    return backend.matmul(dout.reshape(-1, dout.shape[-1]), weight).reshape(x.shape)  # (B*T, out) @ (out, in)


def linear_backward_weight(dout, cache):
    x, _ = cache
    return backend.matmul(dout.reshape(-1, dout.shape[-1]).T, x.reshape(-1, x.shape[-1]))  # (out, in)


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
    angles = np.outer(np.arange(start_pos, start_pos + seqlen, dtype=np.float64), freqs)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope_forward(x, cos, sin):
    """x (B, T, n, hd) -> rotated x; cos/sin (T, hd/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]  # (B, T, n, hd/2) the two members of each pair
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2) broadcast over heads
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out, (cos, sin)


def rope_backward(dout, cache):
    # a rotation's inverse is its transpose: rotate the gradient by the negative angle
    cos, sin = cache
    return rope_forward(dout, cos, -sin)[0]


# ----------------------------------------------------------------------------------------------------
# causal grouped-query attention, the reference for the fused C kernel (same signature).
# q (B, H, T, hd); k, v (B, KV, S, hd) with S >= T: the queries are the LAST T of the S positions, so a
# KV-cache decode step (T=1, S=start_pos+1) and a full forward (S=T) are the same code. Query head h
# reads kv head h // (H // KV): we view q as (B, KV, G, T, hd) and broadcast k, v over the G group
# members instead of copying them (Meta's repeat_kv, without the copy).


def _attention_scores(q, k, causal):
    """scaled (and masked) scores (B, KV, G, T, S) with q viewed as (B, KV, G, T, hd)."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, KV, H // KV, T, hd)  # (B, KV, G, T, hd)
    scores = (qg @ k[:, :, None].swapaxes(-1, -2)) / np.sqrt(hd).astype(q.dtype)  # (B, KV, G, T, S)
    if causal:
        # query i sits at absolute position S - T + i and may look at keys j <= S - T + i
        future = np.arange(S)[None, :] > (S - T + np.arange(T))[:, None]  # (T, S)
        scores = np.where(future, -np.inf, scores)
    return qg, scores


def _check_attention_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q (B, H, T, hd) and k, v (B, KV, S, hd); got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    B, H, T, hd = q.shape
    if k.shape[0] != B or k.shape[3] != hd or H % k.shape[1] or k.shape[2] < T:
        raise ValueError(f"attention shapes do not fit: q {q.shape}, k {k.shape} (need same B and hd, "
                         "H divisible by KV, S >= T)")


def attention_forward(q, k, v, causal=True):
    """out (B, H, T, hd) = softmax(q k^T / sqrt(hd) + mask) v, and lse (B, H, T) for the backward."""
    _check_attention_shapes(q, k, v)
    B, H, T, hd = q.shape
    _, scores = _attention_scores(q, k, causal)
    # subtract the row max before exp so that exp never overflows; lse = log(sum(exp(scores)))
    m = np.max(scores, axis=-1, keepdims=True)
    p = np.exp(scores - m)
    denom = np.sum(p, axis=-1, keepdims=True)
    out = (p / denom) @ v[:, :, None]  # (B, KV, G, T, hd)
    lse = (m + np.log(denom))[..., 0]  # (B, KV, G, T)
    return out.reshape(B, H, T, hd), lse.reshape(B, H, T)


def attention_backward(dout, q, k, v, out, lse, causal=True):
    """Gradients of attention_forward; the probabilities are recomputed from lse, not stored."""
    B, H, T, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    qg, scores = _attention_scores(q, k, causal)
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


# ----------------------------------------------------------------------------------------------------
# SwiGLU's gate: silu(a) * b with a = w1 x, b = w3 x, silu(a) = a * sigmoid(a).
# The backward needs a itself (not only silu(a)) because silu's derivative depends on sigmoid(a).


def swiglu_forward(a, b):
    sig = 1.0 / (1.0 + np.exp(-a))
    silu = a * sig
    return silu * b, (a, b, sig, silu)


def swiglu_backward(dout, cache):
    a, b, sig, silu = cache
    da = dout * b * sig * (1.0 + a * (1.0 - sig))  # d silu/da = sig + a sig (1 - sig)
    db = dout * silu
    return da, db


# ----------------------------------------------------------------------------------------------------
# cross-entropy over the vocabulary, averaged over the unmasked positions


def cross_entropy_forward(logits, targets, mask=None):
    """logits (B, T, V), targets (B, T) ints, mask (B, T) or None -> scalar mean negative log-likelihood."""
    m = np.max(logits, axis=-1, keepdims=True)
    logsumexp = m[..., 0] + np.log(np.sum(np.exp(logits - m), axis=-1))  # (B, T)
    target_logit = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = logsumexp - target_logit  # (B, T)
    weights = np.ones_like(nll) if mask is None else mask.astype(nll.dtype)
    count = weights.sum()
    if count == 0:
        raise ValueError("the mask selects no positions: the mean loss is undefined")
    loss = float(np.sum(nll * weights) / count)
    return loss, (logits, targets, logsumexp, weights, count)


def cross_entropy_backward(dloss, cache):
    logits, targets, logsumexp, weights, count = cache
    dlogits = np.exp(logits - logsumexp[..., None])  # softmax probabilities
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1, axis=-1)
    dlogits *= (dloss * weights / count)[..., None].astype(dlogits.dtype)
    return dlogits
