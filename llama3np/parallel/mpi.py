"""The MPI backend: the same ProcessGroup (and the same ring algorithms) over mpi4py.

    pip install -e '.[mpi]'                      # mpi4py and MPICH, both from PyPI
    mpiexec -n 4 python -m llama3np.parallel.cli train --comm mpi --dp 2 --pp 2 --out runs/mpi ...

Only the transport changes: `MPITransport` moves a message with a non-blocking send (so a ring never
deadlocks, as with the pipes' sender threads) and receives by polling `Iprobe` until the timeout, so a
dead or hung peer still turns into a CommTimeout instead of a hang. Because the collectives are
comm.py's own ring, an MPI run computes exactly the numbers of an mp run (bitwise). MPI's own
Allreduce would be faster on a real cluster; ours is here to be read.

There is no supervisor under mpiexec (the MPI launcher owns the processes, and MPI stops the whole job
when one rank fails); fault injection and restarts are the mp backend's.
"""
import time
from dataclasses import asdict
from pathlib import Path

from .comm import DEFAULT_TIMEOUT, CommTimeout, ProcessGroup, match_tag


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("the mpi backend needs mpi4py and an MPI library: pip install -e '.[mpi]' "
                          f"(installs mpi4py and mpich), then run under mpiexec ({e})") from None
    return MPI


class MPITransport:
    def __init__(self, comm=None):
        MPI = _mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self._pending = []
        self.stash = {}

    def send(self, peer, tag, payload, meta):
        self._pending.append(self.comm.isend((tag, meta, payload), dest=peer, tag=0))
        self._pending = [r for r in self._pending if not r.Test()]  # forget the delivered ones

    def recv(self, peer, tag, timeout, what):
        return match_tag(self, peer, tag, timeout, what, self._read_one)

    def _read_one(self, peer, timeout, what):
        deadline = time.monotonic() + timeout
        while not self.comm.iprobe(source=peer, tag=0):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.0002)
        return self.comm.recv(source=peer, tag=0)  # (tag, meta, payload)

    def flush(self, timeout):
        deadline = time.monotonic() + timeout
        while not all(r.Test() for r in self._pending):
            if time.monotonic() > deadline:
                raise CommTimeout(f"rank {self.rank}: messages not delivered within {timeout:g} s")
            time.sleep(0.001)
        self._pending = []

    def close(self):
        pass


def world(timeout=DEFAULT_TIMEOUT):
    """The world ProcessGroup of this mpiexec job."""
    return ProcessGroup(MPITransport(), timeout=timeout)


def main(cfg, pcfg, log):
    """`llama3np parallel train --comm mpi`: every rank of the mpiexec job runs this -> exit code.

    Errors are raised (printed, as one line, by the command) on rank 0 only; the other ranks return 2
    quietly, so a mistake is printed once, not once per process."""
    from ..training.config import build_args
    from . import engine, supervisor
    from .launch import _limit_threads

    _limit_threads()
    pg = world(pcfg.timeout)
    error = None
    if pg.size != pcfg.shape().world_size:  # every rank sees this alike: no communication needed
        error = (f"the grid dp={pcfg.dp} x tp={pcfg.tp} x pp={pcfg.pp} needs {pcfg.shape().world_size} processes; "
                 f"mpiexec started {pg.size} (use mpiexec -n {pcfg.shape().world_size})")
    elif pcfg.faults:
        error = "--inject-fault needs the mp backend (--comm mp: its supervisor restarts the group)"
    if error is not None:
        if pg.rank == 0:
            raise ValueError(error)
        return 2
    finished = None
    if pg.rank == 0:  # one rank prepares the run folder; the others wait for it
        try:
            engine.check_config(build_args(cfg), pcfg, cfg.batch_size * cfg.grad_accum)
            if cfg.resume and supervisor.latest_step(cfg.out) >= cfg.steps:
                finished = supervisor.finished_message(cfg, supervisor.latest_step(cfg.out))
            else:
                cfg = engine.prepare_run(cfg, log)
                engine.check_config(restore_args(cfg.out), pcfg, cfg.batch_size * cfg.grad_accum)
        except (ValueError, FileNotFoundError, TypeError) as e:
            error = str(e)
    error, finished, cfg = pg.broadcast_object((error, finished, cfg), root=0)
    if error is not None:
        if pg.rank == 0:
            raise ValueError(error)
        return 2
    if finished is not None:
        if pg.rank == 0:
            log(finished)
        return 0
    t0 = time.time()
    result = engine.train_worker(pg, cfg.out, engine.cfg_json(cfg), asdict(pcfg))
    pg.transport.flush(pcfg.timeout)
    results = [result] + [pg.recv_object(r, "result") for r in range(1, pg.size)] if pg.rank == 0 else None
    if pg.rank != 0:
        pg.send_object(result, 0, "result")
        pg.transport.flush(pcfg.timeout)
        return 0
    wall = time.time() - t0
    stopped = supervisor.finish(cfg, pcfg, {"results": results, "failures": [], "restarts": 0, "wall_s": wall,
                                            "useful_s": wall, "goodput": 1.0}, log)
    if stopped:
        log(f"llama3np parallel: training stopped: {stopped}")
        return 1
    return 0


def restore_args(run_dir):
    """The ModelArgs of the run folder's config.json (the vocabulary fixed by its tokenizer)."""
    import json

    from ..args import ModelArgs

    return ModelArgs.from_dict(json.loads((Path(run_dir) / "config.json").read_text())["model_args"])

