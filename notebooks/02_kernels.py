# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — Fast kernels in C: from a triple loop to a tiled SIMD matmul, and fused attention
#
# Nearly all the time of a Llama training step goes into matrix products and attention. NumPy hands its
# matrix products to OpenBLAS, which is very fast; attention in NumPy is several products plus a
# `T x S` score matrix in memory. `csrc/` holds our own C versions of both (called through cffi by
# `llama3np.kernels`), and this notebook shows the steps that make a matmul fast, timing each one, and
# the trick that lets attention run without ever storing the score matrix.
#
# Everything here times real code on this machine, so the numbers change from machine to machine (and
# from run to run on a busy one: we take the best of a few runs).

# %%
import os
import re

import matplotlib.pyplot as plt
import numpy as np

from llama3np import kernels, ops
from llama3np.timing import best_of

FAST = os.environ.get("LLAMA3NP_NOTEBOOK_FAST") == "1"  # the test suite runs this notebook small
assert kernels.available(), f"build the C kernels first: python csrc/build_kernels.py ({kernels.import_error})"
print("micro-kernels this CPU can run:", kernels.available_isas())


def best_time(fn, repeat=3):
    """The fastest of a few runs, in seconds (the machine may be shared): llama3np.timing.best_of."""
    return best_of(fn, repeat=repeat, warmup=0)


# %% [markdown]
# ## 1. The roof: how fast can this machine multiply?
# A matmul of two `n x n` matrices does `2 n^3` floating-point operations (a multiply and an add per
# term). We measure two roofs: the compute roof, taken as OpenBLAS's speed on a large product (the best
# anyone gets on this CPU, one thread), and the memory roof, the bandwidth of a large array copy. Above
# the compute roof sits the hardware's own: the vector units doing nothing but independent fused
# multiply-adds, with no memory traffic at all (`kernels.fma_peak()`, csrc/peak.c). No product beats it;
# a good one gets within ~10% of it. A kernel
# that does few operations per byte it moves (low *arithmetic intensity*) is capped by memory; a matmul
# does `n/6` flops per byte of its three matrices, so it can reach the compute roof, if it reuses data
# from the caches and registers instead of going back to memory.

# %%
kernels.set_num_threads(1)
try:  # one BLAS thread, like our kernel below
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
except ImportError:
    pass

rng = np.random.default_rng(0)
n_roof = 512 if FAST else 1024
A = rng.standard_normal((n_roof, n_roof)).astype(np.float32)
peak = 2 * n_roof**3 / best_time(lambda: A @ A) / 1e9
big = np.ones(2**24 if FAST else 2**25, np.float32)
copy = np.empty_like(big)
bandwidth = 2 * big.nbytes / best_time(lambda: np.copyto(copy, big)) / 1e9  # read + write
fma = kernels.fma_peak(seconds=0.2, threads=1)  # None for the portable kernel (no FMA code of its own)
print(f"compute roof (OpenBLAS, 1 thread, {n_roof}^3): {peak:.0f} GFLOP/s")
if fma:
    print(f"FMA peak ({kernels.isa()}, 1 thread): {fma:.0f} GFLOP/s: OpenBLAS reaches {peak / fma:.0%} of it")
    # our micro-kernel alone, its two small operands kept in L1: what is left between it and the peak is the
    # kernel's own instructions; between it and a whole GEMM, packing and caches (section 2 builds both)
    alone = kernels.microkernel_rate(seconds=0.2)
    print(f"our micro-kernel alone ({kernels.isa()}, a {'x'.join(map(str, kernels.microkernel_shape()))} tile "
          f"of C, operands in L1): {alone:.0f} GFLOP/s, {alone / fma:.0%} of the FMA peak")
print(f"memory roof (array copy): {bandwidth:.1f} GB/s")

# %% [markdown]
# ## 2. Step by step
# **(a) The textbook loop.** `C[i, j] = sum_p A[i, p] * B[p, j]`. In Python each multiply-add is an
# interpreter round trip, so we only try a tiny size.

