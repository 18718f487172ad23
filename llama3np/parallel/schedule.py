"""Pipeline schedules as data: for every stage, the list of actions it runs, in order.

    F j         forward of micro-batch j through this stage's layers (keeps its activations)
    B j         backward of micro-batch j (frees them)
    W j         (zero-bubble only) the weight gradients of j, postponed from its B
    send_fwd j  activations of j to the next stage      recv_fwd j  from the previous stage
    send_bwd j  gradient of j to the previous stage     recv_bwd j  from the next stage

Every action also names a model chunk (0 unless the schedule is interleaved).

The same lists drive the executor (pipeline_parallel.run_schedule), the Gantt chart and the checks
here, so what is tested is what runs (ShallowSpeed's idea). Sends never block (the transport queues
them), so a schedule is deadlock-free exactly when `simulate` can run it to the end.

GPipe: all forwards, then all backwards. Every stage holds all m micro-batches' activations at once.
1F1B (PipeDream-Flush, Megatron's default): stage s runs p-s-1 warm-up forwards, then alternates one
forward and one backward, then drains the backwards. Same bubble as GPipe, but stage s never holds
more than min(p-s, m) micro-batches: memory no longer grows with m.
Interleaved 1F1B (v model chunks per rank) and zero-bubble (the backward split into B and W) shrink
the bubble further; see their functions.

With forward time tf and backward tb, both schedules take (m + p - 1)(tf + tb) where the ideal is
m (tf + tb): the bubble fraction is (p - 1) / (m + p - 1), measured exactly below with a logical clock.
"""
from collections import namedtuple
from fractions import Fraction

Action = namedtuple("Action", "kind mb chunk", defaults=(0,))
KINDS = ("F", "B", "W", "send_fwd", "recv_fwd", "send_bwd", "recv_bwd")
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")


def _forward(s, p, j, c=0, v=1):
    """F of micro-batch j on rank s, model chunk c: virtual stage c*p + s of the p*v stages."""
    vs, last = c * p + s, p * v - 1
    return ([Action("recv_fwd", j, c)] if vs > 0 else []) + [Action("F", j, c)] + \
        ([Action("send_fwd", j, c)] if vs < last else [])


def _backward(s, p, j, c=0, v=1):
    vs, last = c * p + s, p * v - 1
    return ([Action("recv_bwd", j, c)] if vs < last else []) + [Action("B", j, c)] + \
        ([Action("send_bwd", j, c)] if vs > 0 else [])


def gpipe(p, m):
    """All-forward-all-backward: [[actions of stage 0], ..., [actions of stage p-1]]."""
    _check(p, m)
    return [sum((_forward(s, p, j) for j in range(m)), []) + sum((_backward(s, p, j) for j in range(m)), [])
            for s in range(p)]


def one_f_one_b(p, m):
    """One-forward-one-backward with p-s-1 warm-up forwards on stage s."""
    _check(p, m)
    # BEGIN SOLUTION ex17
    stages = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        acts = sum((_forward(s, p, j) for j in range(warmup)), [])
        for i in range(m - warmup):  # steady state: forward of warmup+i, then backward of i
            acts += _forward(s, p, warmup + i) + _backward(s, p, i)
        for i in range(m - warmup, m):  # cool-down: the backwards still owed
            acts += _backward(s, p, i)
        stages.append(acts)
    return stages
    # END SOLUTION


