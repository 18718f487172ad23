"""Data parallelism: every replica computes gradients on its shard of the batch, then they average them.

    rank d of dp takes rows [d*B/dp, (d+1)*B/dp) of the global batch
    grads = all_reduce(grads) / dp          (the ring in comm.py; every replica gets the same numbers)

`GradReducer` does the all-reduce the way PyTorch's DDP does: gradients are packed into buckets of
about `bucket_bytes`, filled in reverse layer order (the order the backward produces them), and the
buckets are launched strictly in order, so every rank issues the same collectives in the same order.
With `overlap=True` a bucket is all-reduced on a background thread as soon as its gradients are
final, while the backward of earlier layers is still running.

`ZeroAdamW` is ZeRO stage 1 (Rajbhandari et al. 2020): the AdamW moments are split across the dp ranks.
Each rank reduce-scatters the gradients (getting the averaged gradient of its 1/N of the flat parameter
vector), updates that 1/N with its 1/N of the moments, and all-gathers the parameters. Memory per rank
in fp32: 4 (params) + 4 (grads) + 8/N (two moments) bytes per parameter, instead of 16. The arithmetic
is AdamW's, element for element, so the weights are bitwise those of plain data parallelism.
"""
import queue
import threading
import time

import numpy as np

from ..optim import AdamW


def shard_rows(n_rows, dp, dp_rank, micro_batches=1):
    """The rows of the global batch this replica takes; raises if the batch does not divide."""
    if n_rows % (dp * micro_batches):
        raise ValueError(f"the global batch of {n_rows} rows does not split into dp={dp} replicas x "
                         f"{micro_batches} micro-batches: make the batch size a multiple of {dp * micro_batches}")
    per = n_rows // dp
    return slice(dp_rank * per, (dp_rank + 1) * per)


