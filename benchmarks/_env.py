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


# The timers are llama3np.timing's (one timer for the benchmarks and the notebooks), imported when first
# called: importing llama3np loads numpy, which must wait until clean_blas_env has run.
def best_of(fn, repeat=5, warmup=1):
    from llama3np.timing import best_of

    return best_of(fn, repeat, warmup)


def best_of_each(fns: dict, repeat=5, warmup=1, settle=0.3):
    from llama3np.timing import best_of_each

    return best_of_each(fns, repeat, warmup, settle)
