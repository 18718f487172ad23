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
# # 05 — Pipeline parallelism: schedules as data
#
# The layers are split into p stages, one per process, and the batch into m micro-batches that flow
# through them. Who does what when is a **schedule**: for each stage, a list of actions (F j, B j, and
# the sends and receives between neighbours). The same lists are run by the executor, drawn here and
# checked by the tests (ShallowSpeed's idea). We measure two things on a logical clock, where they are
# exact: the **bubble** (idle share of the pipeline) and the **activation memory** (how many
# micro-batches a stage holds at once).

# %%
import os
import tempfile
from fractions import Fraction

import matplotlib.pyplot as plt
import numpy as np

from llama3np.parallel import engine
from llama3np.parallel import schedule as S
from llama3np.parallel.trace import Trace
from llama3np.parallel.examples import run_on, small_run
from llama3np.exercises import check

FAST = os.environ.get("LLAMA3NP_NOTEBOOK_FAST") == "1"
work = tempfile.mkdtemp(prefix="llama3np_nb05_")

# %% [markdown]
# ## 1. GPipe and 1F1B, as lists
# GPipe runs all forwards, then all backwards. 1F1B (PipeDream-Flush, Megatron's default) runs p-s-1
# warm-up forwards on stage s, then alternates one forward and one backward.

# %%
p, m = 4, 6
for name in ("gpipe", "1f1b"):
    print(name)
    print(S.format_schedule(S.make_schedule(name, p, m)))
print("\nthe full action list of stage 1 under 1F1B:", S.one_f_one_b(p, m)[1][:8], "...")

# %% [markdown]
# ## 2. On a logical clock
# Forward = 1 tick, backward = 2 ticks (a backward does about twice the matrix products); a receive waits
# for its send. Both schedules take (m + p - 1)(t_f + t_b) ticks where m (t_f + t_b) would be ideal: the
# bubble is (p-1)/(m+p-1), exactly, whatever the schedule. What 1F1B changes is the memory.

# %%
for name in ("gpipe", "1f1b"):
    events = S.simulate(S.make_schedule(name, p, m), t_f=1, t_b=2)
    path = Trace.from_simulation(events).gantt(os.path.join(work, f"{name}.png"), title=f"{name}, p={p}, m={m}",
                                              unit="ticks")
    plt.figure(figsize=(10, 2.6)); plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()
    stages = S.make_schedule(name, p, m)
    print(f"{name}: bubble {S.bubble_fraction(events)} (theory {S.theoretical_bubble(p, m)}), "
          f"peak micro-batches held per stage {S.peak_activations(stages)}")

# %% [markdown]
# More micro-batches shrink the bubble; with GPipe they cost memory (every stage holds all m), with 1F1B
# they do not (stage s holds at most p - s).

# %%
print(" m   bubble   GPipe peak   1F1B peak")
for mm in (1, 2, 4, 8, 16, 32):
    b = S.bubble_fraction(S.simulate(S.one_f_one_b(p, mm)))
    print(f"{mm:2d}   {float(b):.3f}    {max(S.peak_activations(S.gpipe(p, mm))):3d}          "
          f"{S.peak_activations(S.one_f_one_b(p, mm))}")

# %%
check("ex17")  # exercise: the 1F1B schedule as data

# %% [markdown]
# ## 3. Interleaving: a smaller bubble for more messages and more memory
# Megatron's interleaved 1F1B gives every rank v model chunks (rank s holds virtual stages s, s+p, ...),
# so a micro-batch passes through every rank v times. The warm-up and cool-down are made of chunks 1/v
# the size of a stage: the bubble becomes (p-1)/(v m + p - 1). The price: v times more point-to-point
# messages, and more activations held (counted below in chunk-micro-batches, each 1/v of a stage's).
# `F3.1` is micro-batch 3 on chunk 1.

# %%
m_i, v = 8, 2
stages_i = S.interleaved(p, m_i, v)
print(S.format_schedule(stages_i))
events = S.simulate(stages_i, t_f=Fraction(1, v), t_b=Fraction(2, v))  # a chunk is 1/v of a stage's work
path = Trace.from_simulation(events).gantt(os.path.join(work, "interleaved.png"),
                                          title=f"interleaved 1F1B, p={p}, m={m_i}, v={v}", unit="ticks")
