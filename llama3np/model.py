"""The Llama 3 transformer: a forward pass and its hand-written backward, composed from llama3np.ops.

    h   = x + attention(attention_norm(x))          # each of the n_layers blocks (pre-norm, residual)
    out = h + feed_forward(ffn_norm(h))
    logits = output(norm(x_last))                   # output.weight is tok_embeddings.weight when tied

`forward` runs the ops and (unless it is filling a KV cache) keeps what each backward needs; `backward`
calls the op backwards in exactly the reverse order. The weights live in `model.params`, a dict keyed by
the names of Meta's checkpoints, so a reader can hold this file beside Meta's `llama/model.py`.

The block (`block_forward` / `block_backward`) is written once, for one process and for tensor
parallelism alike: Megatron's two conjugate operators f and g mark the only points where the slices
of a tensor-parallel group talk (llama3np.parallel.tensor_parallel); in one process they do nothing.
"""
import functools
import mmap
from typing import NamedTuple

import numpy as np

from . import backend, ops
from .args import ModelArgs


class KVCache:
    """Keys and values of the positions seen so far, per layer: (B, n_kv_heads, max_seq_len, head_dim).

    The head axis comes before the position axis so that `cache_k[l][:, :, :S]` is already in the
    layout attention reads (B, KV, S, hd), without a transpose.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype):
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.cache_k = [np.zeros(shape, dtype=dtype) for _ in range(args.n_layers)]
        self.cache_v = [np.zeros(shape, dtype=dtype) for _ in range(args.n_layers)]
        self.batch_size, self.max_seq_len = batch_size, max_seq_len


LAYER_PARAM_NAMES = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                     "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                     "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight")
"""The weights of one block, in checkpoint order (each name is prefixed with `layers.{i}.`)."""


# ----------------------------------------------------------------------------------------------------
# Megatron's conjugate operators (Shoeybi et al. 2019, fig. 3). `group` is a tensor-parallel process
# group, or None for one process, where all four are the identity.
#   f: identity forward, all-reduce backward  (before a column-parallel layer: each slice's gradient
#                                               of the replicated input is a partial sum)
#   g: all-reduce forward, identity backward  (after a row-parallel layer: the slices' partial outputs add)


def f_forward(x, group):
    return x  # the input is already the same on every rank


def f_backward(dx, group):
    return dx if group is None else group.all_reduce(dx)


def g_forward(x, group):
    return x if group is None else group.all_reduce(x)


def g_backward(dx, group):
    return dx


# ----------------------------------------------------------------------------------------------------
# one transformer block


class BlockCache(NamedTuple):
    """What a block's forward keeps for its backward (each `*_c` is that op's own cache)."""
    attention_norm_c: tuple
    wq_c: tuple
    wk_c: tuple
    wv_c: tuple
    rope: tuple  # (cos, sin)
    q: np.ndarray  # (B, H, T, hd) after RoPE
    k: np.ndarray  # (B, KV, T, hd) after RoPE
    v: np.ndarray  # (B, KV, T, hd)
    att: np.ndarray  # (B, H, T, hd) attention output
    lse: np.ndarray  # (B, H, T) log-sum-exp of each attention row
    kv_start: np.ndarray  # (B, T) first visible key per query, or None (plain causal)
    wo_c: tuple
    ffn_norm_c: tuple
    w1_c: tuple
    w3_c: tuple
    swiglu_c: tuple
    w2_c: tuple


def block_forward(p, i, x, rope, args, group=None, start_pos=0, cache=None, kv_start=None):
    """Block i: x (B, T, dim) -> (out (B, T, dim), BlockCache or None with a KV cache).

    p holds this process's weights (a tensor-parallel rank's slices: its heads and hidden units, so
    H and KV below are this rank's share). With a KV cache, this step's keys and values are written at
    start_pos.. and the queries attend to every cached position.
    """
    pre = f"layers.{i}."
    B, T, _ = x.shape
    tp = 1 if group is None else group.size
    H, KV, hd = args.n_heads // tp, args.n_kv_heads // tp, args.head_dim  # this rank's heads
    cos, sin = rope
    # attention
    xn, an_c = backend.rmsnorm_forward(x, p[pre + "attention_norm.weight"], args.norm_eps)
    xn = f_forward(xn, group)
    xq, q_c = backend.linear_forward(xn, p[pre + "attention.wq.weight"])  # (B, T, H*hd)
    xk, k_c = backend.linear_forward(xn, p[pre + "attention.wk.weight"])  # (B, T, KV*hd)
    xv, v_c = backend.linear_forward(xn, p[pre + "attention.wv.weight"])  # (B, T, KV*hd)
    xq, _ = backend.rope_forward(xq.reshape(B, T, H, hd), cos, sin)  # (B, T, H, hd)
    xk, _ = backend.rope_forward(xk.reshape(B, T, KV, hd), cos, sin)  # (B, T, KV, hd)
    q = xq.transpose(0, 2, 1, 3)  # (B, H, T, hd)
    k = xk.transpose(0, 2, 1, 3)  # (B, KV, T, hd)
    v = xv.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)  # (B, KV, T, hd)
    if cache is not None:
        # write this step's keys/values, then attend over all S = start_pos + T cached positions
        # BEGIN SOLUTION ex14
        S = start_pos + T
        cache.cache_k[i][:B, :, start_pos:S] = k
        cache.cache_v[i][:B, :, start_pos:S] = v
        k, v = cache.cache_k[i][:B, :, :S], cache.cache_v[i][:B, :, :S]  # (B, KV, S, hd)
        # END SOLUTION
    att, lse = backend.attention_forward(q, k, v, True, kv_start)  # (B, H, T, hd), (B, H, T)
    att2 = att.transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H*hd)
    att_out, o_c = backend.linear_forward(att2, p[pre + "attention.wo.weight"])  # tp: a partial sum
    h = g_forward(att_out, group)
    h += x  # in place: a fresh array (the product, or the all-reduce's), and no third one allocated
    # feed-forward: w2(silu(w1 x) * w3 x) (tp: over this rank's hidden units)
    hn, fn_c = backend.rmsnorm_forward(h, p[pre + "ffn_norm.weight"], args.norm_eps)
    hn = f_forward(hn, group)
    a, w1_c = backend.linear_forward(hn, p[pre + "feed_forward.w1.weight"])  # (B, T, hidden)
    b, w3_c = backend.linear_forward(hn, p[pre + "feed_forward.w3.weight"])  # (B, T, hidden)
    gate, sw_c = backend.swiglu_forward(a, b)
    ffn_out, w2_c = backend.linear_forward(gate, p[pre + "feed_forward.w2.weight"])  # tp: a partial sum
    out = g_forward(ffn_out, group)
    out += h
    if cache is not None:
        return out, None
    return out, BlockCache(an_c, q_c, k_c, v_c, rope, q, k, v, att, lse, kv_start, o_c, fn_c, w1_c, w3_c,
                           sw_c, w2_c)


def block_backward(i, dout, bc: BlockCache, grads, group=None, defer=None):
    """dout (B, T, dim) -> dx; adds block i's weight gradients into `grads`. With a list `defer`, the
    gradients of the seven matrices are left as closures appended to it (zero-bubble's W step)."""
    pre = f"layers.{i}."
    B, H, T, hd = bc.q.shape
    KV = bc.k.shape[1]

    def linear(dy, cache, name):
        return linear_backward_into(dy, cache, grads, pre + name, defer)

    # BEGIN SOLUTION ex09
    # feed-forward, reversed; dout flows into the residual h as well
    dg = linear(g_backward(dout, group), bc.w2_c, "feed_forward.w2.weight")
    da, db = backend.swiglu_backward(dg, bc.swiglu_c)
    dhn = linear(da, bc.w1_c, "feed_forward.w1.weight")
    dhn3 = linear(db, bc.w3_c, "feed_forward.w3.weight")
    dhn += dhn3  # (in place: both are fresh products; a + b would allocate a third array)
    dh, dffn_norm = backend.rmsnorm_backward(f_backward(dhn, group), bc.ffn_norm_c)
    accumulate(grads, pre + "ffn_norm.weight", dffn_norm)
    dh += dout
    # attention, reversed
    datt2 = linear(g_backward(dh, group), bc.wo_c, "attention.wo.weight")
    datt = datt2.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    dq, dk, dv = backend.attention_backward(datt, bc.q, bc.k, bc.v, bc.att, bc.lse, True, bc.kv_start)
    dxq = backend.rope_backward(dq.transpose(0, 2, 1, 3), bc.rope).reshape(B, T, H * hd)
    dxk = backend.rope_backward(dk.transpose(0, 2, 1, 3), bc.rope).reshape(B, T, KV * hd)
    dxv = dv.transpose(0, 2, 1, 3).reshape(B, T, KV * hd)
    dxn = linear(dxq, bc.wq_c, "attention.wq.weight")
    dxn_k = linear(dxk, bc.wk_c, "attention.wk.weight")
    dxn_v = linear(dxv, bc.wv_c, "attention.wv.weight")
    dxn += dxn_k
    dxn += dxn_v
    dx, dattention_norm = backend.rmsnorm_backward(f_backward(dxn, group), bc.attention_norm_c)
    accumulate(grads, pre + "attention_norm.weight", dattention_norm)
    dx += dh
    return dx
    # END SOLUTION


def linear_backward_into(dout, cache, grads, name, defer=None):
    """dx of y = x @ w.T; the weight gradient dout^T x goes into grads[name] now, or, with a list
    `defer`, later: zero-bubble's split of linear_backward into its two halves (same products)."""
    if defer is None:
        dx, dweight = backend.linear_backward(dout, cache)
        accumulate(grads, name, dweight)
        return dx
    dx = backend.linear_backward_input(dout, cache)  # what the previous layer waits for
    defer.append(lambda: accumulate(grads, name, backend.linear_backward_weight(dout, cache)))
    return dx


def accumulate(grads, name, g):
    """grads[name] += g, or grads[name] = g the first time (so one micro-batch adds nothing: bitwise)."""
    if name in grads:
        grads[name] += g
    else:
        grads[name] = g


# ----------------------------------------------------------------------------------------------------
# the whole model


class Activations(NamedTuple):
    """What a forward that keeps its activations holds for the backward."""
    embedding_c: tuple
    blocks: list  # one BlockCache per layer
    norm_c: tuple
    output_c: tuple  # None after a forward with return_hidden=True (the LM head was not run)


class Transformer:
    def __init__(self, args: ModelArgs, seed: int = 0, dtype=np.float32, init: bool = True):
        """Random weights (`init_params`) or, with init=False, zeros for a loader to fill: zeros cost no
        memory until written (the OS maps pages on first touch), so loading holds ~1 copy of the weights."""
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.args, self.dtype = args, dtype
        self.params = init_params(args, seed, dtype) if init else zero_params(args, dtype)
        self.freqs = ops.rope_frequencies(args)  # (hd/2,) float64, scaled for Llama 3.1+
        self.tokenizer = None  # set by the loaders when a checkpoint ships one
        self.activations = None  # what the last forward with keep=True kept for the backward

    # ------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_seq_len: int = None) -> KVCache:
        max_seq_len = self.args.max_seq_len if max_seq_len is None else max_seq_len
        if not 0 < max_seq_len <= self.args.max_seq_len:
            raise ValueError(f"cache length must be in [1, {self.args.max_seq_len}], got {max_seq_len}")
        return KVCache(self.args, batch_size, max_seq_len, self.dtype)

    def forward(self, tokens, start_pos: int = 0, cache: KVCache = None, *, doc_ids=None, kv_start=None,
                return_hidden: bool = False, keep: bool = None):
        """tokens (B, T) ints -> logits (B, T, vocab_size), or with return_hidden=True the final hidden
        state (B, T, dim): the output of the last RMSNorm, what the LM head reads (the LM head is not
        run). In the model's dtype.

        Without a cache this is a full forward from position 0 that keeps the activations for
        `backward` / `backward_hidden` (keep=False: keep nothing, for inference). With a cache, the keys
        and values of positions start_pos..start_pos+T-1 are written into it and the queries attend to
        everything cached so far (incremental decoding; nothing is kept).

        doc_ids (B, T) ints: several documents packed in a row attend only within themselves (a
        document is a run of equal ids; positions are not reset). kv_start (B, T): the lower-level form,
        the first key position each query may see (e.g. the first real token of a left-padded row in a
        batched KV cache); see ops.kv_start_from_doc_ids.
        """
        tokens = self._check_tokens(tokens, "tokens")
        B, T = tokens.shape
        self._check_positions(B, T, start_pos, cache)
        kv_start = self._check_masks(B, T, start_pos, cache, doc_ids, kv_start)
        keep = cache is None if keep is None else bool(keep)
        if keep and cache is not None:
            raise ValueError("keep=True needs a forward without a KV cache (the backward starts at position 0)")
        p, args = self.params, self.args
        rope = ops.rope_cos_sin(self.freqs, start_pos, T, self.dtype)
        x, emb_c = ops.embedding_forward(tokens, p["tok_embeddings.weight"])  # (B, T, C)
        # one new token: on the C kernels every block, and the final norm and LM head, run in one call
        # (backend.decode_blocks, the same bits); op by op, ~20 Python calls per layer cost ~0.6-0.8 ms of a
        # ~5 ms `small` decode step
        out = None
        if T == 1 and cache is not None:
            layers = [[p[name] for name in names] for names in _layer_names(args.n_layers)]
            head = None if return_hidden else (p["norm.weight"], self._output_weight())
            out = backend.decode_blocks(layers, cache, x, rope, args, start_pos, kv_start, head)
            if out is not None and head is not None:
                self.activations = None
                return out  # the logits (B, 1, V)
        blocks = []
        if out is not None:
            x = out  # (with a cache nothing is kept for a backward)
        else:
            for i in range(args.n_layers):
                x, bc = block_forward(p, i, x, rope, args, None, start_pos, cache, kv_start)
                blocks.append(bc)
        # the final norm and the loss through the backend, as the parallel engine's last stage computes them:
        # a one-process grid must give this model's bits
        x, norm_c = backend.rmsnorm_forward(x, p["norm.weight"], args.norm_eps)
        out_c = None
        if not return_hidden:
            x, out_c = backend.linear_forward(x, self._output_weight())  # (B, T, V)
        self.activations = Activations(emb_c, blocks, norm_c, out_c) if keep else None
        return x

    # ------------------------------------------------------------------------------------------------
    def backward(self, dlogits):
        """dlogits (B, T, vocab) for the last forward (keep=True) -> grads, keyed like `params`."""
        acts = self._kept("backward")
        if acts.output_c is None:
            raise RuntimeError("backward(dlogits) needs a forward that computed logits; after "
                               "forward(..., return_hidden=True) use backward_hidden(dhidden)")
        want = acts.output_c[0].shape[:-1] + (self.args.vocab_size,)
        if dlogits.shape != want:
            raise ValueError(f"dlogits has shape {dlogits.shape}, expected {want} (the last forward's logits)")
        dlogits = np.asarray(dlogits, dtype=self.dtype)
        dx, doutput = backend.linear_backward(dlogits, acts.output_c)
        return self._backward_from_hidden(dx, doutput)

    def backward_hidden(self, dhidden, doutput=None):
        """dhidden (B, T, dim) at the final hidden state (forward's return_hidden=True output, after the
        last RMSNorm) -> grads keyed like `params`; the LM head gets a zero gradient, or `doutput` when a
        head also ran it (lm_head_forward). This is where a scalar head (a reward model, a value model, a
        classifier) joins the transformer."""
        acts = self._kept("backward_hidden")
        want = acts.norm_c[0].shape
        if np.shape(dhidden) != want:
            raise ValueError(f"dhidden has shape {np.shape(dhidden)}, expected {want} (the last forward's hidden state)")
        if doutput is not None and np.shape(doutput) != self._output_weight().shape:
            raise ValueError(f"doutput has shape {np.shape(doutput)}, expected {self._output_weight().shape} (the LM head's)")
        dhidden = np.asarray(dhidden, dtype=self.dtype)
        return self._backward_from_hidden(dhidden, doutput)

    def lm_head_forward(self, hidden):
        """hidden (B, T, dim), a return_hidden=True output -> (logits (B, T, V), cache): the LM head alone, for a
        head that reads both the hidden state and the logits of one forward. Its backward: lm_head_backward,
        then backward_hidden(dhidden + its dhidden, doutput)."""
        return backend.linear_forward(hidden, self._output_weight())

    def lm_head_backward(self, dlogits, cache):
        """dlogits (B, T, V) -> (dhidden (B, T, dim), doutput (V, dim)) for lm_head_forward's cache."""
        return backend.linear_backward(np.asarray(dlogits, dtype=self.dtype), cache)

    def _backward_from_hidden(self, dx, doutput):
        acts = self.activations
        grads = {}
        dx, grads["norm.weight"] = backend.rmsnorm_backward(dx, acts.norm_c)
        for i in reversed(range(self.args.n_layers)):
            dx = block_backward(i, dx, acts.blocks[i], grads)
        dembed = backend.embedding_backward(dx, acts.embedding_c)
        if doutput is None:
            doutput = np.zeros_like(self._output_weight())
        if self.args.tie_embeddings:
            # one matrix used twice (lookup and LM head): its gradient is the sum of both uses
            grads["tok_embeddings.weight"] = dembed + doutput
        else:
            grads["tok_embeddings.weight"], grads["output.weight"] = dembed, doutput
        return {k: grads[k] for k in self.params}  # the params' order

    def _kept(self, what):
        if self.activations is None:
            raise RuntimeError(f"{what} needs a forward without a KV cache (and keep not False) first")
        return self.activations

    def loss_and_grads(self, tokens, targets, mask=None, doc_ids=None):
        """Mean cross-entropy of predicting `targets` (B, T) over unmasked positions, and its gradients."""
        tokens = self._check_tokens(tokens, "tokens")
        targets = self._check_tokens(targets, "targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets has shape {targets.shape}, expected {tokens.shape} (same as tokens)")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"mask has shape {mask.shape}, expected {tokens.shape} (same as tokens)")
            if mask.dtype.kind not in "biuf":
                raise TypeError(f"mask must be boolean or numeric, got dtype {mask.dtype}")
        logits = self.forward(tokens, doc_ids=doc_ids)
        loss, dlogits = backend.cross_entropy_loss_and_dlogits(logits, targets, mask)  # over the logits, in C
        return loss, self.backward(dlogits)

    # ------------------------------------------------------------------------------------------------
    def _output_weight(self):
        return self.params["tok_embeddings.weight" if self.args.tie_embeddings else "output.weight"]

    def _check_tokens(self, tokens, name):
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, seqlen), got shape {tokens.shape}")
        if tokens.size == 0:
            raise ValueError(f"{name} is empty (shape {tokens.shape})")
        # a decode step checks one token: Python's min/max of a short list beat two NumPy reductions (~10 us)
        lo, hi = (min(v := tokens.ravel().tolist()), max(v)) if tokens.size <= 64 else (tokens.min(), tokens.max())
        if lo < 0 or hi >= self.args.vocab_size:
            raise ValueError(f"{name} holds ids outside [0, {self.args.vocab_size}): min {lo}, max {hi}")
        return tokens.astype(np.int64, copy=False)

    def _check_positions(self, B, T, start_pos, cache):
        if not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
            raise ValueError(f"start_pos must be a non-negative int, got {start_pos!r}")
        if cache is None:
            if start_pos != 0:
                raise ValueError("start_pos > 0 needs a KV cache holding the earlier positions")
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.args.max_seq_len}")
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (model.new_cache), got {type(cache).__name__}")
        if B > cache.batch_size:
            raise ValueError(f"batch of {B} does not fit a cache made for batch size {cache.batch_size}")
        if start_pos + T > cache.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} do not fit the cache of "
                             f"{cache.max_seq_len} positions (max_seq_len)")

    @staticmethod
    def _check_masks(B, T, start_pos, cache, doc_ids, kv_start):
        """-> kv_start (B, T) int64 or None, from doc_ids or kv_start (not both)."""
        if doc_ids is not None:
            if kv_start is not None:
                raise ValueError("pass doc_ids or kv_start, not both (doc_ids is turned into kv_start)")
            if cache is not None:
                raise ValueError("doc_ids needs a forward without a KV cache; with a cache pass kv_start")
            doc_ids = np.asarray(doc_ids)
            if doc_ids.shape != (B, T):
                raise ValueError(f"doc_ids has shape {doc_ids.shape}, expected {(B, T)} (same as tokens)")
            return ops.kv_start_from_doc_ids(doc_ids)
        if kv_start is None:
            return None
        kv_start = np.asarray(kv_start)
        if kv_start.shape != (B, T) or kv_start.dtype.kind not in "iu":
            raise ValueError(f"kv_start must be a {(B, T)} integer array (same as tokens), got shape "
                             f"{kv_start.shape} and dtype {kv_start.dtype}")
        if kv_start.min() < 0 or kv_start.max() >= start_pos + T:
            raise ValueError(f"kv_start holds key positions outside [0, {start_pos + T}): "
                             f"min {kv_start.min()}, max {kv_start.max()}")
        return kv_start.astype(np.int64, copy=False)


