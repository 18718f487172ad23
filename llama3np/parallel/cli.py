"""`llama3np parallel train`: llama3np train on a dp x tp x pp grid of processes.

    llama3np parallel train --out runs/par --dp 2 --tp 1 --pp 2 --schedule 1f1b --micro-batches 4 \\
        --override dim=64 --override n_layers=4 --steps 50
    llama3np parallel train ... --inject-fault kill:1@20         (the supervisor restarts from a checkpoint)
    mpiexec -n 4 python -m llama3np.parallel.cli train --backend mpi --dp 2 --pp 2 ...

The training arguments are those of `llama3np train` and the run folder is the same kind (so
`llama3np generate --model runs/par` and `llama3np train --resume` work on it). `--backend` here is the
communication backend (mp: spawned processes and pipes; mpi: mpi4py under mpiexec); the compute kernels
are chosen with `--kernels c|numpy`.

Hook into llama3np/cli.py (build_parser):    from .parallel import cli as parallel_cli
                                             parallel_cli.add_parser(sub)
`main(args)` is set as the sub-command's func and returns the exit code.
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..cli import add_train_arguments


def add_parallel_arguments(t):
    t.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per layer")
    t.add_argument("--pp", type=int, default=1, help="pipeline stages")
    t.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved", "zb"), default="1f1b",
                   help="pipeline schedule (zb: zero-bubble, the backward split into B and W)")
    t.add_argument("--chunks", type=int, default=2, help="model chunks per pipeline rank (interleaved schedule)")
    t.add_argument("--micro-batches", type=int, default=1, help="micro-batches per replica and step")
    t.add_argument("--zero", action="store_true", help="ZeRO-1: shard the AdamW moments over the replicas")
    t.add_argument("--bucket-kb", type=int, default=1024, help="DDP gradient bucket size (KiB)")
    t.add_argument("--overlap", action="store_true", help="all-reduce gradient buckets during the backward")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    t.add_argument("--backend", choices=("mp", "mpi"), default="mp", help="communication backend")
    t.add_argument("--kernels", choices=("c", "numpy"), default=None, help="compute kernels (default: numpy)")
    t.add_argument("--timeout", type=float, default=60.0, help="seconds any communication may wait")
    t.add_argument("--heartbeat-timeout", type=float, default=30.0, help="seconds of silence that mean hung")
    t.add_argument("--max-restarts", type=int, default=3)
    t.add_argument("--inject-fault", action="append", default=[], metavar="KIND:RANK@STEP",
                   help="kill:R@S, hang:R@S or nan:R@S (testing the recovery); may be repeated")


def add_parser(subparsers):
    """Register `parallel train` under the `llama3np` command's sub-parsers."""
    par = subparsers.add_parser("parallel", help="training on a grid of processes (data/tensor/pipeline)")
    sub = par.add_subparsers(dest="parallel_command", required=True)
    t = sub.add_parser("train", help="llama3np train with --dp/--tp/--pp processes")
    add_train_arguments(t)
    add_parallel_arguments(t)
    t.set_defaults(func=main)
    return par


def _configs(a):
    from ..cli import train_config
    from . import engine

    cfg = train_config(a, progress=False)
    pcfg = engine.ParallelConfig(dp=a.dp, tp=a.tp, pp=a.pp, schedule=a.schedule, micro_batches=a.micro_batches,
                                 chunks=a.chunks,
                                 zero=a.zero, bucket_bytes=a.bucket_kb * 1024, overlap=a.overlap, dtype=a.dtype,
                                 timeout=a.timeout, kernels=a.kernels,
                                 faults=[engine.parse_fault(s) for s in a.inject_fault])
    return cfg, pcfg


def main(a):
    """Run `llama3np parallel train` with parsed arguments `a` -> exit code."""
    from . import engine, supervisor

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        cfg, pcfg = _configs(a)
        if a.backend == "mpi":
            from . import mpi

            return mpi.main(cfg, pcfg, log)
        # the grid's errors before anything is written (the vocabulary is checked again once the
        # tokenizer has fixed it)
        engine.check_config(engine.train_mod.build_args(cfg), pcfg, cfg.batch_size * cfg.grad_accum)
        cfg = engine.prepare_run(cfg, log)
        summary = supervisor.supervise(cfg.out, cfg, pcfg, max_restarts=a.max_restarts,
                                       heartbeat_timeout=a.heartbeat_timeout, log=log)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as e:
        print(f"llama3np parallel: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the restart budget is spent (GroupFailure is a RuntimeError too)
        print(f"llama3np parallel: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the workers were stopped by launch.run's cleanup
        print("\nllama3np parallel: interrupted", file=sys.stderr)
        return 130
    write_report(cfg.out, pcfg, summary)
    log(supervisor.format_summary(summary))
    stopped = summary["results"][0].get("stopped")
    if stopped:
        print(f"llama3np parallel: training stopped: {stopped}", file=sys.stderr)
        return 1
    engine.final_eval(cfg, log)
    last = [r for o in summary["results"] for r in o["records"]][-1:] or [None]
    log(f"done: {last[0]} -- checkpoints in {cfg.out} (trace.json, gantt.png, parallel.json beside them)")
    return 0


def write_report(run_dir, pcfg, summary):
    """parallel.json (grid, failures, goodput, bytes sent, memory, peak activations per rank),
    trace.json and gantt.png of the last step."""
    from ..fileio import atomic_write_bytes
    from .trace import Trace

    results = summary["results"]
    trace = Trace()
    for o in results:
        for ev in o["trace"]:
            trace.add(*ev)
    if trace.events:
        t0 = min(e[3] for e in trace.events)
        trace.events = [(r, n, mb, s - t0, e - t0) for r, n, mb, s, e in trace.events]
        trace.to_json(Path(run_dir) / "trace.json")
        labels = {o["rank"]: "rank {} (dp{} tp{} pp{})".format(o["rank"], *o["coords"]) for o in results}
        trace.gantt(Path(run_dir) / "gantt.png", title=f"last step: dp={pcfg.dp} tp={pcfg.tp} pp={pcfg.pp} "
                    f"{pcfg.schedule}, {pcfg.micro_batches} micro-batches", labels=labels)
    report = {"grid": asdict(pcfg), "failures": summary["failures"], "restarts": summary["restarts"],
              "wall_s": summary["wall_s"], "useful_s": summary["useful_s"], "goodput": summary["goodput"],
              "ranks": [{k: o[k] for k in ("rank", "coords", "peak_activations", "peak_activation_bytes", "bytes_sent",
                                            "memory", "seconds")}
                        for o in results]}
    atomic_write_bytes(Path(run_dir) / "parallel.json", json.dumps(report, indent=1, default=str).encode())


def _standalone(argv=None):
    """`python -m llama3np.parallel.cli train ...` (what mpiexec runs, and usable before cli.py hooks us in)."""
    parser = argparse.ArgumentParser(prog="llama3np parallel")
    sub = parser.add_subparsers(dest="parallel_command", required=True)
    t = sub.add_parser("train")
    add_train_arguments(t)
    add_parallel_arguments(t)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone())
