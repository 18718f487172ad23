"""The MPI backend: the same ProcessGroup (and the same ring algorithms) over mpi4py.

    pip install -e '.[mpi]'                      # mpi4py and MPICH, both from PyPI
    mpiexec -n 4 python -m llama3np.parallel.cli train --backend mpi --dp 2 --pp 2 --out runs/mpi ...

Only the transport changes: `MPITransport` moves a message with a non-blocking send (so a ring never
deadlocks, as with the pipes' sender threads) and receives by polling `Iprobe` until the timeout, so a
dead or hung peer still turns into a CommTimeout instead of a hang. Because the collectives are
comm.py's own ring, an MPI run computes exactly the numbers of an mp run (bitwise). MPI's own
Allreduce would be faster on a real cluster; ours is here to be read.

There is no supervisor under mpiexec (the MPI launcher owns the processes, and MPI stops the whole job
when one rank fails); fault injection and restarts are the mp backend's.
"""
import json
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
    """`llama3np parallel train --backend mpi`: every rank of the mpiexec job runs this."""
    from ..args import ModelArgs
    from . import engine
    from .launch import _limit_threads

    _limit_threads()
    pg = world(pcfg.timeout)
    if pg.size != pcfg.shape().world_size:
        raise ValueError(f"the grid dp={pcfg.dp} x tp={pcfg.tp} x pp={pcfg.pp} needs {pcfg.shape().world_size} "
                         f"processes; mpiexec started {pg.size} (use mpiexec -n {pcfg.shape().world_size})")
    if pcfg.faults:
        raise ValueError("--inject-fault needs the mp backend (its supervisor restarts the group)")
    error = None
    if pg.rank == 0:  # one rank prepares the run folder; the others wait for it
        try:
            cfg = engine.prepare_run(cfg, log)
            saved = json.loads((Path(cfg.out) / "config.json").read_text())
            engine.check_config(ModelArgs.from_dict(saved["model_args"]), pcfg, cfg.batch_size * cfg.grad_accum)
        except (ValueError, FileNotFoundError, TypeError) as e:
            error = str(e)
    error = pg.broadcast_object(error, root=0)
    if error is not None:
        if pg.rank == 0:
            raise ValueError(error)
        return 2
    cfg = cfg.resolved()
    t0 = time.time()
    result = engine.train_worker(pg, cfg.out, engine.cfg_json(cfg), asdict(pcfg))
    pg.transport.flush(pcfg.timeout)
    results = [result] + [pg.recv_object(r, "result") for r in range(1, pg.size)] if pg.rank == 0 else None
    if pg.rank != 0:
        pg.send_object(result, 0, "result")
        pg.transport.flush(pcfg.timeout)
        return 0
    from .cli import write_report

    wall = time.time() - t0
    write_report(cfg.out, pcfg, {"results": results, "failures": [], "restarts": 0, "wall_s": wall,
                                 "useful_s": wall, "goodput": 1.0})
    engine.final_eval(cfg, log)
    log(f"done on {pg.size} MPI ranks in {wall:.1f} s: {results[0]['records'][-1]} -- checkpoints in {cfg.out}")
    return 0

