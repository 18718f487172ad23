"""The Llama 3 transformer: a forward pass and its hand-written backward, composed from llama3np.ops.

    h   = x + attention(attention_norm(x))          # each of the n_layers blocks (pre-norm, residual)
    out = h + feed_forward(ffn_norm(h))
    logits = output(norm(x_last))                   # output.weight is tok_embeddings.weight when tied

`forward` runs the ops and (unless it is filling a KV cache) keeps what each backward needs; `backward`
calls the op backwards in exactly the reverse order. The weights live in `model.params`, a dict keyed by
the names of Meta's checkpoints, so a reader can hold this file beside Meta's `llama/model.py`.
"""
import mmap

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
        self._acts = None  # what the last cache-less forward kept for the backward

    # ------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_seq_len: int = None) -> KVCache:
        max_seq_len = self.args.max_seq_len if max_seq_len is None else max_seq_len
        if not 0 < max_seq_len <= self.args.max_seq_len:
            raise ValueError(f"cache length must be in [1, {self.args.max_seq_len}], got {max_seq_len}")
        return KVCache(self.args, batch_size, max_seq_len, self.dtype)

    def forward(self, tokens, start_pos: int = 0, cache: KVCache = None):
        """tokens (B, T) ints -> logits (B, T, vocab_size) in the model's dtype.

        Without a cache this is a full forward from position 0 that keeps the activations for
        `backward`. With a cache, the keys and values of positions start_pos..start_pos+T-1 are written
        into it and the queries attend to everything cached so far (incremental decoding).
        """
        tokens = self._check_tokens(tokens, "tokens")
        B, T = tokens.shape
        self._check_positions(B, T, start_pos, cache)
        p, args = self.params, self.args
        keep = cache is None
        cos, sin = ops.rope_cos_sin(self.freqs, start_pos, T, self.dtype)
        x, emb_cache = ops.embedding_forward(tokens, p["tok_embeddings.weight"])  # (B, T, C)
        layer_caches = []
        for i in range(args.n_layers):
            x, lc = self._block_forward(i, x, cos, sin, start_pos, cache)
            layer_caches.append(lc)
        x, norm_cache = ops.rmsnorm_forward(x, p["norm.weight"], args.norm_eps)
        logits, out_cache = ops.linear_forward(x, self._output_weight())  # (B, T, V)
        self._acts = (emb_cache, layer_caches, norm_cache, out_cache) if keep else None
        return logits

    def _block_forward(self, i, x, cos, sin, start_pos, cache):
        p, args = self.params, self.args
        pre = f"layers.{i}."
        B, T, _ = x.shape
        H, KV, hd = args.n_heads, args.n_kv_heads, args.head_dim
        # attention
        xn, an_c = ops.rmsnorm_forward(x, p[pre + "attention_norm.weight"], args.norm_eps)
        xq, q_c = ops.linear_forward(xn, p[pre + "attention.wq.weight"])  # (B, T, H*hd)
        xk, k_c = ops.linear_forward(xn, p[pre + "attention.wk.weight"])  # (B, T, KV*hd)
        xv, v_c = ops.linear_forward(xn, p[pre + "attention.wv.weight"])  # (B, T, KV*hd)
        xq, _ = ops.rope_forward(xq.reshape(B, T, H, hd), cos, sin)  # (B, T, H, hd)
        xk, _ = ops.rope_forward(xk.reshape(B, T, KV, hd), cos, sin)  # (B, T, KV, hd)
        q = xq.transpose(0, 2, 1, 3)  # (B, H, T, hd)
        k = xk.transpose(0, 2, 1, 3)  # (B, KV, T, hd)
        v = xv.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)  # (B, KV, T, hd)
        if cache is not None:
            # write this step's keys/values, then attend over all S = start_pos + T cached positions
            S = start_pos + T
            cache.cache_k[i][:B, :, start_pos:S] = k
            cache.cache_v[i][:B, :, start_pos:S] = v
            k, v = cache.cache_k[i][:B, :, :S], cache.cache_v[i][:B, :, :S]  # (B, KV, S, hd)
        att, lse = backend.attention_forward(q, k, v, causal=True)  # (B, H, T, hd), (B, H, T)
        att2 = att.transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H*hd)
        att_out, o_c = ops.linear_forward(att2, p[pre + "attention.wo.weight"])
        h = x + att_out
        # feed-forward: w2(silu(w1 x) * w3 x)
        hn, fn_c = ops.rmsnorm_forward(h, p[pre + "ffn_norm.weight"], args.norm_eps)
        a, w1_c = ops.linear_forward(hn, p[pre + "feed_forward.w1.weight"])  # (B, T, hidden)
        b, w3_c = ops.linear_forward(hn, p[pre + "feed_forward.w3.weight"])  # (B, T, hidden)
        g, sw_c = ops.swiglu_forward(a, b)
        ffn_out, w2_c = ops.linear_forward(g, p[pre + "feed_forward.w2.weight"])
        out = h + ffn_out
        if cache is not None:
            return out, None
        return out, (an_c, q_c, k_c, v_c, cos, sin, (q, k, v, att, lse), o_c, fn_c, w1_c, w3_c, sw_c, w2_c)

    # ------------------------------------------------------------------------------------------------
    def backward(self, dlogits):
        """dlogits (B, T, vocab) for the last cache-less forward -> grads, keyed like `params`."""
        if self._acts is None:
            raise RuntimeError("backward needs a forward without a KV cache first")
        emb_cache, layer_caches, norm_cache, out_cache = self._acts
        if dlogits.shape != out_cache[0].shape[:-1] + (self.args.vocab_size,):
            raise ValueError(f"dlogits has shape {dlogits.shape}, expected "
                             f"{out_cache[0].shape[:-1] + (self.args.vocab_size,)} (the last forward's logits)")
        dlogits = np.asarray(dlogits, dtype=self.dtype)
        grads = {}
        dx, doutput = ops.linear_backward(dlogits, out_cache)
        dx, grads["norm.weight"] = ops.rmsnorm_backward(dx, norm_cache)
        for i in reversed(range(self.args.n_layers)):
            dx = self._block_backward(i, dx, layer_caches[i], grads)
        dembed = ops.embedding_backward(dx, emb_cache)
        if self.args.tie_embeddings:
            # one matrix used twice (lookup and LM head): its gradient is the sum of both uses
            grads["tok_embeddings.weight"] = dembed + doutput
        else:
            grads["tok_embeddings.weight"], grads["output.weight"] = dembed, doutput
        return {k: grads[k] for k in self.params}  # the params' order

    def _block_backward(self, i, dout, lc, grads):
        args = self.args
        pre = f"layers.{i}."
        an_c, q_c, k_c, v_c, cos, sin, (q, k, v, att, lse), o_c, fn_c, w1_c, w3_c, sw_c, w2_c = lc
        B, H, T, hd = q.shape
        KV = args.n_kv_heads
        # feed-forward, reversed; dout flows into the residual h as well
        dg, grads[pre + "feed_forward.w2.weight"] = ops.linear_backward(dout, w2_c)
        da, db = ops.swiglu_backward(dg, sw_c)
        dhn, grads[pre + "feed_forward.w1.weight"] = ops.linear_backward(da, w1_c)
        dhn3, grads[pre + "feed_forward.w3.weight"] = ops.linear_backward(db, w3_c)
        dh, grads[pre + "ffn_norm.weight"] = ops.rmsnorm_backward(dhn + dhn3, fn_c)
        dh += dout
        # attention, reversed
        datt2, grads[pre + "attention.wo.weight"] = ops.linear_backward(dh, o_c)
        datt = datt2.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
        dq, dk, dv = backend.attention_backward(datt, q, k, v, att, lse, causal=True)
        dxq = ops.rope_backward(dq.transpose(0, 2, 1, 3), (cos, sin)).reshape(B, T, H * hd)
        dxk = ops.rope_backward(dk.transpose(0, 2, 1, 3), (cos, sin)).reshape(B, T, KV * hd)
        dxv = dv.transpose(0, 2, 1, 3).reshape(B, T, KV * hd)
        dxn, grads[pre + "attention.wq.weight"] = ops.linear_backward(dxq, q_c)
        dxn_k, grads[pre + "attention.wk.weight"] = ops.linear_backward(dxk, k_c)
        dxn_v, grads[pre + "attention.wv.weight"] = ops.linear_backward(dxv, v_c)
        dx, grads[pre + "attention_norm.weight"] = ops.rmsnorm_backward(dxn + dxn_k + dxn_v, an_c)
        return dx + dh

    def loss_and_grads(self, tokens, targets, mask=None):
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
        logits = self.forward(tokens)
        loss, ce_cache = ops.cross_entropy_forward(logits, targets, mask)
        return loss, self.backward(ops.cross_entropy_backward(1.0, ce_cache))

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
        lo, hi = tokens.min(), tokens.max()
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


def param_shapes(args: ModelArgs) -> dict:
    """The shape of every weight, keyed by Meta's names, in checkpoint order."""
    C, hd, hidden = args.dim, args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, C)}
    for i in range(args.n_layers):
        pre = f"layers.{i}."
        shapes[pre + "attention.wq.weight"] = (args.n_heads * hd, C)
        shapes[pre + "attention.wk.weight"] = (args.n_kv_heads * hd, C)
        shapes[pre + "attention.wv.weight"] = (args.n_kv_heads * hd, C)
        shapes[pre + "attention.wo.weight"] = (C, args.n_heads * hd)
        shapes[pre + "feed_forward.w1.weight"] = (hidden, C)
        shapes[pre + "feed_forward.w2.weight"] = (C, hidden)
        shapes[pre + "feed_forward.w3.weight"] = (hidden, C)
        shapes[pre + "attention_norm.weight"] = (C,)
        shapes[pre + "ffn_norm.weight"] = (C,)
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
