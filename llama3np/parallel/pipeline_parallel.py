"""Pipeline parallelism: the layers split into stages, one per process; micro-batches flow through them.

    stage 0:  tok_embeddings, layers 0 .. k-1          -> activations (B, T, dim) to stage 1
    stage s:  layers ...                               -> to stage s+1
    last:     layers ..., norm, output, cross-entropy  <- the loss starts the backward here

`StageModel` is this rank's part of the model (its layers, tensor-parallel slices included: a stage is
run by tp ranks together; with the interleaved schedule a rank holds several, one per model chunk).
`run_schedule` is the one executor: it walks the action list that schedule.py made for this rank
(F, B, send/recv of activations and gradients) and records a trace.
"""
import time

import numpy as np

from .. import backend, ops
from ..model import LAYER_PARAM_NAMES, accumulate, block_backward, block_forward
from . import tensor_parallel as tp_mod


def stage_layers(n_layers, n_stages, stage):
    """The layers of `stage`: as even as possible, the first stages taking one more when it does not divide."""
    if n_stages > n_layers:
        raise ValueError(f"pipeline parallelism over pp={n_stages} stages needs at least as many layers, "
                         f"the model has n_layers={n_layers}")
    base, extra = divmod(n_layers, n_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def stage_param_names(args, n_stages, stage):
    """The names of the parameters stage `stage` holds (in the order of model.params)."""
    layers = stage_layers(args.n_layers, n_stages, stage)
    names = []
    if stage == 0:
        names.append("tok_embeddings.weight")
    for i in layers:
        pre = f"layers.{i}."
        names += [pre + n for n in LAYER_PARAM_NAMES]
    if stage == n_stages - 1:
        names.append("norm.weight")
        # with tied embeddings the last stage keeps its own copy of the embedding as the output layer;
        # the two copies receive the sum of both gradients (see engine.sync_tied_grads), so they stay equal
        names.append("tok_embeddings.weight" if args.tie_embeddings else "output.weight")
    return list(dict.fromkeys(names))  # one stage holding both: only once


class StageModel:
    """Layers `layers` of the model on this rank; params: this rank's (tensor-parallel) slices."""

    def __init__(self, args, params, n_stages, stage, tp_group):
        self.args, self.params, self.tp_group = args, params, tp_group
        self.n_stages, self.stage = n_stages, stage
        self.layers = stage_layers(args.n_layers, n_stages, stage)
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.freqs = ops.rope_frequencies(args)
        self.out_name = "tok_embeddings.weight" if args.tie_embeddings else "output.weight"
        self.param_names = stage_param_names(args, n_stages, stage)

    def forward(self, inp, targets=None):
        """First stage: inp = tokens (B, T); others: activations (B, T, dim).
        -> (activations for the next stage, or the mean loss on the last stage; cache for backward)."""
        p, g = self.params, self.tp_group
        dtype = p["norm.weight" if self.is_last else f"layers.{self.layers[0]}.attention_norm.weight"].dtype
        T = inp.shape[1]
        rope = ops.rope_cos_sin(self.freqs, 0, T, dtype)  # (cos, sin)
        emb_c = None
        if self.is_first:
            x, emb_c = tp_mod.embedding_forward(inp, p["tok_embeddings.weight"], g)  # (B, T, dim)
        else:
            x = inp
        layer_caches = []
        for i in self.layers:
            x, lc = block_forward(p, i, x, rope, self.args, g)
            layer_caches.append(lc)
        if not self.is_last:
            return x, (emb_c, layer_caches, None)
        x, norm_c = backend.rmsnorm_forward(x, p["norm.weight"], self.args.norm_eps)
        logits, out_c = tp_mod.output_forward(x, p[self.out_name], g)  # (B, T, V/tp)
        loss, ce_c = tp_mod.cross_entropy_forward(logits, targets, g)
        return loss, (emb_c, layer_caches, (norm_c, out_c, ce_c))

    def backward(self, dout, cache, grads, dloss=1.0, on_ready=None, defer=None):
        """dout: gradient from the next stage (None on the last stage, which starts from the loss).
        Adds this micro-batch's gradients into `grads`; -> dx for the previous stage (None on the first).
        on_ready(names) is called as soon as the gradients of `names` are complete (for overlap).
        With a list `defer` (zero-bubble), the weight gradients of the matrices are appended to it as
        closures for a later W step, and on_ready is the W step's business."""
        emb_c, layer_caches, head = cache
        g = self.tp_group
        tied_here = self.args.tie_embeddings and self.is_first and self.is_last
        if self.is_last:
            norm_c, out_c, ce_c = head
            dlogits = tp_mod.cross_entropy_backward(dloss, ce_c)
            # a single stage with tied embeddings: the LM head's gradient waits under a temporary name and
            # is added to the lookup's gradient below (one matrix used twice: the sum of both uses)
            dx = tp_mod.output_backward(dlogits, out_c, g, grads, "_tied_output" if tied_here else self.out_name,
                                        defer)
            dx, dnorm = backend.rmsnorm_backward(dx, norm_c)
            accumulate(grads, "norm.weight", dnorm)
            _notify(on_ready, ["norm.weight"] if tied_here else [self.out_name, "norm.weight"])
        else:
            dx = dout
        for i, lc in zip(reversed(self.layers), reversed(layer_caches)):
            dx = block_backward(i, dx, lc, grads, g, defer)
            _notify(on_ready, [f"layers.{i}.{n}" for n in LAYER_PARAM_NAMES])
        if not self.is_first:
            return dx

        def embedding_grad():
            demb = tp_mod.embedding_backward(dx, emb_c)
            if tied_here:
                demb = demb + grads.pop("_tied_output")
            accumulate(grads, "tok_embeddings.weight", demb)

        if defer is None:
            embedding_grad()
        else:
            defer.append(embedding_grad)  # after the LM head's closure (appended first): the tied sum is ready
        _notify(on_ready, ["tok_embeddings.weight"])
        return None


def _notify(on_ready, names):
    if on_ready is not None:
        on_ready(names)


def run_schedule(actions, models, pp_group, micro_batches, grads, on_ready=None, trace=None, rank=0):
    """Execute this rank's action list for one training step.

    models: this rank's StageModel per model chunk (one, unless the schedule is interleaved).
    micro_batches: list of (tokens, targets) (only the first stage reads the tokens, only the last the
    targets). The gradients (each micro-batch's loss weighted 1/m) are added into the dict `grads`;
    on_ready is passed to the backward of each chunk's last micro-batch (its gradients are final then).
    -> (the micro-batch losses (last stage), the peak number of (micro-batch, chunk) activations held
    at once, the peak bytes of those activations).
    """
    m, p, s = len(micro_batches), pp_group.size, pp_group.rank
    nxt, prv = (s + 1) % p, (s - 1) % p  # with chunks, the last rank passes on to the first
    losses = []
    inputs, outputs, dys, dxs, caches = {}, {}, {}, {}, {}  # keyed by (micro-batch, chunk)
    sizes = {}  # (micro-batch, chunk) -> bytes of activations its cache keeps alive
    weights = {id(w) for model in models for w in model.params.values()}
    split_w = any(a.kind == "W" for a in actions)
    deferred = {}  # (micro-batch, chunk) -> closures computing its weight gradients (zero-bubble's W)
    peak = peak_bytes = 0
    for a in actions:
        key, model = (a.mb, a.chunk), models[a.chunk]
        t0 = time.time()
        if a.kind == "recv_fwd":
            inputs[key] = pp_group.recv(prv, "pp_fwd")
        elif a.kind == "F":
            inp = micro_batches[a.mb][0] if model.is_first else inputs.pop(key)
            out, caches[key] = model.forward(inp, micro_batches[a.mb][1])
            if model.is_last:
                losses.append(out)
            else:
                outputs[key] = out
            sizes[key] = cache_bytes(caches[key], weights)
            peak = max(peak, len(sizes))  # held from F to B (to W with zero-bubble)
            peak_bytes = max(peak_bytes, sum(sizes.values()))
        elif a.kind == "send_fwd":
            pp_group.send(outputs.pop(key), nxt, "pp_fwd")
        elif a.kind == "recv_bwd":
            dys[key] = pp_group.recv(nxt, "pp_bwd")
        elif a.kind == "B":
            last = a.mb == m - 1
            if split_w:  # zero-bubble: the weight gradients wait for this micro-batch's W
                deferred[key] = []
                dx = model.backward(dys.pop(key, None), caches.pop(key), grads, dloss=1.0 / m,
                                    defer=deferred[key])
                # what W still needs: the arrays its closures hold (layer inputs, output gradients)
                sizes[key] = cache_bytes([c.cell_contents for f in deferred[key] for c in f.__closure__ or ()],
                                         weights)
            else:
                dx = model.backward(dys.pop(key, None), caches.pop(key), grads, dloss=1.0 / m,
                                    on_ready=on_ready if last else None)
                del sizes[key]
            if dx is not None:
                dxs[key] = dx
        elif a.kind == "W":
            for weight_grad in deferred.pop(key):
                weight_grad()
            del sizes[key]  # the layer inputs kept for W can go now
            if a.mb == m - 1 and on_ready is not None:
                on_ready(model.param_names)
        elif a.kind == "send_bwd":
            pp_group.send(dxs.pop(key), prv, "pp_bwd")
        if trace is not None and a.kind in ("F", "B", "W"):
            trace.add(rank, a.kind, a.mb, t0, time.time())
    assert not (inputs or outputs or dys or dxs or caches or deferred), "the schedule left work in flight"
    return losses, peak, peak_bytes


def cache_bytes(cache, exclude):
    """Bytes of the distinct arrays a forward cache holds (views count as their base), weights excluded."""
    seen, total, stack = set(), 0, [cache]
    while stack:
        obj = stack.pop()
        if isinstance(obj, (tuple, list)):
            stack.extend(obj)
        elif isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) not in seen and id(base) not in exclude:
                seen.add(id(base))
                total += base.nbytes
    return total
