"""Tensor (model) parallelism, Megatron-LM style: each of `tp` ranks holds a slice of every matrix.

    attention   wq, wk, wv split by rows ("column-parallel": each rank computes its own heads)
                wo split by columns ("row-parallel": each rank's heads give a partial sum of the output)
    feed-forward w1, w3 split by rows (each rank computes its own hidden units), w2 by columns
    embeddings  tok_embeddings and output split by vocabulary rows

Between them sit the two conjugate operators of the Megatron paper (Shoeybi et al. 2019, fig. 3):

    f: identity forward, all-reduce backward   (before a column-parallel layer: the input is replicated,
                                                 each rank's slice contributes part of its gradient)
    g: all-reduce forward, identity backward   (after a row-parallel layer: partial outputs are summed)

so a block costs two all-reduces forward and two backward, and nothing else needs to talk: the
attention of a head only needs that head's q, k, v, and SwiGLU's silu(w1 x) * w3 x is elementwise per
hidden unit. Norm weights are replicated: every rank normalises the full (replicated) activations and
computes the same norm gradient. Grouped-query attention needs n_kv_heads divisible by tp too, so that
the query heads of a rank read only kv heads of the same rank.

With a group of one, f and g do nothing and the code below performs exactly the operations of
Transformer._block_forward/_block_backward, in the same order (bitwise the same numbers).
"""
import numpy as np

from .. import backend, ops

COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
          "feed_forward.w1.weight", "feed_forward.w3.weight")  # split the output features (axis 0)
ROW = ("attention.wo.weight", "feed_forward.w2.weight")  # split the input features (axis 1)
VOCAB = ("tok_embeddings.weight", "output.weight")  # split the vocabulary (axis 0)


def shard_axis(name):
    """The axis along which parameter `name` is split across tensor-parallel ranks, or None (replicated)."""
    if name in VOCAB or name.endswith(COLUMN):
        return 0
    if name.endswith(ROW):
        return 1
    return None


def check_tp(args, tp):
    """Raise ValueError unless every split is even (heads, kv heads, hidden units, vocabulary)."""
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                    ("the FFN width (ffn_hidden_dim)", args.ffn_hidden_dim), ("vocab_size", args.vocab_size)):
        if n % tp:
            raise ValueError(f"tensor parallelism over tp={tp} ranks needs {what}={n} divisible by {tp}")


def shard(name, full, tp, tp_rank):
    """This rank's slice of a full parameter (a copy, so ranks never share memory by accident)."""
    axis = shard_axis(name)
    if axis is None or tp == 1:
        return np.array(full)
    return np.array(np.split(full, tp, axis=axis)[tp_rank])


def unshard(name, pieces):
    """The full parameter from the slices of ranks 0..tp-1."""
    axis = shard_axis(name)
    return np.array(pieces[0]) if axis is None else np.concatenate(pieces, axis=axis)


# ----------------------------------------------------------------------------------------------------
# the conjugate operators f and g


def f_forward(x, group):
    return x  # the input is already the same on every rank


def f_backward(dx, group):
    return group.all_reduce(dx)  # each rank's slice saw all of x: add their contributions


def g_forward(x, group):
    return group.all_reduce(x)  # each rank's slice produced a partial sum of the output


def g_backward(dx, group):
    return dx


# ----------------------------------------------------------------------------------------------------
# one transformer block on this rank's slices


