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
# # 06 — Tensor parallelism: one layer on several processes
#
# Megatron-LM's split of a transformer block over t ranks:
#
# - **column-parallel** `wq, wk, wv, w1, w3` (split by output rows): each rank computes its own heads and
#   its own hidden units, from the full input;
# - **row-parallel** `wo, w2` (split by input columns): each rank's heads (or hidden units) give a partial
#   sum of the output, and an all-reduce adds them.
#
# So a block needs exactly two all-reduces forward (operator g) and two backward (operator f), and the
# attention and SwiGLU in between need no communication at all.

# %%
import os
import tempfile

import numpy as np

from llama3np import ops
from llama3np.parallel import engine
from llama3np.parallel import tensor_parallel as TP

FAST = os.environ.get("LLAMA3NP_NOTEBOOK_FAST") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Why the split works: SwiGLU over 2 "ranks" in one process
# `w2(silu(w1 x) * w3 x)`: split w1 and w3 by rows (hidden units) and w2 by columns. Rank r computes
# `w2_r(silu(w1_r x) * w3_r x)`, a partial output; the sum over ranks is the full output, because
# silu(.)*(.) acts on each hidden unit separately.

# %%
dim, hidden, t = 8, 16, 2
x = rng.standard_normal((3, dim))
w1, w3, w2 = rng.standard_normal((hidden, dim)), rng.standard_normal((hidden, dim)), rng.standard_normal((dim, hidden))
full = ops.swiglu_forward(x @ w1.T, x @ w3.T)[0] @ w2.T
partial = []
for r in range(t):
    w1_r = TP.shard("layers.0.feed_forward.w1.weight", w1, t, r)  # (hidden/t, dim)
    w3_r = TP.shard("layers.0.feed_forward.w3.weight", w3, t, r)
    w2_r = TP.shard("layers.0.feed_forward.w2.weight", w2, t, r)  # (dim, hidden/t)
    print(f"rank {r}: w1 {w1_r.shape}, w3 {w3_r.shape}, w2 {w2_r.shape}")
    partial.append(ops.swiglu_forward(x @ w1_r.T, x @ w3_r.T)[0] @ w2_r.T)
print("sum of the partial outputs = full output:", np.allclose(sum(partial), full, rtol=1e-12))

# %% [markdown]
# The same for attention: heads are independent until `wo` mixes them, so wq/wk/wv split by heads and
# wo by the matching columns. With grouped-query attention the kv heads must split too (n_kv_heads
# divisible by t), so that the query heads of a rank read kv heads of the same rank. The vocabulary is
# split for the embedding (each rank looks up the tokens it owns, zeros the others, and the all-reduce
# adds) and for the output layer, whose softmax needs only three small all-reduces (max, sum of
# exponentials, the target's logit) instead of gathering the logits.

# %%
from llama3np.args import preset

args = preset("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=520)
for tp in (2, 3, 4):
    try:
        TP.check_tp(args, tp)
        print(f"tp={tp}: fine")
    except ValueError as e:
        print(f"tp={tp}: {e}")

# %% [markdown]
# ## 2. One block for one process and for t processes
# The model's block (`llama3np.model.block_forward`) is the only copy: tensor parallelism runs the very
# same function on each rank's slices and passes the rank's process group. The group is used at exactly
# four points, Megatron's f (before wq/wk/wv and before w1/w3) and g (after wo and after w2). In one
# process the group is None and f and g are the identity, so the tensor-parallel code path *is* the
# single-process model, bit for bit.

# %%
import inspect

from llama3np import model as M
from llama3np.parallel.examples import run_on, small_run

for line in inspect.getsource(M.block_forward).splitlines():
    if "f_forward" in line or "g_forward" in line:
        print(line.strip())
print("f_forward with no group returns its input:", M.f_forward(x, None) is x)
print("g_forward with no group returns its input:", M.g_forward(x, None) is x)

# %% [markdown]
# ## 3. In real processes: tp=2 trains to the weights of one process

# %%
work = tempfile.mkdtemp(prefix="llama3np_nb06_")
steps = 3 if FAST else 10
cfg = small_run(work, steps)  # the run folder the parallel notebooks share (llama3np.parallel.examples)
reference = engine.reference_train(cfg.out, steps, np.float64).params
params, res = run_on(cfg, "tp2", tp=2)
err = engine.relative_error(params, reference)
print(f"max relative difference from one process: {err:.1e}")

# %% [markdown]
# ## 4. What it costs: the all-reduce volume, from the counters
# Per layer and micro-batch, 4 all-reduces of the activations (B, T, dim): g after wo and after w2
# (forward), f before the attention and before the feed-forward (backward). Plus the vocabulary-parallel
# embedding (one forward all-reduce), the output layer's f (one backward) and the three small loss
# all-reduces over (B, T). A ring all-reduce of n bytes sends 2(t-1)/t n per rank.

# %%
B, T = cfg.batch_size, cfg.seq_len
act = B * T * args.dim * 8  # float64 activations
row = B * T * 8
per_step = (4 * args.n_layers + 2) * act + 3 * row
sent = res[0]["bytes_sent"]["tp(dp0,pp0)"]["all_reduce"]
print(f"tensor-parallel all-reduce bytes per rank per step: measured {sent // steps}, "
      f"formula {per_step * 2 * (2 - 1) // 2}")
