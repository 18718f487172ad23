"""ex16a: ring reduce-scatter (ProcessGroup._reduce_scatter), with 2, 3 and 4 ranks as threads."""
import numpy as np
import pytest

from llama3np.exercises.testing import assert_close, load_fixture
from llama3np.parallel.comm import ring_bytes

from ._ring import run_ranks

FX = load_fixture("ex16a")


@pytest.mark.parametrize("n", [2, 3, 4])
def test_each_rank_gets_its_chunk_of_the_sum(n):
    """Rank r receives chunk r (np.array_split of 11 values) of the sum over all ranks' arrays."""
    x = FX[f"n{n}.x"]
    got = run_ranks(n, lambda pg: pg.reduce_scatter(x[pg.rank]))
    for r in range(n):
        assert_close(got[r], np.array_split(FX[f"n{n}.sum"], n)[r], f"rank {r} of {n}: its chunk of the sum")


def test_max_reduces_too():
    """op='max' gives each rank its chunk of the elementwise maximum (3 ranks)."""
    x = FX["n3.x"]
    got = run_ranks(3, lambda pg: pg.reduce_scatter(x[pg.rank], op="max"))
    for r in range(3):
        assert_close(got[r], np.array_split(FX["n3.max"], 3)[r], f"rank {r}: its chunk of the max")


def test_each_rank_sends_the_ring_bytes():
    """A ring: every rank sends (N - 1) / N of the buffer, N - 1 chunks to its right neighbour (4 ranks)."""
    def fn(pg):
        pg.reduce_scatter(np.arange(16, dtype=np.float64) + pg.rank)
        return pg.stats.get("reduce_scatter", 0)
    for r, sent in enumerate(run_ranks(4, fn)):
        assert sent == ring_bytes("reduce_scatter", 16 * 8, 4), f"rank {r} sent {sent} bytes, a ring sends 96"
