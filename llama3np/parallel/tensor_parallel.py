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

The block is written once, in llama3np.model (block_forward / block_backward), with f and g at those
points: this file only says how the weights are split and adds the vocabulary-parallel embedding and
loss. With a group of one, f and g do nothing: the same operations as one process, bitwise.
"""
import numpy as np

from .. import backend, ops
from ..model import LAYER_PARAM_NAMES, f_backward, f_forward, g_forward, linear_backward_into

# How each of a block's weights (model.LAYER_PARAM_NAMES) is split; the norms are replicated.
COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
          "feed_forward.w1.weight", "feed_forward.w3.weight")  # split the output features (axis 0)
ROW = ("attention.wo.weight", "feed_forward.w2.weight")  # split the input features (axis 1)
VOCAB = ("tok_embeddings.weight", "output.weight")  # split the vocabulary (axis 0)
assert set(COLUMN + ROW) <= set(LAYER_PARAM_NAMES)


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
# the block itself is llama3np.model's: one copy, with f and g where a group of ranks plugs in.
# Called with this rank's slices and its group: block_forward(p, i, x, rope, args, group) and
# block_backward(i, dout, cache, grads, group, defer).


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
    return backend.linear_forward(f_forward(x, group), weight)


def output_backward(dlogits, cache, group, grads, name, defer=None):
    """-> dx (B, T, dim); the output layer's weight gradient goes into grads[name] (or `defer`)."""
    return f_backward(linear_backward_into(dlogits, cache, grads, name, defer), group)


def cross_entropy_forward(logits, targets, group):
    """Mean cross-entropy with the vocabulary split over ranks, without gathering the logits:
    all-reduce the row max (op max), the sum of exponentials, and the target's logit (held by one rank)."""
    if group.size == 1:
        loss, cache = backend.cross_entropy_forward(logits, targets)  # the model's loss: a 1-rank grid's bits
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
        return backend.cross_entropy_backward(dloss, ref_cache)
    logits, lse, local, mine = tp_cache
    dlogits = np.exp(logits - lse[..., None])
    rows = np.nonzero(mine)
    dlogits[rows + (local[rows],)] -= 1
    dlogits *= np.asarray(dloss / lse.size, dtype=dlogits.dtype)
    return dlogits