def block_forward(p, i, x, cos, sin, args, group):
    """x (B, T, dim), replicated -> (out (B, T, dim) replicated, cache). p: this rank's parameters."""
    pre = f"layers.{i}."
    B, T, _ = x.shape
    H, KV, hd = args.n_heads // group.size, args.n_kv_heads // group.size, args.head_dim  # this rank's heads
    # attention
    xn, an_c = ops.rmsnorm_forward(x, p[pre + "attention_norm.weight"], args.norm_eps)
    xn = f_forward(xn, group)
    xq, q_c = ops.linear_forward(xn, p[pre + "attention.wq.weight"])  # (B, T, H*hd)
    xk, k_c = ops.linear_forward(xn, p[pre + "attention.wk.weight"])  # (B, T, KV*hd)
    xv, v_c = ops.linear_forward(xn, p[pre + "attention.wv.weight"])  # (B, T, KV*hd)
    xq, _ = ops.rope_forward(xq.reshape(B, T, H, hd), cos, sin)  # (B, T, H, hd)
    xk, _ = ops.rope_forward(xk.reshape(B, T, KV, hd), cos, sin)  # (B, T, KV, hd)
    q = xq.transpose(0, 2, 1, 3)  # (B, H, T, hd)
    k = xk.transpose(0, 2, 1, 3)  # (B, KV, T, hd)
    v = xv.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)  # (B, KV, T, hd)
    att, lse = backend.attention_forward(q, k, v, causal=True)  # (B, H, T, hd), (B, H, T)
    att2 = att.transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H*hd)
    att_out, o_c = ops.linear_forward(att2, p[pre + "attention.wo.weight"])  # partial: this rank's heads
    h = x + g_forward(att_out, group)
    # feed-forward: w2(silu(w1 x) * w3 x) over this rank's hidden units
    hn, fn_c = ops.rmsnorm_forward(h, p[pre + "ffn_norm.weight"], args.norm_eps)
    hn = f_forward(hn, group)
    a, w1_c = ops.linear_forward(hn, p[pre + "feed_forward.w1.weight"])  # (B, T, hidden/tp)
    b, w3_c = ops.linear_forward(hn, p[pre + "feed_forward.w3.weight"])  # (B, T, hidden/tp)
    gate, sw_c = ops.swiglu_forward(a, b)
    ffn_out, w2_c = ops.linear_forward(gate, p[pre + "feed_forward.w2.weight"])  # partial sum
    out = h + g_forward(ffn_out, group)
    return out, (an_c, q_c, k_c, v_c, cos, sin, (q, k, v, att, lse), o_c, fn_c, w1_c, w3_c, sw_c, w2_c)


def block_backward(i, dout, lc, grads, args, group, defer=None):
    """dout (B, T, dim) -> dx; adds this rank's weight gradients into grads. With a list `defer`, the
    gradients of the seven matrices are left as closures appended to it (zero-bubble's W step)."""
    pre = f"layers.{i}."
    an_c, q_c, k_c, v_c, cos, sin, (q, k, v, att, lse), o_c, fn_c, w1_c, w3_c, sw_c, w2_c = lc
    B, H, T, hd = q.shape
    KV = k.shape[1]

    def linear(dy, cache, name):
        return linear_backward_into(dy, cache, grads, pre + name, defer)

    # feed-forward, reversed; dout flows into the residual h as well
    dg = linear(g_backward(dout, group), w2_c, "feed_forward.w2.weight")
    da, db = ops.swiglu_backward(dg, sw_c)
    dhn = linear(da, w1_c, "feed_forward.w1.weight")
    dhn3 = linear(db, w3_c, "feed_forward.w3.weight")
    dh, dffn_norm = ops.rmsnorm_backward(f_backward(dhn + dhn3, group), fn_c)
    accumulate(grads, pre + "ffn_norm.weight", dffn_norm)
    dh += dout
    # attention, reversed
    datt2 = linear(g_backward(dh, group), o_c, "attention.wo.weight")
    datt = datt2.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    dq, dk, dv = backend.attention_backward(datt, q, k, v, att, lse, causal=True)
    dxq = ops.rope_backward(dq.transpose(0, 2, 1, 3), (cos, sin)).reshape(B, T, H * hd)
    dxk = ops.rope_backward(dk.transpose(0, 2, 1, 3), (cos, sin)).reshape(B, T, KV * hd)
    dxv = dv.transpose(0, 2, 1, 3).reshape(B, T, KV * hd)
    dxn = linear(dxq, q_c, "attention.wq.weight")
    dxn_k = linear(dxk, k_c, "attention.wk.weight")
    dxn_v = linear(dxv, v_c, "attention.wv.weight")
    dx, dattention_norm = ops.rmsnorm_backward(f_backward(dxn + dxn_k + dxn_v, group), an_c)
    accumulate(grads, pre + "attention_norm.weight", dattention_norm)
    return dx + dh


