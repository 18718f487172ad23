"""Shared setup for the benchmarks: a clean BLAS environment, pinned threads, best-of-N timing.

Use it at the very top of a benchmark script, before numpy is imported:

    import _env                      # benchmarks/ is on sys.path when the script is run as a file
    _env.clean_blas_env()            # re-execs this script without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
    import numpy as np
    ...
    _env.pin_threads(n)              # BLAS, the C kernels and (if imported) torch all use n threads
    seconds = _env.best_of(fn, repeat=5)
    times = _env.best_of_each({"ours": f, "reference": g}, repeat=5)   # interleaved: same load for both

Why: OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE pick other OpenBLAS kernels than the ones OpenBLAS would
choose for this CPU, which changes the reference we compare against; they are read when OpenBLAS
loads, so the variables must be gone before numpy is imported, hence the re-exec. The machine is
shared, so timings are noisy: take the best of several runs, not the mean.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without `pip install -e .`

_limits = None  # the threadpoolctl limiter, kept alive


def clean_blas_env():
    """Re-exec the running script without the OpenBLAS override variables; returns a note to print."""
    if any(name in os.environ for name in BLAS_VARIABLES):
        if "numpy" in sys.modules:
            raise RuntimeError("call _env.clean_blas_env() before importing numpy: OpenBLAS reads them at load")
        env = {k: v for k, v in os.environ.items() if k not in BLAS_VARIABLES}
        env["LLAMA3NP_BENCH_CLEANED"] = "1"
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    if os.environ.get("LLAMA3NP_BENCH_CLEANED"):
        return "environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE were set and are unset for this process"
    return "environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE not set"


def pin_threads(n: int) -> str:
    """Limit OpenBLAS (threadpoolctl), the C kernels and torch (if already imported) to n threads."""
    global _limits
    from threadpoolctl import threadpool_limits

    if _limits is not None:
        _limits.restore_original_limits()
    _limits = threadpool_limits(limits=n)
    from llama3np import kernels

    if kernels.available():
        kernels.set_num_threads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return f"threads: {n} (BLAS, C kernels{', torch' if 'torch' in sys.modules else ''})"


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
