"""`llama3np doctor`: what runs where on this machine, and how fast, in about two seconds.

    llama3np doctor                 CPU, instruction set, backend, threads, then a GEMM and an attention
                                    forward+backward timed against NumPy in this process
    llama3np doctor --no-timing     the facts only

What it prints is what the model would use: the C kernels' micro-kernel (kernels.isa(): avx512, avx2,
neon or portable), where the matrix products go (backend.routes(): the C micro-kernel, or NumPy's BLAS
on a CPU without a tuned one) and the thread count. The timings are the best of a few calls with the
machine as it is: on a shared or busy machine they are noisy (the load average is printed with them).
"""
import argparse
import os
import platform
import sys

import numpy as np

GEMM_SHAPE = (512, 512, 512)  # M, N, K: ~0.27 GFLOP, a few ms
ATTENTION_SHAPE = (1, 8, 2, 256, 64)  # B, heads, kv heads, T, head_dim: GQA, causal (NumPy: ~0.1-0.3 s)
# seconds of sleep before each timed call: OpenBLAS's threads spin ~0.1 s after a NumPy product and took a
# core from the C call after it (with 0.02 s, 2 threads: "C is 0.51x NumPy" for a GEMM measured at 0.98-1.0x)
SETTLE = 0.12


def cpu_model() -> str:
    """The CPU's model name, with x86's family and model numbers (Linux /proc/cpuinfo; elsewhere
    platform.processor()), e.g. "Intel(R) Xeon(R) Processor (family 6, model 207)"."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if not line.strip():
                    break  # the first CPU's block is enough
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or platform.processor()
    if "cpu family" in fields and "model" in fields:
        name = f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name or "unknown"


def facts() -> dict:
    """{name: text} describing the CPU, the kernels, the backend and the threads."""
    from . import backend, kernels

    out = {"cpu": f"{cpu_model()} ({platform.machine()}), {kernels.default_threads()} CPUs usable by this process"}
    if kernels.available():
        out["C kernels"] = (f"built ({os.path.basename(kernels.lib_path())}); micro-kernel {kernels.isa()} "
                            f"(this CPU can run: {', '.join(kernels.available_isas())})")
        out["threads"] = f"{kernels.get_num_threads()} (C kernels; LLAMA3NP_NUM_THREADS to change)"
    else:
        out["C kernels"] = f"not available ({kernels.import_error})"
    out["backend"] = backend.get_backend()
    for op, where in backend.routes().items():
        out[op] = where
    env = {k: v for k, v in os.environ.items() if k.startswith("LLAMA3NP_") or k.startswith("OPENBLAS_")}
    out["environment"] = ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "no LLAMA3NP_* / OPENBLAS_* set"
    out["numpy"] = f"{np.__version__}, BLAS: {_blas_name()}"
    return out


def _blas_name() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (pip install threadpoolctl to see it)"
    blas = [f"{p.get('internal_api')} {p.get('version') or ''} ({p.get('num_threads')} threads)".replace("  ", " ")
            for p in threadpool_info() if p.get("user_api") == "blas"]
    return ", ".join(blas) or "none found"


def timings(repeat=3) -> list:
    """[(what, C seconds or None, NumPy seconds, flops)]: one GEMM and one attention forward+backward, the
    best of `repeat` calls each, C and NumPy timed in turn (llama3np.timing.best_of_each)."""
    from . import kernels, ops
    from .timing import best_of_each

    rng = np.random.default_rng(0)
    M, N, K = GEMM_SHAPE
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    B, H, KV, T, hd = ATTENTION_SHAPE
    q = rng.standard_normal((B, H, T, hd)).astype(np.float32)
    k = rng.standard_normal((B, KV, T, hd)).astype(np.float32)
    v = rng.standard_normal((B, KV, T, hd)).astype(np.float32)
    dout = rng.standard_normal((B, H, T, hd)).astype(np.float32)

    def attention(mod):
        def step():
            out, lse = mod.attention_forward(q, k, v, True)
            mod.attention_backward(dout, q, k, v, out, lse, True)
        return step

    rows = []
    cases = [(f"GEMM {M}x{K} @ {K}x{N} float32", lambda: kernels.matmul(a, b), lambda: a @ b, 2.0 * M * N * K),
             (f"attention fwd+bwd B={B} heads={H} kv={KV} T={T} hd={hd} causal", attention(kernels),
              attention(ops), 7.0 * B * H * T * T * hd)]  # 7 products of T x T x hd, half of them masked
    for what, c_fn, np_fn, flops in cases:
        fns = {"numpy": np_fn}
        if kernels.available():
            fns["c"] = c_fn
        best = best_of_each(fns, repeat=repeat, warmup=1, settle=SETTLE)
        rows.append((what, best.get("c"), best["numpy"], flops))
    return rows


def report(timing=True, repeat=3, out=None) -> int:
    out = out or sys.stdout
    print("llama3np doctor", file=out)
    for name, text in facts().items():
        print(f"  {name + ':':13s}{text}", file=out)
    if not timing:
        return 0
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"timing (best of {repeat}, C and NumPy in turn, this process{load}; noisy on a busy machine):", file=out)
    rows = timings(repeat)
    for what, c, n, flops in rows:
        numpy_text = f"NumPy {n * 1e3:7.1f} ms ({flops / n / 1e9:5.1f} GFLOP/s)"
        if c is None:
            print(f"  {what}: {numpy_text}", file=out)
        else:
            print(f"  {what}: C {c * 1e3:7.1f} ms ({flops / c / 1e9:5.1f} GFLOP/s)   {numpy_text}   "
                  f"C is {n / c:.2f}x NumPy", file=out)
    for line in peak_lines(rows):
        print(f"  {line}", file=out)
    return 0


def peak_lines(rows) -> list:
    """The CPU's float32 FMA peak for the micro-kernel in use (kernels.fma_peak), the ceiling no product
    can beat, with the share of it the timed GEMM reached; then the micro-kernel alone on one thread
    (kernels.microkernel_rate, operands in L1) against one thread's peak: the GEMM's distance from the peak
    is the kernel's own (peak minus kernel) plus what surrounds it, packing and caches. ~0.5 s in all."""
    from . import kernels

    if not kernels.available():
        return ["FMA peak: not measured (needs the C kernels)"]
    name, threads = kernels.isa(), kernels.get_num_threads()
    peak = kernels.fma_peak(seconds=0.2, threads=threads)
    if peak is None:
        return [f"FMA peak: not measured for the {name} micro-kernel (it has no FMA code of its own)"]
    _, c, _, flops = rows[0]  # the GEMM's
    share = "" if c is None else f" (the GEMM above: {flops / c / 1e9 / peak:.0%} of it)"
    one = peak if threads == 1 else kernels.fma_peak(seconds=0.1, threads=1)
    return [f"FMA peak ({name}, {threads} thread{'s' if threads > 1 else ''}): {peak:.1f} GFLOP/s, "
            f"the hardware's ceiling{share}", microkernel_line(one, seconds=0.1)]


