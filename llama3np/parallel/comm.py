"""Process groups: point-to-point messages and the collectives, written out so a student can follow them.

    pg.send(x, dst) / pg.recv(src)          one array from one rank to another
    pg.all_reduce(x)                        every rank gets the sum (ring: reduce-scatter, then all-gather)
    pg.reduce_scatter(x) / pg.all_gather(c) the two halves of the ring on their own
    pg.broadcast(x, root), pg.barrier()

A `ProcessGroup` is a list of global ranks plus a `Transport` that moves bytes between two global ranks:
`PipeTransport` (multiprocessing pipes, one per pair of processes; the default "mp" backend) or
`MPITransport` (mpi4py, in mpi.py). The collectives are built on send/recv only, so both backends run
the same ring, and the byte counters (`pg.stats`) can be checked against the textbook formulas:

    ring all-reduce      each rank sends 2 (N-1)/N of the buffer
    reduce-scatter       (N-1)/N          all-gather     (N-1) x the chunk
    broadcast (star)     the root sends (N-1) x the buffer

Every receive has a timeout (`CommTimeout`, a TimeoutError naming the operation and the peer): a dead or
hung peer turns into an error, never a hang. A closed pipe (the peer died) is a `PeerDied` error.
Messages carry a tag (group, operation, sequence number per peer and operation) and a receive takes the
message with its tag, as MPI does: a pipeline stage can receive activations and gradients from the same
neighbour in any order. Ranks that disagree on the order of their collectives (the classic distributed
bug) never mix data: the receive times out and lists the messages that came instead.
"""
import pickle
import queue
import threading
import time

import numpy as np

DEFAULT_TIMEOUT = 60.0


class CommTimeout(TimeoutError):
    """A receive waited longer than the group's timeout (the peer is hung, dead or out of step)."""


class PeerDied(ConnectionError):
    """The connection to a peer closed: its process exited."""


# ----------------------------------------------------------------------------------------------------
# transport: bytes between two global ranks


def match_tag(transport, peer, tag, timeout, what, read_one):
    """Receive the message with `tag` from peer, as MPI matches tags: messages that arrive first with
    other tags (e.g. a pipeline stage's activations and gradients share one pipe) wait in a stash.

    Waiting in vain while other tags arrive means the two ranks run their operations in a different
    order: the timeout says so and lists what came instead.
    """
    stash = transport.stash.setdefault(peer, {})
    if tag in stash:
        return stash.pop(tag)
    deadline = time.monotonic() + timeout
    while True:
        got = read_one(peer, max(0.0, deadline - time.monotonic()), what)
        if got is None:
            other = f"; meanwhile it sent {sorted(stash)}: the ranks issue their operations in a different order" \
                if stash else " (the peer is hung, dead or running a different operation)"
            raise CommTimeout(f"rank {transport.rank}: {what}: no message {tag!r} from rank {peer} within "
                              f"{timeout:g} s" + other)
        got_tag, meta, payload = got
        if got_tag == tag:
            return payload, meta
        stash[got_tag] = (payload, meta)


class PipeTransport:
    """One duplex multiprocessing pipe per peer, and one sender thread per peer.

    Sends are asynchronous (queued, then written by the thread): in a ring every rank sends and receives
    at once, and a blocking write of more than the pipe's buffer (64 KiB on Linux) would wait for a
    reader that is itself waiting to write: a deadlock. With a sender thread the write never blocks the
    rank, so any order of sends and receives that matches up completes.
    """

    def __init__(self, rank, world_size, conns):
        self.rank, self.world_size = rank, world_size
        self.conns = conns  # peer global rank -> Connection
        self.stash = {}  # peer -> {tag: (payload, meta)}: arrived before they were asked for
        self._queues, self._errors = {}, {}
        for peer in conns:
            q = queue.Queue()
            self._queues[peer] = q
            threading.Thread(target=self._sender, args=(peer, q), daemon=True,
                             name=f"send-{rank}->{peer}").start()

    def _sender(self, peer, q):
        conn = self.conns[peer]
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                header, payload = item
                conn.send(header)
                conn.send_bytes(payload)
            except (OSError, EOFError) as e:
                self._errors[peer] = e
            finally:
                q.task_done()

    def send(self, peer, tag, payload: bytes, meta):
        if peer in self._errors:
            raise PeerDied(f"rank {self.rank}: cannot send to rank {peer}: {self._errors[peer]}")
        self._queues[peer].put(((tag, meta), payload))

    def recv(self, peer, tag, timeout, what):
        return match_tag(self, peer, tag, timeout, what, self._read_one)

    def _read_one(self, peer, timeout, what):
        """The next message from peer -> (tag, meta, payload), or None after `timeout` seconds."""
        conn = self.conns[peer]
        try:
            if not conn.poll(timeout):
                return None
            tag, meta = conn.recv()
            return tag, meta, conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise PeerDied(f"rank {self.rank}: {what}: the connection to rank {peer} closed "
                           f"(its process exited): {type(e).__name__}") from None

    def flush(self, timeout):
        """Wait until every queued message has been written (before a process exits)."""
        deadline = time.monotonic() + timeout
        for peer, q in self._queues.items():
            while q.unfinished_tasks:
                if time.monotonic() > deadline:
                    raise CommTimeout(f"rank {self.rank}: could not deliver messages to rank {peer} "
                                      f"within {timeout:g} s")
                time.sleep(0.001)

    def close(self):
        for q in self._queues.values():
            q.put(None)


