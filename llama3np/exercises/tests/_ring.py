"""N ranks as threads of this process, joined by real multiprocessing pipes (llama3np.parallel.comm)."""
import multiprocessing as mp
import threading

from llama3np.parallel.comm import PipeTransport, ProcessGroup


def run_ranks(n, fn, timeout=10.0):
    """fn(group) on n ranks at once -> the n results; the first exception of any rank is raised."""
    conns = [dict() for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            ca, cb = mp.Pipe(duplex=True)
            conns[a][b], conns[b][a] = ca, cb
    transports = [PipeTransport(r, n, conns[r]) for r in range(n)]
    results, errors = [None] * n, [None] * n

    def work(r):
        try:
            results[r] = fn(ProcessGroup(transports[r], timeout=timeout))
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            errors[r] = e

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 3)
    for t in transports:
        t.close()
    for c in conns:
        for conn in c.values():
            conn.close()
    for e in errors:
        if e is not None:
            raise e
    return results