plt.figure(figsize=(10, 2.6)); plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()
print(f"bubble {S.bubble_fraction(events)} (theory (p-1)/(vm+p-1) = {S.theoretical_bubble(p, m_i, v)}; 1F1B: "
      f"{S.theoretical_bubble(p, m_i)})")
print(f"peak chunk-micro-batches held: {S.peak_activations(stages_i)} = "
      f"{[x / v for x in S.peak_activations(stages_i)]} stage-micro-batches (1F1B: {S.peak_activations(S.one_f_one_b(p, m_i))})")

# %% [markdown]
# ## 4. Zero bubble: split the backward in two
# The backward of a layer computes two things: the gradient of its input (B: the previous stage waits
# for it) and the gradients of its weights (W: nobody waits for them). Zero-bubble pipelines (Qi et al.
# 2023) run B at once and postpone W into the idle slots of the cool-down. With F, B, W taking the same
# time, the bubble drops from (p-1)/(m+p-1) to (p-1)/(3m+p-1) (1F1B's backward counted as B + W); the
# layer inputs kept for W cost memory: up to 2p - s - 1 micro-batches instead of p - s.

# %%
stages_zb = S.zero_bubble(p, m_i)
print(S.format_schedule(stages_zb))
events = S.simulate(stages_zb, t_f=1, t_b=1, t_w=1)
path = Trace.from_simulation(events).gantt(os.path.join(work, "zb.png"), title=f"zero bubble, p={p}, m={m_i}",
                                          unit="ticks")
plt.figure(figsize=(10, 2.6)); plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()
print(f"bubble {S.bubble_fraction(events)} (theory {S.theoretical_bubble(p, m_i, zero_bubble=True)}; 1F1B "
      f"{S.bubble_fraction(S.simulate(S.one_f_one_b(p, m_i), t_f=1, t_b=2))}); micro-batches held "
      f"{S.peak_activations(stages_zb)} (1F1B {S.peak_activations(S.one_f_one_b(p, m_i))})")

# %% [markdown]
# ## 5. The real thing: 2 stages in 2 processes
# A tiny Llama of 4 layers; 2 stages of 2 layers each (interleaved: 4 chunks of 1 layer, 2 per rank),
# 4 micro-batches. Every rank records a trace of timed events (the Gantt chart below is drawn from
# wall-clock times), and counts the micro-batches it holds: the executor matches the schedule's
# prediction, and the weights match one process (zero-bubble's are 1F1B's, bit for bit: the same
# products, only later).

# %%
steps = 3 if FAST else 10
cfg = small_run(work, steps, n_layers=4)  # the run folder the parallel notebooks share
reference = engine.reference_train(cfg.out, steps, np.float64).params

final = {}
for name in S.SCHEDULES:
    params, res = run_on(cfg, name, pp=2, micro_batches=4, schedule=name)
    final[name] = params
    err = engine.relative_error(params, reference)
    peaks = [o["peak_activations"] for o in sorted(res, key=lambda o: o["coords"][2])]
    mib = [round(o["peak_activation_bytes"] / 2**20, 2) for o in sorted(res, key=lambda o: o["coords"][2])]
    print(f"{name}: measured peak per stage {peaks} ({mib} MiB of activations), predicted "
          f"{S.peak_activations(S.make_schedule(name, 2, 4, 2))}; "
          f"max relative difference from one process {err:.1e}")
    trace = Trace()
    for o in res:
        for ev in o["trace"]:
            trace.add(*ev)
    t0 = min(e[3] for e in trace.events)
    trace.events = [(r, n, mb, s - t0, e - t0) for r, n, mb, s, e in trace.events]
    path = trace.gantt(os.path.join(work, f"real_{name}.png"), title=f"{name} in 2 processes, last step")
    plt.figure(figsize=(10, 2.4)); plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()

print("zero-bubble weights == 1F1B weights, bitwise:", all(np.array_equal(final["zb"][n], final["1f1b"][n]) for n in reference))
