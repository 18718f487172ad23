"""Start N worker processes connected by pipes, watch them, and collect their results.

    results = launch.run(fn, world_size=4, args=(...,))       # fn(pg, *args) on every rank, in parallel

Every worker is a fresh interpreter (the `spawn` start method: no state copied by fork, as on a cluster)
with one BLAS thread and LLAMA3NP_NUM_THREADS=1, so N workers on N cores do not fight over cores.
The parent holds one control pipe per worker: workers send heartbeats (`heartbeat(step)`), reports
(`report_nan`, `report_fault`) and finally their result or their traceback. The parent's watch loop
turns a worker that exits without a result, stops sending heartbeats, or reports a NaN into a
`GroupFailure` naming the rank and what happened, after killing the whole group: no orphans, no hang.
"""
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import time
import traceback
from contextlib import contextmanager

from .comm import DEFAULT_TIMEOUT, PipeTransport, ProcessGroup

# the environment a worker must start with (before it imports NumPy): one thread per process
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "LLAMA3NP_NUM_THREADS": "1"}


class GroupFailure(RuntimeError):
    """A worker died, hung, raised or reported a NaN; the group was stopped.

    kind: "dead" | "hung" | "nan" | "error" | "timeout"; rank: the worker; step: its last heartbeat step;
    detect_s: seconds from the failure (the fault's own report, else the last heartbeat) to detection.
    """

    def __init__(self, kind, rank, step, message, detect_s=None):
        super().__init__(f"rank {rank} {kind} (last step {step}): {message}")
        self.kind, self.rank, self.step, self.message, self.detect_s = kind, rank, step, message, detect_s


# ----------------------------------------------------------------------------------------------------
# worker side

_control = None  # this worker's pipe to the parent (None outside a launched group, e.g. under mpiexec)


def heartbeat(step):
    """Tell the parent this rank is alive and has reached `step` (a no-op outside a launched group)."""
    if _control is not None:
        _control.send(("heartbeat", step, time.time()))


def report_nan(step):
    if _control is not None:
        _control.send(("nan", step, time.time()))


def report_fault(kind, step):
    """An injected fault announces itself just before it happens, so detection time can be measured."""
    if _control is not None:
        _control.send(("fault", (kind, step), time.time()))


def _limit_threads():
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # the environment variables set before the spawn already did it
        pass


def _worker_main(fn, rank, world_size, conns, control, args, timeout):
    global _control
    _control = control
    _limit_threads()
    transport = PipeTransport(rank, world_size, conns)
    try:
        result = fn(ProcessGroup(transport, timeout=timeout), *args)
        transport.flush(timeout)
        control.send(("result", result, time.time()))
    except BaseException as e:  # report everything, including KeyboardInterrupt, then exit non-zero
        control.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.time()))
        transport.close()
        raise SystemExit(1)
    transport.close()


# ----------------------------------------------------------------------------------------------------
# parent side


