"""Training on a dp x tp x pp grid: the worker every process runs, and the single-process reference.

One step on every rank (the same arithmetic as llama3np.training.train, spread over processes):

    x, y       = the global batch (every rank draws the same one from the loader), this replica's rows,
                 cut into m micro-batches
    losses     = run_schedule(...)            forward/backward of this stage's layers (tp slices inside)
    grads      = data-parallel average         (GradReducer, or ZeRO-1's reduce-scatter)
    loss, norm = one world all-reduce of [this rank's share of the loss, of the squared gradient norm]
    stop on a non-finite loss/norm (reported to the supervisor), skip a loss spike, clip, AdamW

What follows the loss and the norm (the spike rule, clipping, the counters and the log record) is
llama3np.training.step's, the code the single-process loop runs. The run folder is llama3np train's
(prepare_run: training.start_run): the workers start from its latest checkpoint
(run_folder.restore_run) and write checkpoints of the full, unsharded weights and AdamW moments
(gathered on rank 0; run_folder.save_run), so a run can continue on any grid, or with
`llama3np train --resume`.
"""
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import data as data_mod
from ..args import ModelArgs
from ..optim import AdamW, get_lr, sum_of_squares
from ..training import run_folder as ckpt
from ..training.config import TrainConfig
from ..training.loop import evaluate, start_run
from ..training.step import bad_step_reason, clip_to_max_norm, stop_message
from . import launch
from . import tensor_parallel as tp_mod
from .data_parallel import GradReducer, ZeroAdamW, shard_rows
from .grid import Grid, GridShape
from .pipeline_parallel import StageModel, run_schedule, stage_param_names
from .schedule import make_schedule
from .trace import Trace



@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zb
    micro_batches: int = 1  # per replica and step
    chunks: int = 2  # model chunks per rank, for the interleaved schedule
    zero: bool = False  # ZeRO-1: AdamW moments sharded over the dp ranks
    bucket_bytes: int = 1 << 20  # DDP bucket size
    overlap: bool = False  # all-reduce buckets during the backward
    dtype: str = "float32"
    timeout: float = 60.0  # every communication
    faults: list = field(default_factory=list)  # [(kind, rank, step)], kind in kill | hang | nan
    kernels: str = None  # compute backend in the workers: "c" or "numpy" (None: numpy)
    attempt: int = 0

    def shape(self):
        return GridShape(self.dp, self.tp, self.pp)

    def n_chunks(self):
        """Model chunks per pipeline rank: `chunks` for the interleaved schedule, else 1."""
        return self.chunks if self.schedule == "interleaved" else 1


def parse_fault(spec):
    """'kill:1@3' -> ('kill', 1, 3): rank 1 is killed during step 3 (steps count from 1)."""
    try:
        kind, rest = spec.split(":")
        rank, step = rest.split("@")
        fault = (kind, int(rank), int(step))
    except ValueError:
        raise ValueError(f"bad fault {spec!r}: expected KIND:RANK@STEP, e.g. kill:1@3") from None
    if kind not in ("kill", "hang", "nan"):
        raise ValueError(f"bad fault {spec!r}: the kind must be kill, hang or nan")
    if fault[1] < 0 or fault[2] < 1:
        raise ValueError(f"bad fault {spec!r}: RANK must be >= 0 and STEP >= 1")
    return fault


def check_config(args, pcfg, batch_rows):
    """Every error a grid can have, before any process starts: sizes that do not divide, too many stages."""
    pcfg.shape()
    tp_mod.check_tp(args, pcfg.tp)
    make_schedule(pcfg.schedule, pcfg.pp, pcfg.micro_batches, pcfg.chunks)
    if pcfg.pp * pcfg.n_chunks() > args.n_layers:
        chunks = f" x {pcfg.n_chunks()} chunks" if pcfg.n_chunks() > 1 else ""
        raise ValueError(f"pipeline parallelism over pp={pcfg.pp} stages{chunks} needs at least as many layers, "
                         f"the model has n_layers={args.n_layers}")
    shard_rows(batch_rows, pcfg.dp, 0, pcfg.micro_batches)
    for kind, rank, step in pcfg.faults:
        if rank >= pcfg.shape().world_size:
            raise ValueError(f"fault {kind}:{rank}@{step} names rank {rank}, but the grid has "
                             f"{pcfg.shape().world_size} ranks")
    if args.tie_embeddings and pcfg.pp > 1 and pcfg.zero:
        raise ValueError("tied embeddings with pipeline parallelism and ZeRO-1 are not supported: the two copies "
                         "of the embedding would need their gradients summed across stages inside ZeRO's flat shards")
    if pcfg.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {pcfg.dtype!r}")