@functools.lru_cache(maxsize=16)
def _layer_names(n_layers):
    """(("layers.0.attention.wq.weight", ...), ...): each block's weight names, in LAYER_PARAM_NAMES order."""
    return tuple(tuple(f"layers.{i}.{name}" for name in LAYER_PARAM_NAMES) for i in range(n_layers))


def param_shapes(args: ModelArgs) -> dict:
    """The shape of every weight, keyed by Meta's names, in checkpoint order."""
    C, hd, hidden = args.dim, args.head_dim, args.ffn_hidden_dim
    layer = dict(zip(LAYER_PARAM_NAMES, (
        (args.n_heads * hd, C), (args.n_kv_heads * hd, C), (args.n_kv_heads * hd, C),  # wq, wk, wv
        (C, args.n_heads * hd), (hidden, C), (C, hidden), (hidden, C),  # wo, w1, w2, w3
        (C,), (C,))))  # attention_norm, ffn_norm
    shapes = {"tok_embeddings.weight": (args.vocab_size, C)}
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes["norm.weight"] = (C,)
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, C)
    return shapes


def zero_params(args: ModelArgs, dtype=np.float32) -> dict:
    """Every weight zero, all of them side by side in one block of memory (see `_weights_in_one_block`)."""
    return _weights_in_one_block(param_shapes(args), np.dtype(dtype))