# ----------------------------------------------------------------------------------------------------
# the process group


class ProcessGroup:
    """The ranks `ranks` (global ranks, in group order) as seen from this process.

    `rank` is this process's position in the group, `size` the number of ranks; `stats[op]` counts
    the payload bytes this process sent per operation, and `calls[op]` the number of operations.
    """

    def __init__(self, transport, ranks=None, timeout=DEFAULT_TIMEOUT, name="world"):
        self.transport = transport
        self.ranks = list(range(transport.world_size)) if ranks is None else list(ranks)
        if transport.rank not in self.ranks:
            raise ValueError(f"rank {transport.rank} is not a member of group {name} {self.ranks}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"group {name} lists a rank twice: {self.ranks}")
        self.rank = self.ranks.index(transport.rank)
        self.size = len(self.ranks)
        self.timeout = float(timeout)
        self.name = name
        self.stats, self.calls = {}, {}
        self._seq = {}  # per (direction, peer, op): messages sent / received, part of every tag

    def new_group(self, ranks, name):
        """A sub-group of this group's transport (e.g. the data-parallel ranks of one model shard)."""
        return ProcessGroup(self.transport, ranks, self.timeout, name)

    def reset_stats(self):
        self.stats, self.calls = {}, {}

    # --- point to point --------------------------------------------------------------------------
    def _count(self, op, nbytes):
        self.stats[op] = self.stats.get(op, 0) + nbytes

    def _tag(self, direction, peer, op):
        key = (direction, peer, op)
        n = self._seq.get(key, 0)
        self._seq[key] = n + 1
        return f"{self.name}:{op}:{n}"

    def send(self, x, dst, op="send"):
        """Send array x to group rank dst (returns at once; the bytes go out in the background)."""
        self._check_peer(dst, "send")
        x = np.ascontiguousarray(x)
        self._count(op, x.nbytes)
        self.transport.send(self.ranks[dst], self._tag("to", dst, op), x.tobytes(), (x.dtype.str, x.shape))

    def recv(self, src, op="send"):
        """Receive the next array from group rank src (waits at most `timeout` seconds)."""
        self._check_peer(src, "recv")
        payload, (dtype, shape) = self.transport.recv(self.ranks[src], self._tag("from", src, op), self.timeout,
                                                      f"{self.name} {op}")
        return np.frombuffer(payload, dtype=np.dtype(dtype)).reshape(shape).copy()

    def send_object(self, obj, dst, op="object"):
        """Any picklable object (metadata, small dicts); counted as the size of its pickle."""
        self.send(np.frombuffer(pickle.dumps(obj), dtype=np.uint8), dst, op)

    def recv_object(self, src, op="object"):
        return pickle.loads(self.recv(src, op).tobytes())

    def _check_peer(self, peer, what):
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"{what}: peer must be another rank of group {self.name} in [0, {self.size}), "
                             f"got {peer!r} (this rank is {self.rank})")

    # --- collectives -------------------------------------------------------------------------------
    def reduce_scatter(self, x, op="sum"):
        """The flattened x split into `size` chunks (np.array_split); rank r gets chunk r reduced over ranks.

        Ring: at step s every rank sends one partial chunk to the next rank and adds the one it receives
        from the previous rank. After N-1 steps rank r holds chunk r summed over all N ranks, having sent
        N-1 chunks, (N-1)/N of the buffer.
        """
        return self._reduce_scatter(np.ascontiguousarray(x).reshape(-1), op, "reduce_scatter")[self.rank]

    def _reduce_scatter(self, flat, op, name):
        if op not in _REDUCE_OPS:
            raise ValueError(f"unknown reduction {op!r}; expected one of {sorted(_REDUCE_OPS)}")
        self.calls[name] = self.calls.get(name, 0) + 1
        reduce = _REDUCE_OPS[op]
        N, r = self.size, self.rank
        chunks = [c.copy() for c in np.array_split(flat, N)]
        nxt, prv = (r + 1) % N, (r - 1) % N
        # BEGIN SOLUTION ex16a
        for s in range(N - 1):
            # send chunk r-s-1, receive chunk r-s-2: after N-1 steps the chunk completed here is chunk r
            send_idx, recv_idx = (r - s - 1) % N, (r - s - 2) % N
            self.send(chunks[send_idx], nxt, name)
            chunks[recv_idx] = reduce(chunks[recv_idx], self.recv(prv, name))
        # END SOLUTION
        return chunks

    def all_gather(self, chunk):
        """Every rank's chunk, in rank order, concatenated (1-D). Ring: N-1 steps passing chunks on."""
        chunks = [None] * self.size
        chunks[self.rank] = np.ascontiguousarray(chunk).reshape(-1)
        return np.concatenate(self._all_gather(chunks, "all_gather"))

    def _all_gather(self, chunks, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        N, r = self.size, self.rank
        nxt, prv = (r + 1) % N, (r - 1) % N
        # BEGIN SOLUTION ex16b
        for s in range(N - 1):
            # pass on the chunk received last step (first our own): chunk r-s goes out, r-s-1 comes in
            self.send(chunks[(r - s) % N], nxt, name)
            chunks[(r - s - 1) % N] = self.recv(prv, name)
        # END SOLUTION
        return chunks

    def all_reduce(self, x, op="sum"):
        """x reduced (sum or max) over all ranks, on every rank: ring reduce-scatter, then ring all-gather.

        Each rank sends 2 (N-1) chunks of size/N: 2 (N-1)/N of the buffer, whatever N is, which is
        why the ring is bandwidth-optimal. A group of one returns x itself (nothing to add).
        """
        x = np.asarray(x)
        if self.size == 1:
            return x
        chunks = self._reduce_scatter(np.ascontiguousarray(x).reshape(-1), op, "all_reduce")
        self.calls["all_reduce"] -= 1  # one all-reduce, counted once below
        chunks = self._all_gather(chunks, "all_reduce")
        return np.concatenate(chunks).reshape(x.shape)

    def broadcast(self, x, root=0):
        """root's x on every rank (the root sends it to each of the others: (N-1) x the buffer)."""
        self.calls["broadcast"] = self.calls.get("broadcast", 0) + 1
        if self.rank == root:
            for dst in range(self.size):
                if dst != root:
                    self.send(x, dst, "broadcast")
            return np.asarray(x)
        return self.recv(root, "broadcast")

    def broadcast_object(self, obj, root=0):
        if self.rank == root:
            for dst in range(self.size):
                if dst != root:
                    self.send_object(obj, dst, "broadcast_object")
            return obj
        return self.recv_object(root, "broadcast_object")

    def barrier(self):
        """Nobody leaves before everybody has arrived: an empty message twice around the ring."""
        if self.size == 1:
            return
        self.calls["barrier"] = self.calls.get("barrier", 0) + 1
        empty = np.zeros(0, np.uint8)
        nxt, prv = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        for _ in range(2):  # round 1: everyone has arrived; round 2: everyone knows it
            if self.rank == 0:
                self.send(empty, nxt, "barrier")
                self.recv(prv, "barrier")
            else:
                self.recv(prv, "barrier")
                self.send(empty, nxt, "barrier")


_REDUCE_OPS = {"sum": np.add, "max": np.maximum}


def ring_bytes(op, nbytes, n):
    """The textbook bytes one rank sends for `op` on an nbytes buffer over n ranks (n | nbytes/itemsize)."""
    return {"all_reduce": 2 * (n - 1) * nbytes // n, "reduce_scatter": (n - 1) * nbytes // n,
            "all_gather": (n - 1) * nbytes, "broadcast_root": (n - 1) * nbytes}[op]
