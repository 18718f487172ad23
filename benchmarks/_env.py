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

LLAMA3NP_BENCH_ISA=avx2 runs a benchmark as on a CPU with AVX2 but no AVX-512, on a machine that has
AVX-512, for BOTH sides: our kernels (LLAMA3NP_ISA=avx2), OpenBLAS (OPENBLAS_CORETYPE=Haswell, its
AVX2 kernels) and PyTorch (ATEN_CPU_CAPABILITY=avx2, with MKL and oneDNN limited to AVX2 too).
Comparing our AVX2 path with AVX-512 references would understate it. Every benchmark prints
`machine_note()`: the CPU model and the micro-kernel beside its ratios.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# what LLAMA3NP_BENCH_ISA=avx2 sets for every library of the run
EMULATE = {"avx2": {"LLAMA3NP_ISA": "avx2", "OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without `pip install -e .`

_limits = None  # the threadpoolctl limiter, kept alive


def clean_blas_env():
    """Re-exec the running script without the OpenBLAS override variables (or, with LLAMA3NP_BENCH_ISA,
    with exactly the variables of EMULATE for that ISA); returns a note to print."""
    emulate = os.environ.get("LLAMA3NP_BENCH_ISA")
    if emulate and emulate not in EMULATE:
        raise SystemExit(f"LLAMA3NP_BENCH_ISA={emulate!r}: expected one of {sorted(EMULATE)}")
    want = EMULATE.get(emulate, {})
    env = {k: v for k, v in os.environ.items() if k not in BLAS_VARIABLES or k in want}
    env.update(want)
    if env != dict(os.environ):
        if "numpy" in sys.modules:
            raise RuntimeError("call _env.clean_blas_env() before importing numpy: OpenBLAS reads them at load")
        env["LLAMA3NP_BENCH_CLEANED"] = "1"
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    if emulate:
        return (f"environment: emulating an {emulate.upper()} CPU for every library: "
                + ", ".join(f"{k}={v}" for k, v in want.items()))
    if os.environ.get("LLAMA3NP_BENCH_CLEANED"):
        return "environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE were set and are unset for this process"
    return "environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE not set"


def machine_note() -> str:
    """The CPU model, the micro-kernel our kernels run and the load: printed beside every ratio."""
    from llama3np import kernels
    from llama3np.doctor import cpu_model

    isa = kernels.isa() if kernels.available() else "none (C kernels not built)"
    forced = " (forced by LLAMA3NP_ISA)" if os.environ.get("LLAMA3NP_ISA") else ""
    load = f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    return f"CPU: {cpu_model()}; our micro-kernel: {isa}{forced}{load}"


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
