"""Timing on a shared machine: the best of several runs, and several functions timed in turn.

    seconds = best_of(fn, repeat=5)                                  # the fastest of 5 calls
    times = best_of_each({"ours": f, "reference": g}, repeat=5)      # interleaved: same load for both

The benchmarks (benchmarks/_env.py) and notebook 02 use these; the minimum, not the mean, because on a
shared machine every disturbance makes a call slower, never faster.
"""
import time


def best_of(fn, repeat=5, warmup=1):
    """The fastest of `repeat` timed calls of fn(), in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_of_each(fns: dict, repeat=5, warmup=1, settle=0.3):
    """{name: fastest seconds} for several functions timed in turn (a, b, a, b, ...), so that a change in
    the machine's load hits all of them alike, rather than whichever happened to run during it.

    Before each timed call, `settle` seconds of sleep: OpenBLAS's and PyTorch's worker threads keep
    spinning on the cores for a while after their call returns (OpenBLAS ~0.1 s), and would otherwise
    take a core from whatever runs next - with 2 threads our kernel measured at half speed right after
    an OpenBLAS call. Our C kernels' workers spin for well under a millisecond before they sleep.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(settle)
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best
