"""The small runs and worker functions the notebooks share (spawned processes need importable functions:
a function defined in a notebook cell cannot be sent to a `spawn`ed process).

    cfg = small_run(work, steps=10)                   # a step-0 run folder of a 32-wide Llama 3
    params, results = run_on(cfg, "dp2", dp=2)        # a copy of it trained on a grid
"""
import os
import shutil

import numpy as np


def ring_all_reduce_demo(pg, n_elems):
    """Each rank contributes (rank + 1) * ones; -> what it got and the bytes it sent."""
    x = np.full(n_elems, pg.rank + 1.0)
    pg.reset_stats()
    y = pg.all_reduce(x)
    return {"rank": pg.rank, "result_head": y[:4].tolist(), "bytes_sent": pg.stats["all_reduce"],
            "buffer_bytes": x.nbytes}


def small_run(work, steps, n_layers=2, save_every=None, keep=10, log=print):
    """The run folder notebooks 04-07 start from, `work/base`: a Llama 3 of width 32 with `n_layers`
    layers on 80 stories, batches of 8 rows of 16 tokens, the step-0 checkpoint written
    (engine.prepare_run). -> its TrainConfig."""
    from ..training import TrainConfig
    from . import engine

    cfg = TrainConfig(out=os.path.join(work, "base"), preset="tiny",
                      model_overrides=dict(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                           vocab_size=520),
                      steps=steps, batch_size=8, seq_len=16, n_stories=80, val_stories=5, eval_every=10**6,
                      save_every=save_every or steps, keep=keep, progress=False)
    return engine.prepare_run(cfg, log=log)


def copy_run(cfg, name, source=None):
    """A copy of the run folder `source` (default: cfg's) as a sibling called `name` -> its TrainConfig."""
    from ..training import TrainConfig

    out = os.path.join(os.path.dirname(cfg.out), name)
    shutil.copytree(source or cfg.out, out)
    return TrainConfig(**{**cfg.__dict__, "out": out})


def final_params(out):
    """The weights of the newest checkpoint in run folder `out`."""
    from ..training import run_folder

    return run_folder.read_checkpoint(run_folder.list_checkpoints(out)[0])["params"]


def run_on(cfg, name, **grid):
    """Copy the step-0 run folder, train it on the grid (float64 unless `dtype` is given)
    -> (final weights, per-rank summaries)."""
    from . import engine

    c = copy_run(cfg, name)
    results = engine.run_grid(c.out, c, engine.ParallelConfig(**{"dtype": "float64", **grid}))
    return final_params(c.out), results