class GradReducer:
    """Average gradients over the dp group, bucket by bucket, in a fixed order.

    names: the parameter names in the order their gradients become final (reverse layer order);
    sizes: name -> number of elements. scale: the divisor (dp).
    """

    def __init__(self, group, names, shapes, dtype, bucket_bytes=1 << 20, overlap=False):
        self.group, self.overlap = group, overlap
        self.scale = group.size
        self.shapes = shapes
        self.buckets, cur, cur_bytes = [], [], 0
        itemsize = np.dtype(dtype).itemsize
        for name in names:
            cur.append(name)
            cur_bytes += int(np.prod(shapes[name])) * itemsize
            if cur_bytes >= bucket_bytes:
                self.buckets.append(cur)
                cur, cur_bytes = [], 0
        if cur:
            self.buckets.append(cur)
        self.bucket_of = {n: b for b, names_ in enumerate(self.buckets) for n in names_}
        self.launch_log = []  # bucket indices in the order they were launched (for tests and teaching)
        self.early_log = []  # per step: how many buckets went out while the backward was still running
        self._reset()

    def _reset(self):
        self._finishing = False
        self._early = 0
        self._ready = [set() for _ in self.buckets]
        self._next = 0  # the next bucket to launch: buckets go out strictly in order
        self._grads = None
        self._results = {}
        self._queue = self._thread = None
        self._error = None

    def start(self, grads, on_event=None):
        """Begin a step whose gradients will be written into `grads` (marked with `ready`).
        on_event(name, bucket, t0, t1) is told when each bucket's all-reduce ran (for the trace)."""
        self._reset()
        self._grads = grads
        self.on_event = on_event
        if self.overlap and self.group.size > 1:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._worker, daemon=True, name="ddp-allreduce")
            self._thread.start()

    def ready(self, names):
        """The gradients of `names` are final: launch every bucket that is now complete, in order."""
        for n in names:
            if n in self.bucket_of:
                self._ready[self.bucket_of[n]].add(n)
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b):
        self.launch_log.append(b)
        self._early += not self._finishing
        flat = np.concatenate([self._grads[n].reshape(-1) for n in self.buckets[b]])  # (bucket elements,)
        if self._queue is not None:
            self._queue.put((b, flat))
        else:
            self._results[b] = self._reduce(b, flat)

    def _reduce(self, b, flat):
        t0 = time.time()
        out = self.group.all_reduce(flat)
        if self.scale != 1:
            out = out / np.asarray(self.scale, dtype=out.dtype)
        if self.on_event is not None and self.group.size > 1:
            self.on_event("allreduce", b, t0, time.time())
        return out

    def _worker(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            b, flat = item
            try:
                self._results[b] = self._reduce(b, flat)
            except BaseException as e:  # surfaced by finish()
                self._error = e
                return

    def finish(self):
        """Launch what is left (in order), wait for every bucket, write the averages back into grads."""
        self._finishing = True
        self.ready([n for names in self.buckets for n in names])
        self.early_log.append(self._early)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(self.group.timeout * (len(self.buckets) + 1))
            if self._error is not None:
                raise self._error
            if self._thread.is_alive():
                raise TimeoutError("the data-parallel all-reduce thread did not finish")
        for b, names in enumerate(self.buckets):
            flat, off = self._results[b], 0
            for n in names:
                size = int(np.prod(self.shapes[n]))
                self._grads[n] = flat[off:off + size].reshape(self.shapes[n])
                off += size


class ZeroAdamW:
    """AdamW with its moments sharded over the dp group (ZeRO-1); params: this replica's full dict.

    The flat parameter vector (params in dict order) is cut like comm's reduce_scatter cuts it
    (np.array_split into N pieces); rank r owns piece r. Its moments are kept as a dict of views, one per
    parameter that overlaps the piece, shaped (1, k) for matrices so AdamW still decays them and (k,)
    for norm weights so it does not: the update is AdamW's own code.
    """

    def __init__(self, params, group, **adamw_kwargs):
        self.params, self.group = params, group
        self.names = list(params)
        sizes = [params[n].size for n in self.names]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.offset_of = dict(zip(self.names, self.offsets[:-1].tolist()))
        self.total = int(self.offsets[-1])
        bounds = np.concatenate([[0], np.cumsum([len(c) for c in np.array_split(np.arange(self.total), group.size)])])
        self.lo, self.hi = int(bounds[group.rank]), int(bounds[group.rank + 1])
        dtype = params[self.names[0]].dtype
        self.shard = np.zeros(self.hi - self.lo, dtype=dtype)  # this rank's piece of the flat parameters
        self.pieces = {}  # name -> (start in the param's flat view, view into self.shard)
        for n, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:]):
            s, e = max(a, self.lo), min(b, self.hi)
            if s < e:
                view = self.shard[s - self.lo:e - self.lo]
                self.pieces[n] = (s - a, view.reshape(1, -1) if params[n].ndim >= 2 else view)
        self.opt = AdamW({n: v for n, (_, v) in self.pieces.items()}, **adamw_kwargs)

    def flat_grads(self, grads):
        return np.concatenate([grads[n].reshape(-1) for n in self.names])

    def reduce_grads(self, grads, scale):
        """reduce-scatter the flat gradient -> this rank's piece, averaged (divided by `scale`)."""
        g = self.group.reduce_scatter(self.flat_grads(grads))
        return g / np.asarray(scale, dtype=g.dtype) if scale != 1 else g

    def piece_grads(self, shard_grad):
        out = {}
        for n, (start, view) in self.pieces.items():
            a = self.offset_of[n] + start - self.lo
            out[n] = shard_grad[a:a + view.size].reshape(view.shape)
        return out

    def step(self, shard_grad, lr):
        """Update this rank's piece with AdamW, then all-gather the pieces into every full parameter."""
        for n, (start, view) in self.pieces.items():  # the current weights of the piece
            view.reshape(-1)[:] = self.params[n].reshape(-1)[start:start + view.size]
        self.opt.step(self.piece_grads(shard_grad), lr=lr)
        flat = self.group.all_gather(self.shard)
        for n, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:]):
            self.params[n][...] = flat[a:b].reshape(self.params[n].shape)

    def state_bytes(self):
        return sum(a.nbytes for a in self.opt.m.values()) + sum(a.nbytes for a in self.opt.v.values())

    # moments as full per-parameter arrays, for a checkpoint that does not depend on dp
    def gather_state(self):
        """-> (t, m, v) with m, v full dicts name -> array (collective: every dp rank must call it)."""
        full = {}
        for key in ("m", "v"):
            piece = np.zeros_like(self.shard)
            for n, (start, view) in self.pieces.items():
                a = self.offset_of[n] + start - self.lo
                piece[a:a + view.size] = getattr(self.opt, key)[n].reshape(-1)
            flat = self.group.all_gather(piece)
            full[key] = {n: flat[a:b].reshape(self.params[n].shape).copy()
                         for n, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:])}
        return self.opt.t, full["m"], full["v"]

    def load_state(self, t, m, v):
        self.opt.t = int(t)
        for n, (start, view) in self.pieces.items():
            self.opt.m[n] = m[n].reshape(-1)[start:start + view.size].reshape(view.shape).astype(view.dtype)
            self.opt.v[n] = v[n].reshape(-1)[start:start + view.size].reshape(view.shape).astype(view.dtype)
