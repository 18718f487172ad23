"""Attention forward + backward: the fused C kernel beside the NumPy reference (llama3np.ops) and
PyTorch's scaled_dot_product_attention (autograd), in one run, with the same thread count.

Default case: B=1, 8 heads (8 kv heads), T=1024, head_dim 64, causal. Targets: >= 3x faster than the
NumPy reference and at least as fast as PyTorch.

Memory: the peak extra memory of one forward+backward, measured in a fresh child process per
implementation as the rise of the peak resident set size over the resident size just before the call
(Linux: the peak, VmHWM, is reset through /proc/self/clear_refs, then read from /proc/self/status),
outputs included. For NumPy, tracemalloc's peak is printed too (it sees NumPy's
allocations, not C's or torch's).

With --docs N (N > 1), then the same row as N packed documents of T/N tokens (a document mask,
kv_start): the C kernel skips the key tiles before each document, so it should take about 1/N of the
plain causal time (no other document's keys), while NumPy still computes and masks the full T x T.

    python benchmarks/bench_attention.py [--threads 1 2] [--kv-heads 8] [--T 1024] [--repeat 5] [--docs 4]
    LLAMA3NP_BENCH_ISA=avx2 python benchmarks/bench_attention.py    # as on an AVX2 CPU (see _env.py)
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from llama3np import kernels, ops  # noqa: E402


def inputs(B, H, KV, T, hd, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, T, hd)).astype(np.float32)
    k = rng.standard_normal((B, KV, T, hd)).astype(np.float32)
    v = rng.standard_normal((B, KV, T, hd)).astype(np.float32)
    dout = rng.standard_normal((B, H, T, hd)).astype(np.float32)
    return q, k, v, dout


def step_fn(impl, q, k, v, dout, kv_start=None):
    """A function running one forward + backward with the given implementation (kv_start: C, NumPy)."""
    if impl == "c":
        def step():
            out, lse = kernels.attention_forward(q, k, v, True, kv_start)
            return kernels.attention_backward(dout, q, k, v, out, lse, True, kv_start)
    elif impl == "numpy":
        def step():
            out, lse = ops.attention_forward(q, k, v, True, kv_start)
            return ops.attention_backward(dout, q, k, v, out, lse, True, kv_start)
    else:
        import torch

        G = q.shape[1] // k.shape[1]
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        tdout = torch.from_numpy(dout)

        def step():
            for t in (tq, tk, tv):
                t.grad = None
            # enable_gqa: the kv heads are shared by groups of G query heads, as in our kernels
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=G > 1)
            out.backward(tdout)
            return tq.grad, tk.grad, tv.grad
    return step


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(impl, threads, B, H, KV, T, hd):
    """Runs in a fresh process: the peak-RSS rise of one forward + backward (and tracemalloc for numpy)."""
    if impl == "torch":
        import torch  # noqa: F401  (imported before pinning so that torch is pinned too)
    _env.pin_threads(threads)
    q, k, v, dout = inputs(B, H, KV, T, hd)
    step = step_fn(impl, q, k, v, dout)
    traced = None
    if impl == "numpy":
        import tracemalloc

        tracemalloc.start()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    step()
    after = _status_kib("VmHWM")
    if impl == "numpy":
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(json.dumps({"rss_mib": (after - before) / 1024, "tracemalloc_mib": traced and traced / 2**20}))


def measure_memory(impl, threads, cli):
    cmd = [sys.executable, __file__, "--child", impl, "--threads", str(threads), "--kv-heads", str(cli.kv_heads),
           "--T", str(cli.T), "--heads", str(cli.heads), "--head-dim", str(cli.head_dim)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--docs", type=int, default=1, help="also time the row as this many packed documents")
    parser.add_argument("--child", choices=["c", "numpy", "torch"], help=argparse.SUPPRESS)
    cli = parser.parse_args()
    B, H, KV, T, hd = 1, cli.heads, cli.kv_heads, cli.T, cli.head_dim
    if cli.child:
        return child(cli.child, cli.threads[0], B, H, KV, T, hd)
    if not kernels.available():
        raise SystemExit(f"C kernels not built: {kernels.import_error}")
    try:
        import torch  # noqa: F401

        impls = ["c", "numpy", "torch"]
    except ImportError:
        impls = ["c", "numpy"]
        print("torch not installed: comparing with NumPy only")
    print(ENV_NOTE)
    print(_env.machine_note())
    print(f"attention forward+backward, B={B}, heads={H}, kv_heads={KV}, T={T}, head_dim={hd}, causal; "
          f"best of {cli.repeat}, interleaved; micro-kernel {kernels.isa()}")
    q, k, v, dout = inputs(B, H, KV, T, hd)
    # the three agree (a benchmark of wrong answers is worthless)
    dq_c = step_fn("c", q, k, v, dout)()[0]
    dq_np = step_fn("numpy", q, k, v, dout)()[0]
    print(f"max |dq_c - dq_numpy| = {np.abs(dq_c - dq_np).max():.2e}")
    for n in cli.threads:
        print(_env.pin_threads(n))
        times = _env.best_of_each({impl: step_fn(impl, q, k, v, dout) for impl in impls}, cli.repeat)
        for impl in impls:
            mem = measure_memory(impl, n, cli)
            mem_text = "n/a" if mem is None else f"peak RSS +{mem['rss_mib']:.1f} MiB"
            if mem and mem["tracemalloc_mib"] is not None:
                mem_text += f" (tracemalloc peak {mem['tracemalloc_mib']:.1f} MiB)"
            print(f"  {impl:6s} {times[impl] * 1e3:8.1f} ms   {mem_text}")
        print(f"  C speed-up: {times['numpy'] / times['c']:.2f}x vs NumPy"
              + (f", {times['torch'] / times['c']:.2f}x vs torch" if "torch" in times else ""))
        if cli.docs > 1:
            doc_ids = np.minimum(np.arange(T) * cli.docs // T, cli.docs - 1)[None].repeat(B, axis=0)
            kv_start = ops.kv_start_from_doc_ids(doc_ids)
            packed = _env.best_of_each({"c causal": step_fn("c", q, k, v, dout),
                                        "c packed": step_fn("c", q, k, v, dout, kv_start),
                                        "numpy packed": step_fn("numpy", q, k, v, dout, kv_start)}, cli.repeat)
            print(f"  {cli.docs} packed documents of ~{T // cli.docs} tokens (kv_start): C {packed['c packed'] * 1e3:.1f} ms"
                  f" = {packed['c causal'] / packed['c packed']:.2f}x faster than one causal row of {T} "
                  f"({packed['c causal'] * 1e3:.1f} ms); NumPy {packed['numpy packed'] * 1e3:.1f} ms"
                  f" ({packed['numpy packed'] / packed['c packed']:.1f}x the C time)")


if __name__ == "__main__":
    main()