def microkernel_line(peak_one_thread, seconds=0.3) -> str:
    """The micro-kernel in use timed alone (kernels.microkernel_rate) and its share of one thread's FMA
    peak (doctor and benchmarks/bench_gemm.py print it)."""
    from . import kernels

    alone = kernels.microkernel_rate(seconds=seconds)
    mr, nr = kernels.microkernel_shape()
    return (f"micro-kernel alone ({kernels.isa()}, {mr} x {nr} tile, operands in L1, 1 thread): {alone:.1f} "
            f"GFLOP/s, {alone / peak_one_thread:.0%} of one thread's FMA peak ({peak_one_thread:.1f} GFLOP/s)")


def _run(args) -> int:
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    return report(timing=not args.no_timing, repeat=args.repeat)


def add_subcommands(subparsers):
    """Add `doctor` to the `llama3np` command's subparsers."""
    p = subparsers.add_parser("doctor", help="what runs where on this machine (ISA, backend, threads) and a "
                                             "2-second GEMM and attention timing against NumPy")
    p.add_argument("--no-timing", action="store_true", help="print the facts only, time nothing")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per case, the best is kept (default: 3)")
    p.set_defaults(func=_run)


def main(argv=None) -> int:
    """`llama3np doctor ...` on its own (tests, `python -m llama3np.doctor`): argv like ["doctor"]."""
    parser = argparse.ArgumentParser(prog="llama3np")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"llama3np: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(["doctor"] + sys.argv[1:]))
