"""The rank grid: world = dp x pp x tp processes, and the process group of each track.

Megatron-LM's layout: the tensor-parallel rank varies fastest, then data-parallel, then pipeline,

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so the ranks that talk most (tensor parallelism: two all-reduces per layer) are neighbours, which on a
real cluster means the same machine. For dp=2, tp=2, pp=2:

    pp stage 0:  dp 0 -> ranks [0 1] (tp)   dp 1 -> ranks [2 3]
    pp stage 1:  dp 0 -> ranks [4 5]        dp 1 -> ranks [6 7]

Each rank belongs to one group per track: `tp_group` (same dp and pp: shards of the same layers),
`dp_group` (same tp and pp: replicas holding the same shard), `pp_group` (same dp and tp: the stages of
one model replica), and `mp_group` (same dp: the tp x pp ranks that together hold one whole model).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class GridShape:
    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("dp", "tp", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    @property
    def world_size(self):
        return self.dp * self.tp * self.pp

    def rank_of(self, dp_rank, tp_rank, pp_rank):
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def coords(self, rank):
        """global rank -> (dp_rank, tp_rank, pp_rank)"""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the grid of {self.world_size} ranks")
        return (rank // self.tp) % self.dp, rank % self.tp, rank // (self.tp * self.dp)


class Grid:
    """This process's place on the grid and its four groups (built from the world ProcessGroup)."""

    def __init__(self, world, shape: GridShape):
        if world.size != shape.world_size:
            raise ValueError(f"the grid dp={shape.dp} x tp={shape.tp} x pp={shape.pp} needs "
                             f"{shape.world_size} processes, the world has {world.size}")
        self.world, self.shape = world, shape
        self.dp_rank, self.tp_rank, self.pp_rank = shape.coords(world.rank)
        d, t, p = self.dp_rank, self.tp_rank, self.pp_rank
        self.tp_group = world.new_group([shape.rank_of(d, i, p) for i in range(shape.tp)], f"tp(dp{d},pp{p})")
        self.dp_group = world.new_group([shape.rank_of(i, t, p) for i in range(shape.dp)], f"dp(tp{t},pp{p})")
        self.pp_group = world.new_group([shape.rank_of(d, t, i) for i in range(shape.pp)], f"pp(dp{d},tp{t})")
        self.mp_group = world.new_group([shape.rank_of(d, i, j) for j in range(shape.pp) for i in range(shape.tp)],
                                        f"mp(dp{d})")

    def __repr__(self):
        return (f"Grid(rank {self.world.rank}: dp {self.dp_rank}/{self.shape.dp}, tp {self.tp_rank}/{self.shape.tp}, "
                f"pp {self.pp_rank}/{self.shape.pp})")
