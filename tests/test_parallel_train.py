"""The central test: every dp x tp x pp grid trains to the same weights as one process.

A tiny model (dim 32, 2 layers, 4 heads / 2 kv heads, FFN 64, vocabulary 520) trains 4 steps from
the same run folder (llama3np train's: data, config, step-0 checkpoint). In float64 every grid must
match the single-process run within 1e-12 relative (the grids only change the order of sums: rows
split over replicas and micro-batches, features split over tensor-parallel ranks); (1,1,1) and
plain-vs-ZeRO are bitwise equal because their arithmetic is the same. In float32 the grids match
`llama3np.training.train` itself within 1e-5.

Relative error = max over tensors of ||ours - reference|| / ||reference|| (engine.relative_error: an
entry by entry ratio would be dominated by the few entries whose gradient is rounding noise, which AdamW
rescales to a full step). Both sides run with one BLAS thread: a different thread count changes the
blocking of the matrix products, hence their rounding.
"""
import shutil

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from llama3np.parallel import engine as E
from llama3np.parallel.comm import ring_bytes
from llama3np.parallel.data_parallel import GradReducer
from llama3np.parallel.schedule import make_schedule, peak_activations
from llama3np.training import TrainConfig
from llama3np.training import run_folder as ckpt

OVERRIDES = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=520)
STEPS = 4


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run folder at step 0 (data.npz, config.json, ckpt_00000000.npz), shared by every grid."""
    out = tmp_path_factory.mktemp("par") / "base"
    cfg = TrainConfig(out=str(out), preset="tiny", model_overrides=OVERRIDES, steps=STEPS, batch_size=8, seq_len=16,
                      progress=False, n_stories=60, val_stories=5, eval_every=1000, save_every=2, keep=10)
    return E.prepare_run(cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def reference64(base_run):
    with threadpool_limits(1):
        return E.reference_train(base_run.out, STEPS, np.float64).params


def grid_run(base_run, tmp_path, name="run", **kw):
    """Copy the step-0 folder, train on the grid kw (ParallelConfig fields) -> (final params, summaries)."""
    run = tmp_path / name
    shutil.copytree(base_run.out, run)
    cfg = TrainConfig(**{**base_run.__dict__, "out": str(run)})
    pcfg = E.ParallelConfig(timeout=30, **{"dtype": "float64", **kw})
    out = E.run_grid(run, cfg, pcfg, total_timeout=60)
    ck = ckpt.read_checkpoint(ckpt.list_checkpoints(run)[0])
    assert ck["meta"]["step"] == STEPS
    return ck["params"], out, run


max_rel_err = E.relative_error


GRIDS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 1), (2, 2, 2)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp,tp,pp", GRIDS, ids=[f"dp{d}-tp{t}-pp{p}" for d, t, p in GRIDS])
def test_every_grid_trains_to_the_single_process_weights_in_float64(base_run, reference64, tmp_path, dp, tp, pp):
    m = 2 if pp > 1 else 1
    params, out, _ = grid_run(base_run, tmp_path, dp=dp, tp=tp, pp=pp, micro_batches=m)
    assert set(params) == set(reference64)
    if (dp, tp, pp) == (1, 1, 1):
        for n in reference64:  # the same operations in the same order: the same bits
            np.testing.assert_array_equal(params[n], reference64[n], err_msg=n)
    assert max_rel_err(params, reference64) < 1e-12
    losses = [r["loss"] for r in out[0]["records"]]
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it trains


@pytest.mark.timeout(120)
def test_float32_grids_match_llama3np_train_itself(base_run, tmp_path):
    """(1,1,1) gives llama3np train's bits; (2,1,2) with 1F1B over 2 micro-batches is within 1e-5."""
    from llama3np.training import train

    single = tmp_path / "single"
    shutil.rmtree(single, ignore_errors=True)
    cfg = TrainConfig(**{**base_run.__dict__, "out": str(single)})
    with threadpool_limits(1):
        model = train(cfg, log=lambda m: None)
    ours, _, _ = grid_run(base_run, tmp_path, "p111", dtype="float32")
    for n in model.params:
        np.testing.assert_array_equal(ours[n], model.params[n], err_msg=n)
    ours, _, _ = grid_run(base_run, tmp_path, "p212", dtype="float32", dp=2, pp=2, micro_batches=2)
    assert max_rel_err(ours, model.params) < 1e-5