def linear_backward_into(dout, cache, grads, name, defer=None):
    """dx of y = x @ w.T; the weight gradient dout^T x goes into grads[name] now, or, with a list
    `defer`, later: zero-bubble's split of ops.linear_backward into its two halves (same products)."""
    if defer is None:
        dx, dweight = ops.linear_backward(dout, cache)
        accumulate(grads, name, dweight)
        return dx
    dx = ops.linear_backward_input(dout, cache)  # what the previous layer waits for
    defer.append(lambda: accumulate(grads, name, ops.linear_backward_weight(dout, cache)))
    return dx


def accumulate(grads, name, g):
    """grads[name] += g, or grads[name] = g the first time (so one micro-batch adds nothing: bitwise)."""
    if name in grads:
        grads[name] += g
    else:
        grads[name] = g


# ----------------------------------------------------------------------------------------------------
# vocabulary-parallel embedding and cross-entropy


def embedding_forward(tokens, weight, group):
    """tokens (B, T) -> (B, T, dim). Each rank looks up the tokens in its vocabulary slice, zeros the
    others, and the all-reduce (g) adds the slices: exactly one rank contributes each row."""
    if group.size == 1:
        out, cache = ops.embedding_forward(tokens, weight)
        return out, (cache, None)
    start = group.rank * weight.shape[0]
    local = tokens - start
    mine = (local >= 0) & (local < weight.shape[0])  # (B, T)
    out, cache = ops.embedding_forward(np.where(mine, local, 0), weight)
    return g_forward(out * mine[..., None], group), (cache, mine)


def embedding_backward(dout, cache):
    cache, mine = cache
    return ops.embedding_backward(dout if mine is None else dout * mine[..., None], cache)


def output_forward(x, weight, group):
    """x (B, T, dim) replicated -> logits of this rank's vocabulary slice (B, T, V/tp)."""
    return ops.linear_forward(f_forward(x, group), weight)


def output_backward(dlogits, cache, group, grads, name, defer=None):
    """-> dx (B, T, dim); the output layer's weight gradient goes into grads[name] (or `defer`)."""
    return f_backward(linear_backward_into(dlogits, cache, grads, name, defer), group)


def cross_entropy_forward(logits, targets, group):
    """Mean cross-entropy with the vocabulary split over ranks, without gathering the logits:
    all-reduce the row max (op max), the sum of exponentials, and the target's logit (held by one rank)."""
    if group.size == 1:
        loss, cache = ops.cross_entropy_forward(logits, targets)
        return loss, (None, cache)
    V = logits.shape[-1]
    m = group.all_reduce(np.max(logits, axis=-1), op="max")  # (B, T) the global row max
    sumexp = group.all_reduce(np.sum(np.exp(logits - m[..., None]), axis=-1))
    lse = m + np.log(sumexp)  # (B, T)
    local = targets - group.rank * V
    mine = (local >= 0) & (local < V)
    picked = np.take_along_axis(logits, np.where(mine, local, 0)[..., None], axis=-1)[..., 0]
    target_logit = group.all_reduce(np.where(mine, picked, 0))
    loss = float(np.mean(lse - target_logit))
    return loss, ((logits, lse, local, mine), None)


def cross_entropy_backward(dloss, cache):
    """-> dlogits of this rank's slice: (softmax - onehot) * dloss / count, the onehot only where it is ours."""
    tp_cache, ref_cache = cache
    if tp_cache is None:
        return ops.cross_entropy_backward(dloss, ref_cache)
    logits, lse, local, mine = tp_cache
    dlogits = np.exp(logits - lse[..., None])
    rows = np.nonzero(mine)
    dlogits[rows + (local[rows],)] -= 1
    dlogits *= np.asarray(dloss / lse.size, dtype=dlogits.dtype)
    return dlogits