# %%
def python_matmul(a, b):
    n, k = a.shape
    m = b.shape[1]
    c = np.zeros((n, m), np.float32)
    for i in range(n):
        for j in range(m):
            s = 0.0
            for p in range(k):
                s += a[i, p] * b[p, j]
            c[i, j] = s
    return c


n_py = 24
a_py = rng.standard_normal((n_py, n_py)).astype(np.float32)
assert np.allclose(python_matmul(a_py, a_py), a_py @ a_py, atol=1e-4)
results = {"Python loops": 2 * n_py**3 / best_time(lambda: python_matmul(a_py, a_py), 1) / 1e9}
print(f"Python triple loop (n={n_py}): {results['Python loops']:.4f} GFLOP/s")

# %% [markdown]
# **(b) The same loop in C** (`naive_sgemm` in `csrc/gemm.c`). Compiled, but each `C[i, j]` walks down a
# column of `B`: consecutive loads are `n` floats apart, so every one is a new cache line, and once `B`
# is bigger than the cache the loop waits on memory.
#
# **(c) Loops reordered and tiled** (`blocked_sgemm`). The order `i, p, j` reads `B` and `C` along rows
# (the compiler now vectorizes the inner loop), and tiling keeps a block of `B` in cache while every row
# of `A` uses it. No other change.
#
# **(d) Packing + a register-tiled micro-kernel** (`sgemm`, the GotoBLAS/BLIS scheme). The micro-kernel
# keeps an `MR x NR` tile of `C` in registers for the whole sum: per step `p` it loads one row of `NR`
# values of `B`, broadcasts `MR` values of `A`, and does `MR x NR` multiply-adds, touching `C` only at the
# end. `A` and `B` are first copied ("packed") into the exact order the micro-kernel reads them, in
# blocks sized for the L1 and L2 caches. We run it with the portable C micro-kernel, then with the
# AVX2 and AVX-512 ones (the same algorithm, 8 or 16 floats per instruction), then on 2 threads.

# %%
n = 256 if FAST else 512
a = rng.standard_normal((n, n)).astype(np.float32)
b = rng.standard_normal((n, n)).astype(np.float32)
reference = a.astype(np.float64) @ b.astype(np.float64)
flops = 2 * n**3


def gflops(fn):
    out = fn()
    assert np.abs(out - reference).max() < 1e-3 * np.sqrt(n), "a step computed the wrong product"
    return flops / best_time(fn) / 1e9


results["C naive"] = gflops(lambda: kernels.naive_matmul(a, b))
results["C blocked"] = gflops(lambda: kernels.blocked_matmul(a, b))
for isa in kernels.available_isas():
    kernels.set_isa(isa)
    results[f"packed + {isa}"] = gflops(lambda: kernels.matmul(a, b))
kernels.set_isa(None)  # back to the best one
kernels.set_num_threads(2)
results[f"packed + {kernels.isa()}, 2 threads"] = gflops(lambda: kernels.matmul(a, b))
kernels.set_num_threads(1)
results["OpenBLAS (numpy @)"] = gflops(lambda: a @ b)
peak = max(peak, results["OpenBLAS (numpy @)"])  # the roof is the best OpenBLAS figure we saw
for name, value in results.items():
    print(f"{name:32s} {value:9.3f} GFLOP/s   {value / peak:7.1%} of the roof")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
names = list(results)
ax1.barh(names, [results[k] for k in names], color="tab:blue")
ax1.axvline(peak, color="tab:red", ls="--", label=f"compute roof {peak:.0f} GFLOP/s")
if fma:
    ax1.axvline(fma, color="black", ls=":", label=f"FMA peak {fma:.0f} GFLOP/s")
ax1.set_xscale("log")
ax1.invert_yaxis()
ax1.set_xlabel("GFLOP/s (log scale)")
ax1.set_title(f"matmul {n}x{n}x{n}, float32 (Python loop at n={n_py})")
ax1.legend(loc="lower right")
# the roofline: attainable GFLOP/s = min(compute roof, bandwidth x flops per byte)
intensity = np.logspace(-2, 3, 100)
ax2.loglog(intensity, np.minimum(peak, bandwidth * intensity), color="tab:red", label="roofline")
ax2.axvline(n / 6, color="gray", ls=":", label=f"matmul n={n}: {n / 6:.0f} flop/byte")
for name in names[1:]:
    ax2.plot(n / 6, results[name], "o", label=name)
