"""The communication layer: collectives give the right numbers, send the textbook number of bytes,
never hang, and name what went wrong.

All checks of one group size run inside one launch (spawned processes are slow to start: each imports
NumPy), and the workers return what they saw for the test to assert on.
"""
import time

import numpy as np
import pytest

from llama3np.parallel import launch
from llama3np.parallel.comm import CommTimeout, ProcessGroup, ring_bytes
from llama3np.parallel.grid import Grid, GridShape


def _collectives(pg, n_elems):
    """Run every collective on rank-dependent data; return results and byte counts per op."""
    out = {}
    rng = np.random.default_rng(pg.rank)
    x = rng.standard_normal(n_elems)
    pg.reset_stats()
    out["all_reduce"] = pg.all_reduce(x)
    out["all_reduce_bytes"] = pg.stats.get("all_reduce", 0)
    out["max"] = pg.all_reduce(np.array([float(pg.rank), -float(pg.rank)]), op="max")
    pg.reset_stats()
    out["reduce_scatter"] = pg.reduce_scatter(x)
    out["reduce_scatter_bytes"] = pg.stats.get("reduce_scatter", 0)
    pg.reset_stats()
    chunk = np.full(n_elems // pg.size, pg.rank, dtype=np.float32)
    out["all_gather"] = pg.all_gather(chunk)
    out["all_gather_bytes"] = pg.stats.get("all_gather", 0)
    pg.reset_stats()
    out["broadcast"] = pg.broadcast(x if pg.rank == 1 else None, root=1)
    out["broadcast_bytes"] = pg.stats.get("broadcast", 0)
    if pg.size > 1:  # point to point: pass an int array around the ring
        pg.send(np.arange(3) + pg.rank, (pg.rank + 1) % pg.size)
        out["p2p"] = pg.recv((pg.rank - 1) % pg.size)
    pg.barrier()
    out["x"] = x
    return out


def _grid_groups(pg, dp, tp, pp):
    g = Grid(pg, GridShape(dp, tp, pp))
    # a sum over each group of the global ranks shows which ranks each group holds
    r = np.array([float(pg.rank)])
    return {"coords": (g.dp_rank, g.tp_rank, g.pp_rank), "tp": g.tp_group.ranks, "dp": g.dp_group.ranks,
            "pp": g.pp_group.ranks, "tp_sum": float(g.tp_group.all_reduce(r)[0]),
            "dp_sum": float(g.dp_group.all_reduce(r)[0]), "pp_sum": float(g.pp_group.all_reduce(r)[0])}


def _silent_peer(pg):
    """Rank 1 never sends; rank 0 must get a CommTimeout naming rank 1, within the timeout. (Rank 1
    stays alive until then: it waits, with a long timeout, for rank 0's word that it is done.)"""
    if pg.rank == 0:
        t0 = time.monotonic()
        try:
            pg.recv(1)
        except CommTimeout as e:
            result = ("timeout", str(e), time.monotonic() - t0)
        else:
            result = ("no error",)
        pg.send(np.zeros(0), 1, "done")
        return result
    ProcessGroup(pg.transport, timeout=30).recv(0, "done")
    return ("waited",)


def _out_of_order(pg):
    """Rank 0 does a broadcast while rank 1 does an all-reduce: the tags must not be mixed up."""
    try:
        if pg.rank == 0:
            pg.send(np.zeros(2), 1, "broadcast")
            ProcessGroup(pg.transport, timeout=30).recv(1, "done")  # stay alive until rank 1 has timed out
            return "sent"
        pg.recv(0, "all_reduce")
    except CommTimeout as e:
        pg.send(np.zeros(0), 0, "done")
        return str(e)
    return "no error"


def _tags_matched_out_of_arrival_order(pg):
    """Two kinds of message on one pipe, received in the other order (a pipeline's activations and
    gradients): each receive gets the message with its tag."""
    if pg.rank == 0:
        pg.send(np.array([1.0]), 1, "pp_fwd")
        pg.send(np.array([2.0]), 1, "pp_bwd")
        return None
    return [float(pg.recv(0, "pp_bwd")[0]), float(pg.recv(0, "pp_fwd")[0])]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [3, 4])
