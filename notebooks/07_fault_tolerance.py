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
# # 07 — When a process dies: detection, restart, goodput
#
# Llama 3 405B was pre-trained on 16K GPUs for 54 days with 419 unexpected interruptions, and still spent
# more than 90% of the time training (the paper's "effective training time"). The recipe, small:
#
# - a **supervisor** starts the workers and watches them: exit codes, heartbeats (one per step), and NaN
#   reports;
# - on a dead, hung or NaN worker it stops the whole group (its collectives need every rank) and starts
#   a new one from the **last checkpoint**;
# - a step depends on nothing but the checkpoint (weights, AdamW moments, loader position), so the
#   restarted run ends with the **same bits** as a run that never failed.
#
# Faults are injected on purpose: `kill:RANK@STEP`, `hang:RANK@STEP`, `nan:RANK@STEP`.

# %%
import os
import tempfile

import numpy as np

from llama3np.parallel import engine, supervisor
from llama3np.training import run_folder as ckpt
from llama3np.parallel.examples import copy_run, final_params, small_run

FAST = os.environ.get("LLAMA3NP_NOTEBOOK_FAST") == "1"
work = tempfile.mkdtemp(prefix="llama3np_nb07_")
steps = 6 if FAST else 30
cfg = small_run(work, steps, save_every=2, keep=100)  # the run folder the parallel notebooks share


def supervised(name, faults=(), **grid):
    c = copy_run(cfg, name)
    out = c.out
    summary = supervisor.supervise(out, c, engine.ParallelConfig(faults=list(faults), timeout=30, **{"dp": 2, **grid}),
                                   heartbeat_timeout=2.0, log=print)
    print(supervisor.format_summary(summary))
    return final_params(out), summary


clean, _ = supervised("clean")

# %% [markdown]
# ## 1. Three kinds of failure
# A killed process is seen at once (its exit). A hung one only by its silence: after
# `heartbeat_timeout` seconds without a heartbeat. A NaN is reported by the rank that sees it. In each
# case the run restarts from the last checkpoint (every 2 steps here) and redoes the lost steps.

# %%
for fault in [("kill", 1, 5), ("hang", 0, 3), ("nan", 1, 4)]:
    print(f"\n--- injected {fault[0]} on rank {fault[1]} in step {fault[2]}")
    params, summary = supervised(f"{fault[0]}", [fault])
    same = all(np.array_equal(params[n], clean[n]) for n in clean)
    print("final weights bitwise equal to the fault-free run:", same)

# %% [markdown]
# The goodput here is small because a tiny run is mostly process start-up, and detection of a hang
# costs the whole heartbeat timeout. The levers are the same as at scale: detect fast, restart fast,
# checkpoint often enough that little work is lost, but not so often that saving dominates.
#
# ## 2. Checkpoints do not depend on the grid
# Checkpoints hold full tensors (gathered from the shards), so a run saved on one grid continues on
# another: here the dp=2 run's step-2 checkpoint continues with tensor and pipeline parallelism.

# %%
c = copy_run(cfg, "regrid", source=os.path.join(work, "clean"))
out = c.out
for f in ckpt.list_checkpoints(out):
    if int(f.name[5:13]) > 2:
        f.unlink()
res = engine.run_grid(out, c, engine.ParallelConfig(tp=2, pp=2))
params = final_params(out)
err = engine.relative_error(params, clean)
print(f"resumed at step {res[0]['start_step']} on tp=2 x pp=2; max relative difference from the dp=2 run: {err:.1e}"
      " (float32: only the order of sums differs)")