def all_param_names(args):
    return stage_param_names(args, 1, 0)


# ----------------------------------------------------------------------------------------------------
# the worker


class _Worker:
    """One rank's state: its grid coordinates, parameter shards, optimizer, loader, schedule."""

    def __init__(self, pg, run_dir, cfg, pcfg):
        self.pg, self.run_dir, self.cfg, self.pcfg = pg, Path(run_dir), cfg, pcfg
        self.grid = g = Grid(pg, pcfg.shape())
        self.dtype = np.dtype(pcfg.dtype)
        r = ckpt.restore_run(self.run_dir, warn=False)  # the newest good checkpoint (the supervisor's restart point)
        if r is None:
            raise FileNotFoundError(f"{run_dir} holds no checkpoint to start from")
        if r.opt_state is None:
            raise ValueError(f"{r.path} holds the weights only (no AdamW moments): the run cannot continue from it")
        self.args = args = r.model_args
        self.tokenizer_bytes = r.tokenizer_bytes
        # this rank's virtual stages: chunk c is stage c * pp + pp_rank of pp * chunks (one chunk unless interleaved)
        v = pcfg.n_chunks()
        self.vstages = [c * pcfg.pp + g.pp_rank for c in range(v)]
        self.names = list(dict.fromkeys(n for vs in self.vstages for n in stage_param_names(args, pcfg.pp * v, vs)))
        self.params = {n: tp_mod.shard(n, r.params[n].astype(self.dtype), pcfg.tp, g.tp_rank) for n in self.names}
        self.models = [StageModel(args, self.params, pcfg.pp * v, vs, g.tp_group) for vs in self.vstages]
        self.holds_first, self.holds_last = self.models[0].is_first, self.models[-1].is_last
        kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        opt = r.opt_state
        local_m = {n: tp_mod.shard(n, opt["m"][n].astype(self.dtype), pcfg.tp, g.tp_rank) for n in self.names}
        local_v = {n: tp_mod.shard(n, opt["v"][n].astype(self.dtype), pcfg.tp, g.tp_rank) for n in self.names}
        if pcfg.zero:
            self.opt = ZeroAdamW(self.params, g.dp_group, **kw)
            self.opt.load_state(opt["t"], local_m, local_v)
        else:
            self.opt = AdamW(self.params, **kw)
            self.opt.load_state_dict(dict(opt, m=local_m, v=local_v))
            order = list(reversed(self.names))  # reverse layer order: the order the backward finishes them
            self.reducer = GradReducer(g.dp_group, order, {n: p.shape for n, p in self.params.items()}, self.dtype,
                                       pcfg.bucket_bytes, pcfg.overlap)
        with np.load(self.run_dir / "data.npz") as z:
            train_stream = z["train"]
        self.loader = data_mod.DataLoader(train_stream, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
        self.loader.load_state_dict(r.loader_state)
        self.state = r.state  # a training.RunState: step, recent losses, bad-step counters, RNG
        self.actions = make_schedule(pcfg.schedule, pcfg.pp, pcfg.micro_batches, pcfg.chunks)[g.pp_rank]
        self.start_step = self.state.step
        self.peak = self.peak_bytes = 0  # micro-batch activations held at once: count and bytes
        self.trace = Trace()
        if pg.rank == 0:  # the log holds the steps up to the checkpoint we start from
            ckpt.trim_log(self.run_dir / "log.jsonl", self.start_step)

    # --- one step ------------------------------------------------------------------------------------
    def micro_batches(self):
        cfg, pcfg, g = self.cfg, self.pcfg, self.grid
        xs, ys = zip(*[self.loader.next_batch() for _ in range(cfg.grad_accum)])
        x, y = np.concatenate(xs), np.concatenate(ys)  # the global batch, (batch_size*grad_accum, T)
        rows = shard_rows(len(x), pcfg.dp, g.dp_rank, pcfg.micro_batches)
        x, y = x[rows], y[rows]
        return list(zip(np.split(x, pcfg.micro_batches), np.split(y, pcfg.micro_batches)))

    def fault(self, step, where):
        for kind, rank, at in self.pcfg.faults:
            if rank == self.pg.rank and at == step and (kind == "nan") == (where == "loss"):
                launch.report_fault(kind, step)
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if kind == "hang":
                    parent = os.getppid()
                    while os.getppid() == parent:  # alive but silent: only the heartbeat watch can tell
                        time.sleep(0.2)
                    os._exit(1)  # the parent is gone (it would have killed us): do not linger as an orphan
                return True
        return False

    def step(self):
        cfg, pcfg, g, st = self.cfg, self.pcfg, self.grid, self.state
        step = st.step  # 0-based; this is step step+1 of the log
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        mbs = self.micro_batches()
        self.trace = Trace()
        grads = {}
        if not pcfg.zero:
            self.reducer.start(grads, on_event=lambda name, b, t0, t1: self.trace.add(self.pg.rank, name, b, t0, t1))
        on_ready = self.reducer.ready if (pcfg.overlap and not pcfg.zero) else None
        losses, peak, peak_bytes = run_schedule(self.actions, self.models, g.pp_group, mbs, grads,
                                                on_ready=on_ready, trace=self.trace, rank=self.pg.rank)
        self.peak = max(self.peak, peak)
        self.peak_bytes = max(self.peak_bytes, peak_bytes)
        self.fault(step + 1, "compute")
        if pcfg.zero:
            t0 = time.time()
            gshard = self.opt.reduce_grads(grads, pcfg.dp)
            if pcfg.dp > 1:
                self.trace.add(self.pg.rank, "reduce_scatter", None, t0, time.time())
        else:
            self.reducer.finish()
        self.sync_tied_grads(grads if not pcfg.zero else None)
        # one world all-reduce: [share of the mean loss, share of the squared gradient norm]
        loss_share = float(np.mean(losses)) / pcfg.dp if (self.holds_last and g.tp_rank == 0) else 0.0
        if self.fault(step + 1, "loss"):
            loss_share = float("nan")
        sq = self.sq_norm_share(grads if not pcfg.zero else self.opt.piece_grads(gshard))
        loss, sq = g.world.all_reduce(np.array([loss_share, sq], dtype=np.float64))
        loss, norm = float(loss), math.sqrt(sq) if sq >= 0 else float("nan")
        if not (math.isfinite(loss) and math.isfinite(norm)):
            launch.report_nan(step + 1)
            raise FloatingPointError(f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({norm})")
        reason = bad_step_reason(loss, norm, st.recent, cfg)  # llama3np train's rules: here only a spike
        if reason is None:
            clip_to_max_norm(grads if not pcfg.zero else [gshard], norm, cfg.grad_clip)  # the whole model's norm
            if pcfg.zero:
                self.opt.step(gshard, lr)
            else:
                self.opt.step(grads, lr=lr)
        self.grads = grads
        return st.end_step(cfg, loss, norm, lr, reason)

    def sq_norm_share(self, grads):
        """This rank's part of sum(g**2): each element of the model counted on exactly one rank."""
        g = self.grid
        total = 0.0
        if g.dp_rank != 0 and not self.pcfg.zero:
            return total  # the replicas hold the same averaged gradients; replica 0 counts them
        for name in self.names:
            if name not in grads:
                continue
            if g.tp_rank != 0 and tp_mod.shard_axis(name) is None:
                continue  # replicated over tp (norm weights): counted by tp rank 0
            if name == "tok_embeddings.weight" and self.holds_last and not self.holds_first:
                continue  # the last stage's copy of tied embeddings: counted on the first stage
            total += sum_of_squares(grads[name])  # global_grad_norm's pieces: one process's bits
        return total

    def sync_tied_grads(self, grads):
        """Tied embeddings over several stages: both copies get lookup gradient + output gradient."""
        if not (self.args.tie_embeddings and self.pcfg.pp > 1):
            return
        pp, s = self.grid.pp_group, self.grid.pp_rank
        if s in (0, self.pcfg.pp - 1):
            other = self.pcfg.pp - 1 - s
            pp.send(grads["tok_embeddings.weight"], other, "tied")
            theirs = pp.recv(other, "tied")
            mine = grads["tok_embeddings.weight"]
            # the same order on both stages (lookup + output), so both copies stay bitwise equal
            grads["tok_embeddings.weight"] = mine + theirs if s == 0 else theirs + mine

    # --- checkpoints -----------------------------------------------------------------------------
    def save(self, weights_only=False):
        """Gather the full weights and moments on rank 0 and write llama3np train's checkpoint."""
        g, pcfg = self.grid, self.pcfg
        if pcfg.zero:
            t, m, v = self.opt.gather_state()
        else:
            t, m, v = self.opt.t, self.opt.m, self.opt.v
        mine = {"params": self.params, "m": m, "v": v}
        if g.dp_rank != 0:
            return None
        if g.world.rank != 0:
            g.world.send_object(mine, 0, "checkpoint")
            return None
        parts = {}
        for p in range(pcfg.pp):
            for t_ in range(pcfg.tp):
                r = pcfg.shape().rank_of(0, t_, p)
                parts[t_, p] = mine if r == 0 else g.world.recv_object(r, "checkpoint")
        full = {"params": {}, "m": {}, "v": {}}
        n_vs = pcfg.pp * pcfg.n_chunks()
        for name in all_param_names(self.args):
            stage = next(vs for vs in range(n_vs) if name in stage_param_names(self.args, n_vs, vs)) % pcfg.pp
            for key in full:
                full[key][name] = tp_mod.unshard(name, [parts[t_, stage][key][name] for t_ in range(pcfg.tp)])
        cfg = self.cfg
        opt_state = {"t": t, "lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
                     "m": full["m"], "v": full["v"]}
        return ckpt.save_run(self.run_dir, params=full["params"], opt_state=None if weights_only else opt_state,
                             tokenizer_bytes=self.tokenizer_bytes, model_args=self.args,
                             loader_state=self.loader.state_dict(), state=self.state, keep=cfg.keep)

    def memory_bytes(self):
        """Bytes this rank holds for training: parameters + gradients + optimizer state."""
        params = sum(p.nbytes for p in self.params.values())
        grads = sum(a.nbytes for a in self.grads.values())
        opt = self.opt.state_bytes() if self.pcfg.zero else \
            sum(a.nbytes for a in self.opt.m.values()) + sum(a.nbytes for a in self.opt.v.values())
        return {"params": params, "grads": grads, "optimizer": opt, "n_params": sum(p.size for p in self.params.values())}


def train_worker(pg, run_dir, cfg_json, pcfg_json):
    """The function every process runs (launch.run): train from the latest checkpoint to cfg.steps."""
    cfg = TrainConfig.from_json(cfg_json, out=str(run_dir)).resolved()
    pcfg = ParallelConfig(**pcfg_json)
    if pcfg.kernels is not None:
        from .. import backend

        backend.set_backend(pcfg.kernels)
    w = _Worker(pg, run_dir, cfg, pcfg)
    launch.heartbeat(w.state.step)
    records, t_start, stopped = [], time.time(), None
    log = open(w.run_dir / "log.jsonl", "a") if pg.rank == 0 else None
    try:
        while w.state.step < cfg.steps:
            t_step, cpu_step = time.perf_counter(), time.process_time()
            rec = w.step()
            rec["step_s"] = time.perf_counter() - t_step
            rec["step_cpu_s"] = time.process_time() - cpu_step  # this process's CPU time (all its threads)
            records.append(rec)
            if log is not None:
                ckpt.append_log(log, rec)
            if w.state.bad_in_row >= cfg.max_bad_steps:
                # as llama3np train: save the last good weights and stop; every rank decides alike (same loss)
                w.save()
                stopped = stop_message(w.state, rec["skipped"])
                break
            done = w.state.step == cfg.steps
            if w.state.step % cfg.save_every == 0 or done:
                w.save(weights_only=done and cfg.final_weights_only)
            launch.heartbeat(w.state.step)
    finally:
        if log is not None:
            log.close()
    g = w.grid
    stats = {grp.name: dict(grp.stats) for grp in (g.dp_group, g.tp_group, g.pp_group, g.world)}
    return {"rank": pg.rank, "coords": (g.dp_rank, g.tp_rank, g.pp_rank), "start_step": w.start_step,
            "records": records, "peak_activations": w.peak, "peak_activation_bytes": w.peak_bytes,
            "bytes_sent": stats,
            "memory": w.memory_bytes() if records else None, "trace": w.trace.events,
            "seconds": time.time() - t_start,
            "bucket_launch_order": list(getattr(getattr(w, "reducer", None), "launch_log", [])),
            "buckets_launched_during_backward": list(getattr(getattr(w, "reducer", None), "early_log", [])),
            "stopped": stopped}


# ----------------------------------------------------------------------------------------------------
# the parent side


def prepare_run(cfg, log=print):
    """Create the run folder (data, config, tokenizer) and its step-0 checkpoint, as llama3np train
    would (training.start_run); with cfg.resume, check the folder against it. -> the resolved TrainConfig."""
    run = start_run(cfg, log)
    if run.resumed_from is None:
        run.save()  # the step-0 checkpoint every worker starts from
    return run.cfg


def final_eval(cfg, log=print):
    """Validation loss of the run's final weights (as llama3np train does after its last step), appended
    to log.jsonl. The parallel run itself does not pause for validation every eval_every steps."""
    from ..training.run_folder import load_run

    model = load_run(cfg.out)
    with np.load(Path(cfg.out) / "data.npz") as z:
        val_stream = z["val"]
        floor = float(z["val_floor"]) if "val_floor" in z.files else None
    val = evaluate(model, val_stream, cfg.seq_len)
    rec = {"step": model.train_step, "val_loss": val}
    msg = f"step {model.train_step}: val loss {val:.4f}"
    if floor is not None:
        rec["floor"] = floor
        msg += f" (entropy floor {floor:.4f}, {val - floor:+.4f} above it)"
    with open(Path(cfg.out) / "log.jsonl", "a") as f:
        ckpt.append_log(f, rec)
    log(msg)
    return val


def cfg_json(cfg):
    d = cfg.to_json()
    d["betas"] = tuple(d["betas"])
    return d


def reference_train(run_dir, steps, dtype=np.float64):
    """The single-process run every grid must reproduce: the run folder's step-0 checkpoint, the same
    loader, llama3np.training's schedule, clipping and AdamW, model.loss_and_grads on the global batch.
    -> the Transformer after `steps` steps (or the configured number)."""
    from ..model import Transformer
    from ..optim import clip_grad_norm

    run_dir = Path(run_dir)
    cfg = TrainConfig.from_json(json.loads((run_dir / "config.json").read_text()), out=str(run_dir)).resolved()
    ck = ckpt.read_checkpoint(min(ckpt.list_checkpoints(run_dir)))  # the oldest one kept: step 0
    if ck["meta"]["step"] != 0:
        raise ValueError(f"{run_dir} no longer holds its step-0 checkpoint")
    model = Transformer(ModelArgs.from_dict(ck["meta"]["model_args"]), dtype=dtype, init=False)
    for n, p in model.params.items():
        p[...] = ck["params"][n]
    opt = AdamW(model.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    with np.load(run_dir / "data.npz") as z:
        loader = data_mod.DataLoader(z["train"], cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    for step in range(steps):
        xs, ys = zip(*[loader.next_batch() for _ in range(cfg.grad_accum)])
        loss, grads = model.loss_and_grads(np.concatenate(xs), np.concatenate(ys))
        clip_grad_norm(grads, cfg.grad_clip)
        opt.step(grads, lr=get_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    return model


def relative_error(ours, reference):
    """max over tensors of ||ours - reference|| / ||reference|| (Frobenius): how far two sets of weights are.

    Norm-wise rather than entry by entry: AdamW divides every gradient entry by its own running RMS, so
    an entry whose gradient is mostly rounding noise moves by a noisy ~lr after one step whatever the
    noise's size; such entries are few and small, and a norm-wise error weighs them by their size.
    """
    return max(float(np.linalg.norm(ours[n] - reference[n]) / np.linalg.norm(reference[n])) for n in reference)


def run_grid(run_dir, cfg, pcfg, heartbeat_timeout=None, total_timeout=None, on_message=None):
    """Run the workers of one attempt on a spawned group (mp backend) -> the per-rank summaries."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())
    check_config(ModelArgs.from_dict(saved["model_args"]), pcfg, cfg.batch_size * cfg.grad_accum)
    return launch.run(train_worker, pcfg.shape().world_size, args=(str(run_dir), cfg_json(cfg), asdict(pcfg)),
                      timeout=pcfg.timeout, heartbeat_timeout=heartbeat_timeout, total_timeout=total_timeout,
                      on_message=on_message)
