"""GEMM: the C kernel (llama3np.kernels.matmul) beside NumPy/OpenBLAS, in one run, 1 and 2 threads.

Shapes: 1024^3, and the three products of a linear layer in the `small` training step
(B*T = 2048 rows, dim 512, FFN 1536): y = x @ w.T, dx = dy @ w, dw = dy.T @ x, with the transposes
passed as views exactly as ops.linear_* does. Target: >= 0.8x OpenBLAS GFLOP/s.

    python benchmarks/bench_gemm.py [--repeat 7] [--threads 1 2]
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from llama3np import kernels  # noqa: E402


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    cli = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"C kernels not built: {kernels.import_error}")
    print(ENV_NOTE)
    print(f"micro-kernel: {kernels.isa()}; timings: best of {cli.repeat}, ours and OpenBLAS interleaved")
    cases = shapes(np.random.default_rng(0))
    for n in cli.threads:
        print(_env.pin_threads(n))
        print(f"  {'shape':38s} {'ours GF/s':>10s} {'OpenBLAS':>10s} {'ratio':>7s}")
        for name, a, b in cases:
            flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            out = np.empty((a.shape[0], b.shape[1]), np.float32)
            t = _env.best_of_each({"ours": lambda: kernels.matmul(a, b, out=out),
                                   "blas": lambda: np.matmul(a, b, out=out)}, cli.repeat)
            ours, blas = t["ours"], t["blas"]
            print(f"  {name:38s} {flops / ours / 1e9:10.1f} {flops / blas / 1e9:10.1f} {blas / ours:7.2f}")


if __name__ == "__main__":
    main()
