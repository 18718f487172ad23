"""Small worker functions for the notebooks and the benchmark (spawned processes need importable functions:
a function defined in a notebook cell cannot be sent to a `spawn`ed process)."""
import time

import numpy as np


def ring_all_reduce_demo(pg, n_elems):
    """Each rank contributes (rank + 1) * ones; -> what it got and the bytes it sent."""
    x = np.full(n_elems, pg.rank + 1.0)
    pg.reset_stats()
    y = pg.all_reduce(x)
    return {"rank": pg.rank, "result_head": y[:4].tolist(), "bytes_sent": pg.stats["all_reduce"],
            "buffer_bytes": x.nbytes}


def all_reduce_timing(pg, n_elems, repeats):
    """Seconds per ring all-reduce of n_elems float32 on this group (the median of `repeats`)."""
    x = np.ones(n_elems, np.float32)
    pg.barrier()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pg.all_reduce(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))