ax2.plot(1 / 12, bandwidth / 12, "kx", label="vector add (1 flop / 12 bytes)")
ax2.set_xlabel("arithmetic intensity (flop per byte of memory traffic)")
ax2.set_ylabel("GFLOP/s")
ax2.set_title("a small roofline")
ax2.legend(fontsize=7, loc="lower right")
plt.tight_layout()
plt.show()

# %% [markdown]
# Every step is the same arithmetic; only the order of memory accesses and the width of the
# instructions change. The naive loop sits far below the roof because it waits on memory, although the
# matmul's intensity would allow the full roof; the micro-kernel gets there by reusing each loaded
# value `MR` or `NR` times from a register.
#
# Here is the AVX-512 micro-kernel itself, straight from `csrc/gemm.c`:

# %%
source = open(os.path.join(os.path.dirname(kernels.__file__), os.pardir, "csrc", "gemm.c")).read()
print(re.search(r"/\* AVX-512:.*?\n}\n", source, re.S).group(0))

# %%
# Exercise ex18 (naive_sgemm in csrc/gemm.c, rebuilt with `python csrc/build_kernels.py`). In the solved
# package this passes; in the student version it lists what is missing (`--hint 2` in a terminal).
from llama3np.exercises import check

check("ex18")

# %% [markdown]
# ## 3. Attention without the score matrix: the online softmax
# Attention computes, for each query `i`, `out_i = sum_j softmax(s_i)_j v_j` with scores
# `s_ij = q_i . k_j / sqrt(hd)`. The NumPy reference builds the whole `T x S` matrix of scores, then
# its softmax, then multiplies by `v`: for `T = S = 8192` and 32 heads that is 8 GiB of float32.
#
# The fused kernel walks over the keys in tiles and keeps, per query, only three things: the running
# max `m` of the scores seen so far, the running sum `l` of `exp(s - m)`, and the running weighted sum
# `acc` of the values. When a new tile raises the max from `m` to `m'`, all that was accumulated
# was scaled by `exp(-m)` and must now be scaled by `exp(-m')`: multiply `l` and `acc` by `exp(m - m')`.
# At the end `out = acc / l`, and `lse = m + log(l)` is kept for the backward, which recomputes each
# probability as `exp(s - lse)` instead of storing it.

# %%
def online_softmax_attention(q_row, k, v, tile):
    """One query against keys in tiles: the fused kernel's loop in NumPy (float64)."""
    m, l, acc = -np.inf, 0.0, np.zeros(v.shape[1])
    history = []
    for j0 in range(0, k.shape[0], tile):
        s = k[j0:j0 + tile] @ q_row / np.sqrt(q_row.size)  # this tile's scores
        m_new = max(m, s.max())
        correction = np.exp(m - m_new)  # rescale the old sums to the new max
        p = np.exp(s - m_new)
        l = l * correction + p.sum()
        acc = acc * correction + p @ v[j0:j0 + tile]
        m = m_new
        history.append((j0 + tile, m, l))
    return acc / l, m + np.log(l), history


S_demo, hd_demo = 256, 16
q1 = rng.standard_normal(hd_demo)
k1 = rng.standard_normal((S_demo, hd_demo)) * np.linspace(0.3, 2.0, S_demo)[:, None]  # later keys score higher
v1 = rng.standard_normal((S_demo, hd_demo))
out_tiled, lse_tiled, history = online_softmax_attention(q1, k1, v1, tile=32)
out_ref, lse_ref = ops.attention_forward(q1[None, None, None], k1[None, None], v1[None, None], causal=False)
print("max |tiled - full softmax| =", np.abs(out_tiled - out_ref[0, 0, 0]).max())
print("lse tiled vs reference:", lse_tiled, lse_ref[0, 0, 0])

