"""`llama3np parallel train`: llama3np train on a dp x tp x pp grid of processes.

    llama3np parallel train --out runs/par --dp 2 --tp 1 --pp 2 --schedule 1f1b --micro-batches 4 \\
        --override dim=64 --override n_layers=4 --steps 50
    llama3np parallel train ... --inject-fault kill:1@20         (the supervisor restarts from a checkpoint)
    mpiexec -n 4 python -m llama3np.parallel.cli train --comm mpi --dp 2 --pp 2 ...

The training arguments are those of `llama3np train` (llama3np.training.config) and the run folder is
the same kind (so `llama3np generate --model runs/par` and `llama3np train --resume` work on it).
`--backend` means what it means in every command, the compute kernels (c or numpy; here numpy unless
given); `--comm` is the communication backend (mp: spawned processes and pipes; mpi: mpi4py under
mpiexec).

Hook into llama3np/cli.py (build_parser):    from .parallel import cli as parallel_cli
                                             parallel_cli.add_subcommands(sub)
`run(args)` is the sub-command's func and returns the exit code; `main(argv)` parses and runs
(`python -m llama3np.parallel.cli train ...`, what mpiexec starts).
"""
import argparse
import sys
from pathlib import Path

from ..training.config import add_backend_argument, add_train_arguments, build_args, train_config


def add_parallel_arguments(t):
    t.add_argument("--dp", type=int, default=1, help="data-parallel replicas (default: 1)")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per layer (default: 1)")
    t.add_argument("--pp", type=int, default=1, help="pipeline stages (default: 1)")
    t.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved", "zb"), default="1f1b",
                   help="pipeline schedule (zb: zero-bubble, the backward split into B and W; default: 1f1b)")
    t.add_argument("--chunks", type=int, default=2,
                   help="model chunks per pipeline rank, for the interleaved schedule (default: 2)")
    t.add_argument("--micro-batches", type=int, default=1, help="micro-batches per replica and step (default: 1)")
    t.add_argument("--zero", action="store_true", help="ZeRO-1: shard the AdamW moments over the replicas")
    t.add_argument("--bucket-kb", type=int, default=1024, help="DDP gradient bucket size in KiB (default: 1024)")
    t.add_argument("--overlap", action="store_true", help="all-reduce gradient buckets during the backward")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="the workers' float type (default: float32)")
    t.add_argument("--comm", choices=("mp", "mpi"), default="mp",
                   help="communication backend: mp (spawned processes and pipes) or mpi (mpi4py, run under "
                        "mpiexec) (default: mp)")
    add_backend_argument(t, default_help="numpy")
    t.add_argument("--timeout", type=float, default=60.0, help="seconds any communication may wait (default: 60)")
    t.add_argument("--heartbeat-timeout", type=float, default=30.0,
                   help="seconds of silence that mean a worker hung (default: 30)")
    t.add_argument("--max-restarts", type=int, default=3, help="restarts after failures before giving up "
                                                               "(default: 3)")
    t.add_argument("--inject-fault", action="append", default=[], metavar="KIND:RANK@STEP",
                   help="kill:R@S, hang:R@S or nan:R@S (testing the recovery); may be repeated (default: none)")


def add_subcommands(subparsers):
    """Register `parallel train` under the `llama3np` command's sub-parsers."""
    par = subparsers.add_parser("parallel", help="training on a grid of processes (data/tensor/pipeline)")
    sub = par.add_subparsers(dest="parallel_command", required=True)
    t = sub.add_parser("train", help="llama3np train with --dp/--tp/--pp processes")
    add_train_arguments(t)
    add_parallel_arguments(t)
    t.set_defaults(func=run)
    return par


def _configs(a):
    from . import engine

    cfg = train_config(a)
    pcfg = engine.ParallelConfig(dp=a.dp, tp=a.tp, pp=a.pp, schedule=a.schedule, micro_batches=a.micro_batches,
                                 chunks=a.chunks,
                                 zero=a.zero, bucket_bytes=a.bucket_kb * 1024, overlap=a.overlap, dtype=a.dtype,
                                 timeout=a.timeout, kernels=a.backend,
                                 faults=[engine.parse_fault(s) for s in a.inject_fault])
    return cfg, pcfg


class Progress:
    """What the parent shows while the workers train: rank 0's step (its heartbeats) and the loss it
    logged, as a tqdm bar like `llama3np train`'s (or nothing, with --no-progress)."""

    def __init__(self, cfg, start_step):
        self.log_path = Path(cfg.out) / "log.jsonl"
        self.bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start_step, desc="parallel train", unit="step",
                            dynamic_ncols=True)

    def __call__(self, step):
        if self.bar is None:
            return
        self.bar.n = step  # after a restart the step goes back to the checkpoint's
        last = self._last_loss()
        if last is not None:
            self.bar.set_postfix(loss=f"{last:.3f}", refresh=False)
        self.bar.refresh()

    def _last_loss(self):
        """The loss of the last complete line of log.jsonl (only the file's tail is read)."""
        import json

        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 4096))
                tail = f.read().decode(errors="replace")
        except OSError:
            return None
        for line in reversed(tail.split("\n")[:-1]):  # complete lines only
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec.get("loss"), float):
                return rec["loss"]
        return None

    def write(self, msg):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(a):
    """Run `llama3np parallel train` with parsed arguments `a` -> exit code."""
    from . import engine, supervisor

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    progress = None
    try:
        cfg, pcfg = _configs(a)
        if cfg.doc_mask:
            raise ValueError("--doc-mask is for `llama3np train` (one process) for now: the parallel stages "
                             "run plain causal attention over the whole row")
        if a.comm == "mpi":
            from . import mpi

            return mpi.main(cfg, pcfg, log)
        # the grid's errors before anything is written (the vocabulary is checked again once the
        # tokenizer has fixed it)
        engine.check_config(build_args(cfg), pcfg, cfg.batch_size * cfg.grad_accum)
        if cfg.resume and supervisor.latest_step(cfg.out) >= cfg.steps:
            log(supervisor.finished_message(cfg, supervisor.latest_step(cfg.out)))
            return 0
        cfg = engine.prepare_run(cfg, log)
        progress = Progress(cfg, supervisor.latest_step(cfg.out))
        summary = supervisor.supervise(cfg.out, cfg, pcfg, max_restarts=a.max_restarts,
                                       heartbeat_timeout=a.heartbeat_timeout, log=progress.write, on_step=progress)
        progress.close()
        stopped = supervisor.finish(cfg, pcfg, summary, log)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as e:
        print(f"llama3np parallel: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the restart budget is spent (GroupFailure is a RuntimeError too)
        print(f"llama3np parallel: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the workers were stopped by launch.run's cleanup
        print("\nllama3np parallel: interrupted", file=sys.stderr)
        return 130
    finally:
        if progress is not None:
            progress.close()
    if stopped:
        print(f"llama3np parallel: training stopped: {stopped}", file=sys.stderr)
        return 1
    from ..training.run_folder import generate_hint

    log(f"try: {generate_hint(cfg.out)}")
    return 0


def main(argv=None):
    """`python -m llama3np.parallel.cli train ...` (what mpiexec runs) -> exit code."""
    parser = argparse.ArgumentParser(prog="llama3np parallel")
    sub = parser.add_subparsers(dest="parallel_command", required=True)
    t = sub.add_parser("train")
    add_train_arguments(t)
    add_parallel_arguments(t)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