@pytest.mark.timeout(120)
def test_zero1_gives_the_bits_of_plain_data_parallelism_with_8_plus_8_over_n_bytes_per_parameter(base_run, tmp_path):
    plain, out_plain, _ = grid_run(base_run, tmp_path, "ddp", dtype="float32", dp=2)
    zero, out_zero, _ = grid_run(base_run, tmp_path, "zero", dtype="float32", dp=2, zero=True)
    for n in plain:
        np.testing.assert_array_equal(zero[n], plain[n], err_msg=n)
    for o in out_zero:
        mem = o["memory"]
        per_param = (mem["params"] + mem["grads"] + mem["optimizer"]) / mem["n_params"]
        assert per_param == pytest.approx(8 + 8 / 2, rel=1e-3)  # fp32: 4 params + 4 grads + 8/N moments
    mem = out_plain[0]["memory"]
    assert (mem["params"] + mem["grads"] + mem["optimizer"]) / mem["n_params"] == 16


@pytest.mark.timeout(120)
def test_overlapped_bucketed_all_reduce_launches_buckets_in_order_and_changes_nothing(base_run, tmp_path):
    plain, out_plain, _ = grid_run(base_run, tmp_path, "plain", dp=2)
    over, out_over, _ = grid_run(base_run, tmp_path, "over", dp=2, overlap=True, bucket_bytes=8192)
    for n in plain:  # with two replicas each sum is a + b whatever the bucket: the same bits
        np.testing.assert_array_equal(over[n], plain[n], err_msg=n)
    order = out_over[0]["bucket_launch_order"]
    n_buckets = len(order) // STEPS
    assert n_buckets > 3 and order == list(range(n_buckets)) * STEPS
    # overlapped: every bucket went out from inside the backward; plain: all of them after it
    assert out_over[0]["buckets_launched_during_backward"] == [n_buckets] * STEPS
    assert out_plain[0]["buckets_launched_during_backward"] == [0] * STEPS
    # the ring sends 2(N-1)/N of every gradient byte per step, here exactly the gradient's size
    grad_bytes = sum(v.size for v in plain.values()) * 8
    for o in out_over:
        sent = o["bytes_sent"]["dp(tp0,pp0)"]["all_reduce"]
        assert sent == STEPS * ring_bytes("all_reduce", grad_bytes, 2)


def test_ddp_buckets_are_filled_in_reverse_layer_order():
    class One:
        size, timeout = 1, 1.0

    names = ["tok_embeddings.weight", "layers.0.w", "layers.1.w", "norm.weight", "output.weight"]
    shapes = {n: (100,) for n in names}
    r = GradReducer(One(), list(reversed(names)), shapes, np.float32, bucket_bytes=800)
    assert r.buckets == [["output.weight", "norm.weight"], ["layers.1.w", "layers.0.w"], ["tok_embeddings.weight"]]


@pytest.mark.timeout(120)
def test_pipeline_executor_holds_the_activations_the_schedule_predicts(base_run, reference64, tmp_path):
    """Measured peak micro-batches held per stage = schedule.peak_activations: GPipe m, 1F1B min(p - s, m),
    zero-bubble min(2p - s - 1, m); the bytes those activations occupy scale with that count (equal
    micro-batches, equal bytes); zero-bubble gives 1F1B's bits."""
    per_stage, final = {}, {}
    for schedule, expect in (("gpipe", [4, 4]), ("1f1b", [2, 1]), ("zb", [3, 2])):
        params, out, _ = grid_run(base_run, tmp_path, schedule, pp=2, micro_batches=4, schedule=schedule)
        assert max_rel_err(params, reference64) < 1e-12
        out = sorted(out, key=lambda o: o["coords"][2])
        measured = [o["peak_activations"] for o in out]
        assert measured == peak_activations(make_schedule(schedule, 2, 4)) == expect
        per_stage[schedule] = [o["peak_activation_bytes"] / o["peak_activations"] for o in out]
        final[schedule] = params
    assert per_stage["gpipe"] == per_stage["1f1b"] and min(per_stage["gpipe"]) > 0
    # zero-bubble only moves the weight-gradient products later: the same products, the same sums, the same bits
    for n in final["1f1b"]:
        np.testing.assert_array_equal(final["zb"][n], final["1f1b"][n], err_msg=n)


