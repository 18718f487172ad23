"""GEMM: the C kernel (llama3np.kernels.matmul) beside NumPy/OpenBLAS, in one run, 1 and 2 threads.

Shapes: 1024^3, and the three products of a linear layer in the `small` training step
(B*T = 2048 rows, dim 512, FFN 1536): y = x @ w.T, dx = dy @ w, dw = dy.T @ x, with the transposes
passed as views exactly as ops.linear_* does. Target (issue 15): >= 0.95x OpenBLAS GFLOP/s on every shape, on
AVX2 too (LLAMA3NP_BENCH_ISA=avx2 runs our AVX2 kernel against OpenBLAS's Haswell kernels); on a shared VM take the
median of several --rounds. Beside the ratio, each rate's share of the CPU's FMA peak (kernels.fma_peak, at
the same threads); the micro-kernel alone (kernels.microkernel_rate, operands in L1) is printed first, so a
GEMM's distance from the peak reads as the kernel's own part plus what packing and caches cost around it.

Then the decode products of `small` (x @ w.T for one token, and the 16-token prefill), in GB/s of
weights read: "hot" repeats one matrix (it stays in L2/L3), "cold" cycles through 48 MB of copies
(more than the L3, as the 109 MB of a decode step's weights are), which is what a decode step sees.

    python benchmarks/bench_gemm.py [--repeat 7] [--threads 1 2] [--decode-only | --no-decode] [--rounds 5]
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from llama3np import kernels  # noqa: E402
from llama3np.doctor import microkernel_line  # noqa: E402


def shapes(rng):
    def r(*s):
        return rng.standard_normal(s).astype(np.float32)

    x, w, dy = r(2048, 512), r(1536, 512), r(2048, 1536)
    a = r(1024, 1024)
    return [
        ("1024 x 1024 x 1024", a, r(1024, 1024)),
        ("y = x @ w.T   (2048x512)(512x1536)", x, w.T),
        ("dx = dy @ w   (2048x1536)(1536x512)", dy, w),
        ("dw = dy.T @ x (1536x2048)(2048x512)", dy.T, x),
    ]


def decode_shapes(rng):
    """(name, x, weight) for the decode step of `small`: y = x @ w.T with w (out, in)."""
    def r(*s):
        return rng.standard_normal(s).astype(np.float32)

    return [("1 x 512 @ wq.T (512x512)", r(1, 512), r(512, 512)),
            ("1 x 512 @ wk.T (128x512)", r(1, 512), r(128, 512)),
            ("1 x 512 @ w1.T (1536x512)", r(1, 512), r(1536, 512)),
            ("1 x 1536 @ w2.T (512x1536)", r(1, 1536), r(512, 1536)),
            ("1 x 512 @ output.T (8192x512)", r(1, 512), r(8192, 512)),
            ("16 x 512 @ w1.T (prefill)", r(16, 512), r(1536, 512))]


def decode_table(repeat):
    print(f"  {'decode product':32s} {'hot: ours GB/s':>15s} {'OpenBLAS':>9s} {'ratio':>6s}"
          f" {'cold: ours GB/s':>16s} {'OpenBLAS':>9s} {'ratio':>6s}")
    rng = np.random.default_rng(1)
    for name, x, w in decode_shapes(rng):
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        copies = [w] + [w.copy() for _ in range(max(1, 48 * 2**20 // w.nbytes) - 1)]

        def cold(mm):
            def run():
                for c in copies:
                    mm(x, c.T, out=out)
            return run

        hot = _env.best_of_each({"ours": lambda: kernels.matmul(x, w.T, out=out),
                                 "blas": lambda: np.matmul(x, w.T, out=out)}, 5 * repeat)
        cld = _env.best_of_each({"ours": cold(kernels.matmul), "blas": cold(np.matmul)}, repeat)
        gb, gbc = w.nbytes / 1e9, w.nbytes * len(copies) / 1e9
        print(f"  {name:32s} {gb / hot['ours']:15.1f} {gb / hot['blas']:9.1f} {hot['blas'] / hot['ours']:6.2f}"
              f" {gbc / cld['ours']:16.1f} {gbc / cld['blas']:9.1f} {cld['blas'] / cld['ours']:6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--decode-only", action="store_true", help="only the decode products")
    which.add_argument("--no-decode", action="store_true",
                       help="only the four shapes (the decode table is the slow part)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the four shapes this many times and print each ratio's median: a shared VM's "
                             "speed drifts between rounds by more than the 5%% a goal turns on")
    cli = parser.parse_args()
    if cli.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {cli.rounds}")
    if not kernels.available():
        raise SystemExit(f"C kernels not built: {kernels.import_error}")
    print(ENV_NOTE)
    print(_env.machine_note())
    print(f"micro-kernel: {kernels.isa()}; timings: best of {cli.repeat}, ours and OpenBLAS interleaved")
    one = kernels.fma_peak(threads=1)  # None for the portable kernel (no FMA code of its own)
    if one:
        print(microkernel_line(one))
    cases = [] if cli.decode_only else shapes(np.random.default_rng(0))
    for n in cli.threads:
        print(_env.pin_threads(n))
        peak = None if not cases else one if n == 1 else kernels.fma_peak(threads=n)
        if peak:
            print(f"  FMA peak ({n} thread{'s' if n > 1 else ''}): {peak:.1f} GFLOP/s; '% peak' is each rate's share")
        ratios = {name: [] for name, _, _ in cases}
        for r in range(cli.rounds if cases else 0):
            print(f"  {'shape' + (f' (round {r + 1} of {cli.rounds})' if cli.rounds > 1 else ''):38s} "
                  f"{'ours GF/s':>10s} {'OpenBLAS':>10s} {'ratio':>7s}" + ("   % peak: ours  OpenBLAS" if peak else ""))
            for name, a, b in cases:
                flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
                out = np.empty((a.shape[0], b.shape[1]), np.float32)
                t = _env.best_of_each({"ours": lambda: kernels.matmul(a, b, out=out),
                                       "blas": lambda: np.matmul(a, b, out=out)}, cli.repeat)
                ours, blas = t["ours"], t["blas"]
                ratios[name].append(blas / ours)
                shares = f"   {flops / ours / 1e9 / peak:10.0%} {flops / blas / 1e9 / peak:9.0%}" if peak else ""
                print(f"  {name:38s} {flops / ours / 1e9:10.1f} {flops / blas / 1e9:10.1f} {blas / ours:7.2f}{shares}")
        if cases and cli.rounds > 1:
            print(f"  median ratio of {cli.rounds} rounds (min - max):")
            for name, rs in ratios.items():
                print(f"  {name:38s} {np.median(rs):7.2f}  ({min(rs):.2f} - {max(rs):.2f})")
        if not cli.no_decode:
            decode_table(cli.repeat)


if __name__ == "__main__":
    main()
