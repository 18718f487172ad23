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


@given(p=stages, m=micro, name=st.sampled_from(S.SCHEDULES))
def test_every_schedule_is_complete_ordered_matched_and_deadlock_free(p, m, name):
    """Each stage runs F and B once per micro-batch, each F before its B, every send meets its receive."""
    S.validate(S.make_schedule(name, p, m), m)


@given(p=stages, m=micro, name=st.sampled_from(S.SCHEDULES), t_b=st.sampled_from([1, 2, Fraction(3, 2)]))
def test_bubble_fraction_is_exactly_p_minus_1_over_m_plus_p_minus_1(p, m, name, t_b):
    """On a logical clock, idle time / total time = (p-1)/(m+p-1) for GPipe and 1F1B, whatever tb/tf is."""
    events = S.simulate(S.make_schedule(name, p, m), t_f=1, t_b=t_b)
    assert S.bubble_fraction(events) == S.theoretical_bubble(p, m)


@given(p=stages, m=micro)
def test_gpipe_holds_all_m_micro_batches_and_1f1b_at_most_p_minus_stage(p, m):
    assert S.peak_activations(S.gpipe(p, m)) == [m] * p
    assert S.peak_activations(S.one_f_one_b(p, m)) == [min(p - s, m) for s in range(p)]


def test_1f1b_on_four_stages_reads_like_the_textbook_picture():
    text = S.format_schedule(S.one_f_one_b(4, 6))
    assert text.splitlines()[0] == "stage 0: F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert text.splitlines()[3] == "stage 3: F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"


def test_broken_schedules_are_rejected_with_the_reason():
    good = S.gpipe(2, 2)
    swapped = [good[0], [S.Action("B", 0)] + [a for a in good[1] if a.kind != "B"] + [S.Action("B", 1)]]
    with pytest.raises(ValueError, match="backward of micro-batch 0 before its forward"):
        S.validate(swapped, 2)
    lost = [good[0], [a for a in good[1] if not (a.kind == "send_bwd" and a.mb == 1)]]
    with pytest.raises(ValueError, match="does not match"):
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


def test_trace_exports_chrome_json_and_a_gantt_png(tmp_path):
    trace = Trace.from_simulation(S.simulate(S.one_f_one_b(3, 4)))
    doc = trace.to_json(tmp_path / "trace.json")
    assert json.loads((tmp_path / "trace.json").read_text()) == doc
    assert len(doc["traceEvents"]) == 3 * 4 * 2 and {e["tid"] for e in doc["traceEvents"]} == {0, 1, 2}
    png = trace.gantt(tmp_path / "gantt.png", unit="ticks")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