@pytest.mark.timeout(120)
def test_a_checkpoint_saved_at_dp2_resumes_at_dp1_dp4_and_tp2_pp2(base_run, reference64, tmp_path):
    """Checkpoints hold full, unsharded tensors: stop a dp=2 run at step 2, finish it on other grids."""
    _, _, run = grid_run(base_run, tmp_path, "dp2", dp=2)
    (run / ckpt.ckpt_name(STEPS)).unlink()  # as if the dp=2 run had stopped after its step-2 checkpoint
    for name, kw in (("as-dp1", {}), ("as-dp4", dict(dp=4)), ("as-tp2pp2", dict(tp=2, pp=2))):
        again = tmp_path / name
        shutil.copytree(run, again)
        cfg = TrainConfig(**{**base_run.__dict__, "out": str(again)})
        out = E.run_grid(again, cfg, E.ParallelConfig(dtype="float64", timeout=30, **kw), total_timeout=60)
        assert out[0]["start_step"] == 2
        params = ckpt.read_checkpoint(ckpt.list_checkpoints(again)[0])["params"]
        assert max_rel_err(params, reference64) < 1e-12


@pytest.mark.parametrize("kw,match", [
    (dict(tp=3), "n_heads=4 divisible by 3"),
    (dict(tp=4), "n_kv_heads=2 divisible by 4"),
    (dict(pp=3), "needs at least as many layers"),
    (dict(pp=2, schedule="interleaved", chunks=2, micro_batches=2), "pp=2 stages x 2 chunks needs at least"),
    (dict(pp=2, schedule="interleaved", micro_batches=1), "divisible by the stages"),
    (dict(dp=3), "does not split into dp=3"),
    (dict(dp=2, micro_batches=3), "multiple of 6"),
    (dict(schedule="zigzag"), "unknown pipeline schedule"),
    (dict(dp=2, faults=[("kill", 2, 1)]), "names rank 2"),
    (dict(dtype="float16"), "float32 or float64"),
])
def test_bad_grids_are_rejected_before_any_process_starts(kw, match):
    from llama3np.args import preset

    args = preset("tiny", **OVERRIDES)
    with pytest.raises(ValueError, match=match):
        E.check_config(args, E.ParallelConfig(**kw), batch_rows=8)


def test_fault_specs_parse_or_say_what_is_expected():
    assert E.parse_fault("kill:1@3") == ("kill", 1, 3)
    for bad in ("kill:1", "boom:1@2", "hang:x@2", "nan:0@0"):
        with pytest.raises(ValueError, match="bad fault"):
            E.parse_fault(bad)


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory):
    """4 layers with tied embeddings (as Llama 3.2 1B/3B): room for 2 stages x 2 chunks."""
    out = tmp_path_factory.mktemp("tied") / "base"
    cfg = TrainConfig(out=str(out), preset="tiny", model_overrides=dict(OVERRIDES, n_layers=4, tie_embeddings=True),
                      steps=3, batch_size=8, seq_len=16, progress=False, n_stories=60, val_stories=5, eval_every=1000,
                      save_every=3, keep=10)
    cfg = E.prepare_run(cfg, log=lambda m: None)
    with threadpool_limits(1):
        return cfg, E.reference_train(cfg.out, 3, np.float64).params


@pytest.mark.timeout(120)
@pytest.mark.parametrize("grid", [
    dict(pp=2, schedule="interleaved", chunks=2, micro_batches=2),
    dict(tp=2, pp=2, micro_batches=2),
    dict(dp=2, pp=2, schedule="interleaved", micro_batches=2, overlap=True, bucket_bytes=2048),
    dict(dp=2, tp=2, zero=True),
    dict(dp=2, pp=2, schedule="zb", micro_batches=2, overlap=True, bucket_bytes=2048),
], ids=["interleaved-pp2x2chunks", "tp2-pp2", "dp2-interleaved-overlap", "dp2-tp2-zero1", "dp2-zb-overlap"])
def test_tied_embeddings_interleaving_overlap_and_zero_on_grids_match_one_process(tied_run, tmp_path, grid):
    """The embedding lives on the first stage and, as the output layer, on the last: both copies get the
    sum of both gradients. Interleaved 1F1B passes each micro-batch through every rank twice; the
    overlapped buckets and ZeRO-1's shards work inside a replica that is itself split over processes."""
    cfg, reference = tied_run
    run = tmp_path / "run"
    shutil.copytree(cfg.out, run)
    out = E.run_grid(run, TrainConfig(**{**cfg.__dict__, "out": str(run)}),
                     E.ParallelConfig(dtype="float64", timeout=30, **grid), total_timeout=60)
    params = ckpt.read_checkpoint(ckpt.list_checkpoints(run)[0])["params"]
    assert "output.weight" not in params
    assert max_rel_err(params, reference) < 1e-12
    if grid.get("schedule") == "interleaved":
        replica0 = sorted((o for o in out if o["coords"][0] == 0), key=lambda o: o["coords"][2])
        assert [o["peak_activations"] for o in replica0] == peak_activations(make_schedule("interleaved", 2, 2, 2))
