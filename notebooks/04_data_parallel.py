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
# # 04 — Data parallelism: the same step on N processes
#
# Each of N replicas holds the whole model, takes 1/N of the global batch, computes its gradients, and
# then all replicas average their gradients so that every one applies the same AdamW update. The
# average is a **ring all-reduce**: reduce-scatter, then all-gather. We first run the ring by hand in
# one process to see the chunks move, then in real processes (`llama3np.parallel`), then train a tiny
# Llama on 2 processes and check it ends with the weights of 1 process.

# %%
import os
import shutil
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from llama3np.parallel import engine, launch
from llama3np.parallel.comm import ring_bytes
from llama3np.parallel.examples import ring_all_reduce_demo, run_on, small_run
from llama3np.parallel.trace import Trace
from llama3np.exercises import check


FAST = os.environ.get("LLAMA3NP_NOTEBOOK_FAST") == "1"  # the test suite runs this notebook small

# %% [markdown]
# ## 1. The ring, by hand
# N ranks each hold a buffer cut into N chunks. In step s of the reduce-scatter, rank r sends chunk
# r-s-1 to rank r+1 and adds what it receives from rank r-1 to chunk r-s-2. After N-1 steps, rank r holds
# chunk r summed over everybody. The all-gather then passes the finished chunks around the ring
# (N-1 more steps). Each rank sent 2(N-1) chunks of size/N: **2(N-1)/N of the buffer**, almost twice the
# buffer whatever N is. That is why the ring is bandwidth-optimal: no rank is a bottleneck.

# %%
N = 4
bufs = [np.full(N * 2, r + 1.0) for r in range(N)]  # rank r holds r+1 everywhere
chunks = [np.array_split(b.copy(), N) for b in bufs]
for s in range(N - 1):
    sent = [chunks[r][(r - s - 1) % N].copy() for r in range(N)]  # everyone sends at once
    for r in range(N):
        c = (r - s - 2) % N
        chunks[r][c] = chunks[r][c] + sent[(r - 1) % N]  # receive from the left neighbour and add
    print(f"reduce-scatter step {s}: rank 0 chunks =", [c.tolist() for c in chunks[0]])
print("rank r now holds chunk r complete:", [chunks[r][r].tolist() for r in range(N)], "(1+2+3+4 = 10)")

# %% [markdown]
# ## 2. The ring in real processes
# `launch.run(fn, N)` spawns N fresh Python processes connected by pipes (one BLAS thread each) and
# runs `fn(process_group)` in each. The byte counters are checked against the formula.

# %%
n_elems = 1024
for o in launch.run(ring_all_reduce_demo, 4, args=(n_elems,), timeout=30):
    print(f"rank {o['rank']}: sum starts {o['result_head']}, sent {o['bytes_sent']} bytes "
          f"= {o['bytes_sent'] / o['buffer_bytes']:.3f} x buffer (2(N-1)/N = {2 * 3 / 4:.3f})")
assert o["bytes_sent"] == ring_bytes("all_reduce", n_elems * 8, 4)

# %%
check("ex16a", "ex16b")  # exercises: the ring's reduce-scatter and all-gather

# %% [markdown]
# ## 3. Training on 2 replicas = training on 1
# A run folder made by `llama3np train`'s own setup (data, tokenizer, step-0 checkpoint). The reference is
# one process doing `model.loss_and_grads` on the whole batch + AdamW; the grid run splits the batch
# over dp=2 processes. In float64 the only difference is the order of the sums (a row of the batch
# is added into the gradient on another process), so the weights agree to ~1e-14.

# %%
work = tempfile.mkdtemp(prefix="llama3np_nb04_")
steps = 4 if FAST else 20
cfg = small_run(work, steps)  # the run folder the parallel notebooks share (llama3np.parallel.examples)
reference = engine.reference_train(cfg.out, steps, np.float64).params
params_dp2, res = run_on(cfg, "dp2", dp=2)  # a copy of it, trained on dp=2 processes
print("losses:", [round(r["loss"], 4) for r in res[0]["records"]])
print(f"max relative difference from one process: {engine.relative_error(params_dp2, reference):.2e}")

# %% [markdown]
# ## 4. Buckets, the way PyTorch's DDP does it
# The gradients are packed in buckets, filled in reverse layer order (the backward finishes the output
# layer first), and the buckets are all-reduced strictly in order, so all ranks issue the same
# collectives. With `overlap=True` a bucket goes out on a background thread as soon as its layers'
# backward is done, while the backward of earlier layers still runs. The arithmetic does not change.

# %%
params_ov, res_ov = run_on(cfg, "overlap", dp=2, overlap=True, bucket_bytes=16 * 1024)
print("bucket launch order (per step):", res_ov[0]["bucket_launch_order"][:len(res_ov[0]["bucket_launch_order"]) // steps])
print("same bits as without overlap:", all(np.array_equal(params_ov[n], params_dp2[n]) for n in params_dp2))
print("buckets launched while the backward was still running, per step:", res_ov[0]["buckets_launched_during_backward"])

# the last step of each rank: compute above, the buckets' all-reduces (thin bars) below, overlapping it
trace = Trace()
for o in res_ov:
    for ev in o["trace"]:
        trace.add(*ev)
t0 = min(e[3] for e in trace.events)
trace.events = [(r, n, mb, a - t0, b - t0) for r, n, mb, a, b in trace.events]
path = trace.gantt(os.path.join(work, "overlap.png"), title="dp=2, overlapped buckets (last step)",
                   labels={0: "rank 0", 1: "rank 1"})
plt.figure(figsize=(10, 2.4)); plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()
grad_bytes = sum(p.size for p in params_dp2.values()) * 8
sent = res_ov[0]["bytes_sent"]["dp(tp0,pp0)"]["all_reduce"]
print(f"all-reduce bytes per rank per step: {sent // steps} = 2(N-1)/N x {grad_bytes} gradient bytes")

# %% [markdown]
# ## 5. ZeRO-1: shard the optimizer state
# AdamW keeps two moments per parameter: in fp32 that is 8 bytes, twice the weights. ZeRO stage 1 gives
# each replica 1/N of the moments: gradients are reduce-scattered (each rank gets the average of its
# 1/N), each rank updates its 1/N of the weights, and an all-gather shares the new weights. Memory per
# rank: 4 (weights) + 4 (gradients) + 8/N (moments) bytes per parameter. The update is AdamW's,
# element for element: the same bits.

# %%
shutil.rmtree(os.path.join(work, "dp2"))
params_fp32, res_plain = run_on(cfg, "dp2", dp=2, dtype="float32")
params_zero, res_zero = run_on(cfg, "zero", dp=2, zero=True, dtype="float32")
for name, res_ in (("plain DP", res_plain), ("ZeRO-1", res_zero)):
    m = res_[0]["memory"]
    print(f"{name:9s}: {(m['params'] + m['grads'] + m['optimizer']) / m['n_params']:.2f} bytes per parameter")
print("expected: 16 and 8 + 8/2 = 12; same weights:", all(np.array_equal(params_zero[n], params_fp32[n]) for n in params_fp32))