def interleaved(p, m, v=2):
    """Interleaved 1F1B (Megatron-LM's virtual pipeline, Narayanan et al. 2021): every rank holds v model
    chunks, virtual stage c*p + s being chunk c of rank s, so a micro-batch visits each rank v times.

    Units of work go in groups of p micro-batches per chunk: forward unit k runs chunk (k mod pv) // p
    on micro-batch (k // pv) p + k mod p, the backward units the chunks in reverse. Rank s warms up with
    2(p-s-1) + (v-1)p forwards (all of them when m = p), then alternates. The bubble shrinks v times:
    (p-1) / (v m + p - 1). Needs m divisible by p (Megatron's rule).
    """
    _check(p, m)
    if not isinstance(v, int) or v < 2:
        raise ValueError(f"the interleaved schedule needs at least 2 model chunks per rank, got {v!r}")
    if m % p:
        raise ValueError(f"the interleaved schedule needs the micro-batches ({m}) divisible by the stages ({p})")
    total = m * v

    def unit(k, backward):
        c = (k % (p * v)) // p
        return (k // (p * v)) * p + k % p, (v - 1 - c if backward else c)

    stages = []
    for s in range(p):
        warmup = total if m == p else min((p - s - 1) * 2 + (v - 1) * p, total)
        acts = sum((_forward(s, p, *unit(k, False), v) for k in range(warmup)), [])
        for i in range(total - warmup):
            acts += _forward(s, p, *unit(warmup + i, False), v) + _backward(s, p, *unit(i, True), v)
        for i in range(total - warmup, total):
            acts += _backward(s, p, *unit(i, True), v)
        stages.append(acts)
    return stages


def zero_bubble(p, m):
    """A zero-bubble schedule (after Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): the backward is
    split in two,

        B j   the gradient with respect to the stage's input (what the previous stage waits for)
        W j   the gradients of the weights (which nobody waits for)

    so the W's can be postponed into the slots where 1F1B idles. Built greedily on a logical clock with
    unit-time F, B and W: an idle stage runs a B if a gradient has arrived; else a forward, if fewer
    than p - s micro-batches are between their F and B (1F1B's rule) and fewer than 2p - s - 1 between
    their F and W (W still reads the layer inputs: the memory bound); else its oldest postponed W.
    For m >= p the bubble is (p-1)/(3m+p-1), a third of 1F1B's (p-1)/(m+p-1) when B and W each take
    the time of F; the price is holding up to 2p - s - 1 micro-batches' layer inputs instead of p - s.
    """
    _check(p, m)
    INF = float("inf")
    f_end, b_end = {}, {}  # (stage, mb) -> tick its F / B finished
    nf, to_b, to_w, busy = [0] * p, [0] * p, [0] * p, [0] * p  # next F; counts F..B and F..W; busy until
    done_b, waiting_w = [set() for _ in range(p)], [[] for _ in range(p)]
    order = [[] for _ in range(p)]
    t = 0
    while any(len(o) < 3 * m for o in order):
        for s in range(p):
            if busy[s] > t:
                continue
            grad_at = (lambda j: f_end.get((s, j), INF)) if s == p - 1 else (lambda j: b_end.get((s + 1, j), INF))
            ready_b = [j for j in range(nf[s]) if j not in done_b[s] and grad_at(j) <= t]
            input_ok = nf[s] < m and (s == 0 or f_end.get((s - 1, nf[s]), INF) <= t)
            if ready_b:
                j = min(ready_b)
                done_b[s].add(j)
                to_b[s] -= 1
                b_end[s, j] = t + 1
                waiting_w[s].append(j)
                order[s].append(("B", j))
            elif input_ok and to_b[s] < p - s and to_w[s] < 2 * p - s - 1:
                j = nf[s]
                nf[s] += 1
                to_b[s] += 1
                to_w[s] += 1
                f_end[s, j] = t + 1
                order[s].append(("F", j))
            elif waiting_w[s]:
                order[s].append(("W", waiting_w[s].pop(0)))
                to_w[s] -= 1
            else:
                continue
            busy[s] = t + 1
        t += 1
    stages = []
    for s in range(p):
        acts = []
        for kind, j in order[s]:
            acts += _forward(s, p, j) if kind == "F" else _backward(s, p, j) if kind == "B" else [Action("W", j)]
        stages.append(acts)
    return stages


def make_schedule(name, p, m, v=2):
    """The action lists of schedule `name` for p stages (ranks) and m micro-batches; v: chunks per rank
    (interleaved only)."""
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved(p, m, v)
    if name == "zb":
        return zero_bubble(p, m)
    raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {SCHEDULES}")


def n_chunks(stages):
    return 1 + max(a.chunk for acts in stages for a in acts)


def _check(p, m):
    for name, v in (("stages", p), ("micro-batches", m)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"the number of {name} must be a positive integer, got {v!r}")


# ----------------------------------------------------------------------------------------------------
# checks that do not need an executor


def validate(stages, m):
    """Raise ValueError unless every rank runs F and B once per micro-batch and chunk, each F before its
    B, every send has its matching receive on the neighbour, and the whole schedule runs to the end."""
    p, v = len(stages), n_chunks(stages)
    sent, received = [], []
    for s, acts in enumerate(stages):
        for c in range(v):
            for kind in ("F", "B"):
                mbs = sorted(a.mb for a in acts if a.kind == kind and a.chunk == c)
                if mbs != list(range(m)):
                    what = f"stage {s}" + (f" chunk {c}" if v > 1 else "")
                    raise ValueError(f"{what} runs {kind} for micro-batches {mbs}, expected each of 0..{m - 1} once")
        pos = {(a.kind, a.mb, a.chunk): i for i, a in enumerate(acts)}
        ws = sorted(a.mb for a in acts if a.kind == "W")
        if ws and ws != list(range(m)):
            raise ValueError(f"stage {s} runs W for micro-batches {ws}, expected each of 0..{m - 1} once")
        for c in range(v):
            for j in range(m):
                if pos["F", j, c] > pos["B", j, c]:
                    raise ValueError(f"stage {s} runs the backward of micro-batch {j} before its forward")
                if ws and pos["B", j, c] > pos["W", j, c]:
                    raise ValueError(f"stage {s} runs the weight gradient of micro-batch {j} before its backward")
        for a in acts:
            vs = a.chunk * p + s
            if a.kind == "send_fwd":
                sent.append(("fwd", vs + 1, a.mb))
            elif a.kind == "send_bwd":
                sent.append(("bwd", vs - 1, a.mb))
            elif a.kind == "recv_fwd":
                received.append(("fwd", vs, a.mb))
            elif a.kind == "recv_bwd":
                received.append(("bwd", vs, a.mb))
    if sorted(sent) != sorted(received):
        extra = sorted(set(sent) ^ set(received))[:4]
        raise ValueError(f"sends and receives do not match: e.g. {extra} (direction, virtual stage, micro-batch)")
    simulate(stages)  # raises if something waits for a message that never comes


def simulate(stages, t_f=1, t_b=1, t_comm=0, t_w=1):
    """Run the schedule on a logical clock -> per rank a list of (kind, mb, start, end) for F, B (and W).

    F takes t_f, B takes t_b (per chunk; with a zero-bubble schedule B is the input gradient only and
    W, the weight gradient, takes t_w), a message arrives t_comm after it is sent; a receive waits for
    its message. Exact (use ints or Fractions). Raises ValueError on a deadlock (nothing can proceed).
    """
    p = len(stages)
    clock, pc = [0] * p, [0] * p
    mailbox = {}  # (direction, virtual stage it is for, mb) -> arrival time
    events = [[] for _ in range(p)]
    while True:
        progressed = False
        for s in range(p):
            while pc[s] < len(stages[s]):
                a = stages[s][pc[s]]
                vs = a.chunk * p + s
                if a.kind in ("F", "B", "W"):
                    t = clock[s] + {"F": t_f, "B": t_b, "W": t_w}[a.kind]
                    events[s].append((a.kind, a.mb, clock[s], t))
                    clock[s] = t
                elif a.kind == "send_fwd":
                    mailbox["fwd", vs + 1, a.mb] = clock[s] + t_comm
                elif a.kind == "send_bwd":
                    mailbox["bwd", vs - 1, a.mb] = clock[s] + t_comm
                else:
                    key = (a.kind[5:], vs, a.mb)
                    if key not in mailbox:
                        break  # wait for the neighbour
                    clock[s] = max(clock[s], mailbox.pop(key))
                pc[s] += 1
                progressed = True
        if all(pc[s] == len(stages[s]) for s in range(p)):
            if mailbox:
                raise ValueError(f"messages left in flight at the end: {sorted(mailbox)}")
            return events
        if not progressed:
            stuck = {s: stages[s][pc[s]] for s in range(p) if pc[s] < len(stages[s])}
            raise ValueError(f"the schedule deadlocks: stages wait at {stuck}")


def bubble_fraction(events):
    """Idle share of the pipeline's run time, averaged over stages: 1 - busy / (p * makespan)."""
    makespan = max(e[3] for ev in events for e in ev)
    busy = sum(e[3] - e[2] for ev in events for e in ev)
    return 1 - Fraction(busy) / (len(events) * Fraction(makespan))


def theoretical_bubble(p, m, v=1, zero_bubble=False):
    """(p-1)/(m+p-1); with v chunks per rank (interleaved) the warm-up and cool-down shrink v times;
    zero-bubble with F, B, W of equal time and m >= p: (p-1)/(3m+p-1)."""
    if zero_bubble:
        if m < p:
            raise ValueError(f"the zero-bubble formula holds for m >= p micro-batches, got m={m}, p={p}")
        return Fraction(p - 1, 3 * m + p - 1)
    return Fraction(p - 1, v * m + p - 1)


def peak_activations(stages):
    """Per stage, the largest number of micro-batches whose activations are held at once (F +1, B -1;
    with a zero-bubble schedule W -1, since the weight gradients still read the layer inputs)."""
    peaks = []
    for acts in stages:
        live = peak = 0
        release = "W" if any(a.kind == "W" for a in acts) else "B"  # W still needs the layer inputs
        for a in acts:
            live += {"F": 1, release: -1}.get(a.kind, 0)
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def format_schedule(stages):
    """A compact text view: one line per stage, e.g. `stage 1: F0 F1 B0 F2 B1 B2` (interleaved: F0.1 is
    micro-batch 0 on chunk 1)."""
    v = n_chunks(stages)
    return "\n".join(f"stage {s}: " + " ".join(f"{a.kind}{a.mb}" + (f".{a.chunk}" if v > 1 else "")
                                               for a in acts if a.kind in ("F", "B", "W"))
                     for s, acts in enumerate(stages))