# %%
T_pic = S_pic = 8
tile_pic = 2
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
grid = np.zeros((T_pic, S_pic))
for i in range(T_pic):
    for j in range(S_pic):
        grid[i, j] = 1.0 if j <= i else 0.0  # causal: query i sees keys j <= i
ax1.imshow(grid, cmap="Blues", vmin=-0.3, vmax=1.3)
for t in range(0, T_pic + 1, tile_pic):
    ax1.axhline(t - 0.5, color="k", lw=1.5)
    ax1.axvline(t - 0.5, color="k", lw=1.5)
for t0 in range(0, T_pic, tile_pic):
    for s0 in range(0, S_pic, tile_pic):
        if s0 > t0 + tile_pic - 1:
            ax1.text(s0 + 0.5, t0 + 0.5, "skipped", ha="center", va="center", fontsize=8, color="gray")
ax1.annotate("", xy=(5.4, 5.0), xytext=(-0.3, 5.0), arrowprops=dict(arrowstyle="->", color="tab:red", lw=2.5))
ax1.text(-0.3, 4.2, "queries 4-5 walk over key tiles 0-2,\nupdating m, l, acc after each", color="tab:red",
         fontsize=8, bbox=dict(facecolor="white", alpha=0.9, edgecolor="none"))
ax1.set_xlabel("key position j")
ax1.set_ylabel("query position i")
ax1.set_title("scores in tiles: only one tile exists at a time")
seen, ms, ls = zip(*history)
ax2.step(seen, ms, where="post", label="running max m")
ax2.axhline(lse_ref[0, 0, 0], color="k", ls=":", label="final lse = m + log l")
ax2.step(seen, np.array(ms) + np.log(ls), where="post", label="m + log l so far")
ax2.set_xlabel("keys seen")
ax2.set_title("the online softmax statistics of one query")
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The fused kernel against the NumPy reference
# Same inputs, forward and backward, causal, grouped-query (8 query heads sharing 2 kv heads). The
# kernel's extra memory is a few tiles per thread plus packed copies of `k` and `v`; the reference holds
# several `T x S` arrays per head.

# %%
T = 256 if FAST else 1024
B, H, KV, hd = 1, 8, 2, 64
q = rng.standard_normal((B, H, T, hd)).astype(np.float32)
k = rng.standard_normal((B, KV, T, hd)).astype(np.float32)
v = rng.standard_normal((B, KV, T, hd)).astype(np.float32)
dout = rng.standard_normal((B, H, T, hd)).astype(np.float32)


def fused():
    out, lse = kernels.attention_forward(q, k, v)
    return kernels.attention_backward(dout, q, k, v, out, lse)


def reference_attention():
    out, lse = ops.attention_forward(q, k, v)
    return ops.attention_backward(dout, q, k, v, out, lse)


for got, want in zip(fused(), reference_attention()):
    assert np.allclose(got, want, rtol=1e-3, atol=1e-4)
t_fused, t_ref = best_time(fused), best_time(reference_attention)
print(f"T={T}: fused C {t_fused * 1e3:.1f} ms, NumPy reference {t_ref * 1e3:.1f} ms -> {t_ref / t_fused:.1f}x")
print(f"score matrix the reference materializes: {B * H * T * T * 4 / 2**20:.1f} MiB per array; "
      f"one 64x64 tile of the fused kernel: {64 * 64 * 4 / 2**10:.0f} KiB")

# %% [markdown]
# ## Where to read on
# - `csrc/gemm.c`: the micro-kernels (portable, AVX2, AVX-512), packing, blocking and threads;
#   `kernels.isa()` tells which one runs, `LLAMA3NP_ISA=portable` forces the portable one.
# - `csrc/attention.c`: the fused forward and backward; `tests/test_kernels.py` checks both against
#   `llama3np.ops` and `tests/sanitize.sh` runs those tests under AddressSanitizer.
# - `benchmarks/bench_gemm.py`, `bench_attention.py`, `bench_train_step.py`: the full-size comparisons.