def test_collectives_agree_with_numpy_and_send_the_textbook_bytes(n):
    """Ring all-reduce equals the sum on every rank and sends 2(N-1)/N of the buffer per rank;
    reduce-scatter (N-1)/N, all-gather (N-1) chunks, broadcast (N-1) buffers from the root."""
    n_elems = 12 * n  # divisible by n, so the chunks are equal and the formulas exact
    outs = launch.run(_collectives, n, args=(n_elems,), timeout=20)
    total = sum(o["x"] for o in outs)
    nbytes = n_elems * 8
    for r, o in enumerate(outs):
        np.testing.assert_allclose(o["all_reduce"], total, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(o["all_reduce"], outs[0]["all_reduce"])  # bitwise the same on all ranks
        np.testing.assert_array_equal(o["max"], [n - 1, 0])
        np.testing.assert_allclose(o["reduce_scatter"], np.array_split(total, n)[r], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(o["all_gather"], np.repeat(np.arange(n), n_elems // n))
        np.testing.assert_array_equal(o["broadcast"], outs[1]["x"])
        np.testing.assert_array_equal(o["p2p"], np.arange(3) + (r - 1) % n)
        assert o["all_reduce_bytes"] == ring_bytes("all_reduce", nbytes, n) == 2 * (n - 1) * nbytes // n
        assert o["reduce_scatter_bytes"] == ring_bytes("reduce_scatter", nbytes, n)
        assert o["all_gather_bytes"] == ring_bytes("all_gather", n_elems // n * 4, n)
        assert o["broadcast_bytes"] == (ring_bytes("broadcast_root", nbytes, n) if r == 1 else 0)


@pytest.mark.timeout(60)
def test_grid_groups_follow_megatrons_layout_tp_fastest():
    """rank = tp + tp_size*(dp + dp_size*pp); each group holds the ranks that differ in its coordinate only."""
    dp, tp, pp = 2, 2, 2
    shape = GridShape(dp, tp, pp)
    outs = launch.run(_grid_groups, 8, args=(dp, tp, pp), timeout=20)
    for rank, o in enumerate(outs):
        d, t, p = o["coords"]
        assert shape.rank_of(d, t, p) == rank
        assert o["tp"] == [shape.rank_of(d, i, p) for i in range(tp)]
        assert o["dp"] == [shape.rank_of(i, t, p) for i in range(dp)]
        assert o["pp"] == [shape.rank_of(d, t, i) for i in range(pp)]
        assert o["tp_sum"] == sum(o["tp"]) and o["dp_sum"] == sum(o["dp"]) and o["pp_sum"] == sum(o["pp"])
    assert [o["coords"] for o in outs[:4]] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


@pytest.mark.timeout(60)
def test_a_silent_peer_raises_a_timeout_naming_it_instead_of_hanging():
    outs = launch.run(_silent_peer, 2, timeout=0.5)
    kind, msg, waited = outs[0]
    assert kind == "timeout" and "rank 1" in msg
    assert 0.45 < waited < 5.0  # the timeout, plus whatever a loaded machine adds to a wake-up


@pytest.mark.timeout(60)
def test_ranks_running_different_operations_get_a_clear_error_not_mixed_data():
    outs = launch.run(_out_of_order, 2, timeout=1)
    assert "different order" in outs[1] and "broadcast" in outs[1]


@pytest.mark.timeout(60)
def test_receives_match_tags_like_mpi_whatever_the_arrival_order():
    assert launch.run(_tags_matched_out_of_arrival_order, 2, timeout=5)[1] == [2.0, 1.0]


def test_bad_grid_and_bad_reductions_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        GridShape(1, 0, 1)
    with pytest.raises(ValueError, match="outside the grid"):
        GridShape(2, 1, 1).coords(2)