@contextmanager
def _worker_environment():
    """Set WORKER_ENV in os.environ while the children are spawned (they inherit it), then restore.

    Also hide the main script from the children: `spawn` re-runs a script's top level in every child
    (to find functions defined there), so a notebook's .py twin run as `python3 04_....py` would start
    its processes again from inside each child ("start a new process before bootstrapping"). Our
    workers are module-level functions the children import by name, so they never need the script.
    """
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    main = sys.modules.get("__main__")
    main_file = main.__dict__.pop("__file__", None) if main is not None and main.__spec__ is None else None
    try:
        yield
    finally:
        if main_file is not None:
            main.__file__ = main_file
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(fn, world_size, args=(), timeout=DEFAULT_TIMEOUT, total_timeout=None, heartbeat_timeout=None,
        on_message=None):
    """Run fn(pg, *args) on `world_size` spawned processes; -> the list of their return values by rank.

    fn must be importable (a module-level function). `timeout` bounds every communication inside the
    workers; `total_timeout` bounds the whole run; with `heartbeat_timeout`, a worker silent for longer
    after its first heartbeat is declared hung. on_message(rank, kind, value, t) sees every control
    message (the supervisor uses it for its statistics). Raises GroupFailure.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    ctx = mp.get_context("spawn")
    links = {}  # (i, j) -> (conn of i, conn of j)
    for i in range(world_size):
        for j in range(i + 1, world_size):
            links[i, j] = ctx.Pipe(duplex=True)
    procs, controls = [], []
    try:
        with _worker_environment():
            for r in range(world_size):
                conns = {j: (links[min(r, j), max(r, j)][0 if r < j else 1]) for j in range(world_size) if j != r}
                parent_end, child_end = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker_main, args=(fn, r, world_size, conns, child_end, args, timeout),
                                name=f"llama3np-rank{r}", daemon=True)
                p.start()
                child_end.close()
                procs.append(p)
                controls.append(parent_end)
        # the children hold their own copies now; closing ours makes a dead child's pipes report EOF
        for a, b in links.values():
            a.close()
            b.close()
        return _watch(procs, controls, total_timeout, heartbeat_timeout, on_message)
    finally:
        _stop(procs)


def _watch(procs, controls, total_timeout, heartbeat_timeout, on_message, grace=0.3):
    """The parent's loop. On the first sign of trouble it keeps listening for `grace` seconds, because
    one failure causes others (a killed rank makes its peers' receives fail): the root cause is then
    the rank that announced an injected fault, else one that died, reported a NaN, went silent, raised."""
    n = len(procs)
    results, done = [None] * n, [False] * n
    last_beat, last_step, fault_t = [None] * n, [None] * n, [None] * n
    incidents, deadline = [], None
    start = time.time()
    sentinels = {p.sentinel: r for r, p in enumerate(procs)}
    ctrl = {c: r for r, c in enumerate(controls)}

    def handle(r, kind, value, t, now):
        if on_message is not None:
            on_message(r, kind, value, t)
        if kind == "heartbeat":
            last_beat[r], last_step[r] = now, value
        elif kind == "fault":
            fault_t[r] = t
            incidents.append(("fault", r, value[1], f"injected fault {value[0]}", None))
        elif kind == "result":
            results[r], done[r] = value, True
        elif kind == "nan":
            incidents.append(("nan", r, value, "reported a non-finite loss or gradient norm", now - (fault_t[r] or t)))
        elif kind == "error":
            incidents.append(("error", r, last_step[r], value, _since(now, fault_t, last_beat, r)))

    while not all(done):
        ready = mp.connection.wait(list(ctrl) + list(sentinels), timeout=0.05)
        now = time.time()
        for obj in sorted(ready, key=lambda o: o in sentinels):  # messages before exits
            if obj in ctrl:
                try:
                    kind, value, t = obj.recv()
                except (EOFError, OSError):
                    del ctrl[obj]  # the worker exited; its sentinel tells how
                    continue
                handle(ctrl[obj], kind, value, t, now)
            elif obj in sentinels:
                r = sentinels.pop(obj)
                c = controls[r]
                while c in ctrl and c.poll():  # drain what it sent just before exiting
                    try:
                        handle(r, *c.recv(), now)
                    except (EOFError, OSError):
                        break
                if not done[r] and not any(i[0] == "error" and i[1] == r for i in incidents):
                    procs[r].join(1.0)  # the sentinel fires at exit; join to read the exit code
                    incidents.append(("dead", r, last_step[r], f"exited with code {procs[r].exitcode} without a "
                                      "result", _since(now, fault_t, last_beat, r)))
        if heartbeat_timeout is not None:
            for r in range(n):
                if not done[r] and last_beat[r] is not None and now - last_beat[r] > heartbeat_timeout:
                    if not any(i[0] == "hung" and i[1] == r for i in incidents):
                        incidents.append(("hung", r, last_step[r], f"no heartbeat for {now - last_beat[r]:.1f} s "
                                          f"(limit {heartbeat_timeout:g} s)", _since(now, fault_t, last_beat, r)))
        if total_timeout is not None and now - start > total_timeout:
            r = done.index(False)
            incidents.append(("timeout", r, last_step[r], f"the group did not finish within {total_timeout:g} s", None))
            deadline = now
        failures = [i for i in incidents if i[0] != "fault"]
        if failures and deadline is None:
            deadline = now + grace
        if deadline is not None and now >= deadline:
            faulty = {i[1] for i in incidents if i[0] == "fault"}
            rank_order = {"nan": 0, "dead": 1, "hung": 2, "timeout": 3, "error": 4}
            # an error that is only the echo of another rank's failure (its peer vanished) ranks last
            echo = lambda i: i[0] == "error" and str(i[3]).startswith(("PeerDied", "CommTimeout"))  # noqa: E731
            kind, r, step, msg, detect = min(failures, key=lambda i: (i[1] not in faulty, echo(i), rank_order[i[0]],
                                                                     i[1]))
            if r in faulty and kind in ("hung", "error", "nan"):
                detect = now - fault_t[r] if kind != "error" else detect
            raise GroupFailure(kind, r, step, msg, detect)
    return results


def _since(now, fault_t, last_beat, r):
    ref = fault_t[r] or last_beat[r]
    return None if ref is None else now - ref


def _stop(procs):
    """Terminate (SIGTERM), then kill (SIGKILL) whatever is still running; reap everything."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
