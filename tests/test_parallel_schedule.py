"""Pipeline schedules as data: checked without running a model.

The bubble fraction is measured on a logical clock (exact fractions, no machine noise) and must equal
(p-1)/(m+p-1); the peak number of micro-batches whose activations a stage holds must be m for GPipe and
min(p - stage, m) for 1F1B.
"""
import json
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama3np.parallel import schedule as S
from llama3np.parallel.trace import Trace

stages = st.integers(1, 6)
micro = st.integers(1, 12)
plain = st.sampled_from(["gpipe", "1f1b"])


@st.composite
def interleaved_shapes(draw):
    """(p, m, v) with m a multiple of p, as Megatron's interleaved schedule requires."""
    p = draw(st.integers(1, 5))
    return p, p * draw(st.integers(1, 4)), draw(st.integers(2, 4))


@given(p=stages, m=micro, name=plain)
def test_every_schedule_is_complete_ordered_matched_and_deadlock_free(p, m, name):
    """Each stage runs F and B once per micro-batch, each F before its B, every send meets its receive."""
    S.validate(S.make_schedule(name, p, m), m)


@given(shape=interleaved_shapes())
def test_interleaved_schedules_are_complete_ordered_matched_and_deadlock_free(shape):
    p, m, v = shape
    S.validate(S.interleaved(p, m, v), m)


@given(p=stages, m=micro, name=plain, t_b=st.sampled_from([1, 2, Fraction(3, 2)]))
def test_bubble_fraction_is_exactly_p_minus_1_over_m_plus_p_minus_1(p, m, name, t_b):
    """On a logical clock, idle time / total time = (p-1)/(m+p-1) for GPipe and 1F1B, whatever tb/tf is."""
    events = S.simulate(S.make_schedule(name, p, m), t_f=1, t_b=t_b)
    assert S.bubble_fraction(events) == S.theoretical_bubble(p, m)


@given(shape=interleaved_shapes(), t_b=st.sampled_from([1, 2]))
def test_interleaving_v_chunks_shrinks_the_bubble_to_p_minus_1_over_vm_plus_p_minus_1(shape, t_b):
    """Each chunk is 1/v of a rank's layers: with unit time per chunk the bubble is (p-1)/(vm+p-1)."""
    p, m, v = shape
    events = S.simulate(S.interleaved(p, m, v), t_f=1, t_b=t_b)
    assert S.bubble_fraction(events) == S.theoretical_bubble(p, m, v)


@given(shape=interleaved_shapes())
def test_interleaving_holds_more_chunk_activations_than_1f1b(shape):
    """The price of the smaller bubble: rank s holds 2(p-s-1) + (v-1)p + 1 chunk-micro-batches (all v m
    when m = p), each 1/v of the rank's layers, against min(p - s, m) whole micro-batches with 1F1B."""
    p, m, v = shape
    expect = [m * v if m == p else min(2 * (p - s - 1) + (v - 1) * p + 1, m * v) for s in range(p)]
    assert S.peak_activations(S.interleaved(p, m, v)) == expect


@given(p=stages, m=micro)
def test_zero_bubble_schedules_are_valid_and_hold_at_most_2p_minus_s_minus_1(p, m):
    """Each micro-batch gets F, B and W once, W after B; a stage holds at most 2p-s-1 micro-batches'
    layer inputs between F and W."""
    stages = S.zero_bubble(p, m)
    S.validate(stages, m)
    assert S.peak_activations(stages) == [min(2 * p - s - 1, m) for s in range(p)]


@given(p=stages, m=micro)
def test_zero_bubble_cuts_the_bubble_to_p_minus_1_over_3m_plus_p_minus_1(p, m):
    """With F, B, W of equal time (1F1B's backward = B + W), the postponed W's fill the cool-down."""
    zb = S.bubble_fraction(S.simulate(S.zero_bubble(p, m), t_f=1, t_b=1, t_w=1))
    one_f_one_b = S.bubble_fraction(S.simulate(S.one_f_one_b(p, m), t_f=1, t_b=2))
    assert zb < one_f_one_b or p == 1
    if m >= p:
        assert zb == S.theoretical_bubble(p, m, zero_bubble=True)


@given(p=stages, m=micro)
def test_gpipe_holds_all_m_micro_batches_and_1f1b_at_most_p_minus_stage(p, m):
    assert S.peak_activations(S.gpipe(p, m)) == [m] * p
    assert S.peak_activations(S.one_f_one_b(p, m)) == [min(p - s, m) for s in range(p)]


def test_1f1b_on_four_stages_reads_like_the_textbook_picture():
    text = S.format_schedule(S.one_f_one_b(4, 6))
    assert text.splitlines()[0] == "stage 0: F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert text.splitlines()[3] == "stage 3: F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    # interleaved, 2 chunks: groups of p=2 micro-batches per chunk, backwards in reverse chunk order
    text = S.format_schedule(S.interleaved(2, 4, 2))
    assert text.splitlines()[0] == "stage 0: F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0"


def test_broken_schedules_are_rejected_with_the_reason():
    good = S.gpipe(2, 2)
    swapped = [good[0], [S.Action("B", 0)] + [a for a in good[1] if a.kind != "B"] + [S.Action("B", 1)]]
    with pytest.raises(ValueError, match="backward of micro-batch 0 before its forward"):
        S.validate(swapped, 2)
    lost = [good[0], [a for a in good[1] if not (a.kind == "send_bwd" and a.mb == 1)]]
    with pytest.raises(ValueError, match="do not match"):
        S.validate(lost, 2)
    # both stages wait for the other first: a deadlock the simulation must report, not loop on
    dead = [[S.Action("recv_bwd", 0), S.Action("F", 0), S.Action("send_fwd", 0), S.Action("B", 0)],
            [S.Action("recv_fwd", 0), S.Action("F", 0), S.Action("B", 0), S.Action("send_bwd", 0)]]
    with pytest.raises(ValueError, match="deadlock"):
        S.simulate(dead)
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        S.make_schedule("zigzag", 2, 2)
    with pytest.raises(ValueError, match="micro-batches must be a positive integer"):
        S.gpipe(2, 0)
    with pytest.raises(ValueError, match="divisible by the stages"):
        S.interleaved(2, 3, 2)
    with pytest.raises(ValueError, match="at least 2 model chunks"):
        S.interleaved(2, 2, 1)


def test_trace_exports_chrome_json_and_a_gantt_png(tmp_path):
    trace = Trace.from_simulation(S.simulate(S.one_f_one_b(3, 4)))
    doc = trace.to_json(tmp_path / "trace.json")
    assert json.loads((tmp_path / "trace.json").read_text()) == doc
    assert len(doc["traceEvents"]) == 3 * 4 * 2 and {e["tid"] for e in doc["traceEvents"]} == {0, 1, 2}
    png = trace.gantt(tmp_path / "gantt.png", unit="ticks")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