def _weights_in_one_block(shapes: dict, dtype) -> dict:
    """Zeroed arrays of the given shapes, laid out one after the other in one anonymous memory map.

    Why one block: a decode step reads every weight once, and that read is the whole cost. In one
    block the weights are one long sequential stream that the kernel can back with 2 MB pages
    (transparent huge pages, asked for with madvise). The CPU's prefetcher stops at each page
    boundary, and NumPy gives huge pages only to arrays of 4 MB and more, so with one array per
    weight the 57 products of a `small` decode step read 19-24 GB/s; in one block, 30 GB/s (measured
    side by side: 5.9 vs 3.7 ms).
    Each weight is still its own C-contiguous array (np.ndarray over the map, not a view of another
    array); the map is private (a forked process gets a copy-on-write copy, as with any memory) and
    its pages cost nothing until written, like np.zeros. Where mmap cannot do this, plain np.zeros.
    """
    align = 64  # every weight starts on a cache line (and a 64-byte SIMD load)
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        nbytes = int(np.prod(shape)) * dtype.itemsize
        total += (nbytes + align - 1) // align * align
    if not hasattr(mmap, "MAP_PRIVATE") or total == 0:
        return {name: np.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
    block = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE)  # anonymous: zero pages until written
    if hasattr(mmap, "MADV_HUGEPAGE"):
        block.madvise(mmap.MADV_HUGEPAGE)
    return {name: np.ndarray(shape, dtype=dtype, buffer=block, offset=offsets[name])
            for name, shape in shapes.items()}


def init_params(args: ModelArgs, seed: int = 0, dtype=np.float32) -> dict:
    """Random weights, keyed by Meta's names. Linear weights (out, in) ~ N(0, 0.02), norms = 1.

    The residual projections (wo, w2) are scaled by 1/sqrt(2 * n_layers) (GPT-2's rule) so that the
    residual stream does not grow with depth at initialisation. The numbers are drawn in float64 and
    then cast, so float32 and float64 models with the same seed hold the same weights.
    """
    rng = np.random.default_rng(seed)
    resid_std = 0.02 / np.sqrt(2 * args.n_layers)
    params = zero_params(args, dtype)  # one block of memory, filled in place
    for name, shape in param_shapes(args).items():
        if len(shape) == 1:
            params[name][...] = 1  # RMSNorm gains start at 1: the identity
        else:
            std = resid_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
            params[name][...] = rng.standard_normal(shape) * std  # rounded to dtype as astype would
    return params
