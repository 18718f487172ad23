"""ex16b: ring all-gather (ProcessGroup._all_gather), with 2, 3 and 4 ranks as threads."""
import numpy as np
import pytest

from llama3np.exercises.testing import assert_close, load_fixture
from llama3np.parallel.comm import ring_bytes

from ._ring import run_ranks

FX = load_fixture("ex16b")


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_rank_gets_every_chunk_in_rank_order(n):
    """Each rank returns the concatenation of all ranks' chunks, rank 0 first."""
    x = FX[f"n{n}.x"]
    got = run_ranks(n, lambda pg: pg.all_gather(x[pg.rank]))
    for r in range(n):
        assert_close(got[r], x.reshape(-1), f"rank {r} of {n}: the gathered array")


def test_each_rank_sends_the_ring_bytes():
    """A ring: every rank sends N - 1 chunks (4 ranks, 8 values each)."""
    def fn(pg):
        pg.all_gather(np.full(8, float(pg.rank)))
        return pg.stats.get("all_gather", 0)
    for r, sent in enumerate(run_ranks(4, fn)):
        assert sent == ring_bytes("all_gather", 8 * 8, 4), f"rank {r} sent {sent} bytes, a ring sends 192"
