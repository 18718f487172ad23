"""ex13a: bpe.merge, the encoding step: replace every occurrence of a pair, left to right."""
from hypothesis import given
from hypothesis import strategies as st

from llama3np.bpe import merge
from llama3np.exercises.testing import load_fixture

FX = load_fixture("ex13a")


def test_matches_the_reference_on_random_sequences():
    """Six random id sequences over 4 symbols give the reference's merged sequences."""
    for i in range(6):
        ids, pair = [int(v) for v in FX[f"case{i}.ids"]], tuple(int(v) for v in FX[f"case{i}.pair"])
        got = merge(list(ids), pair, 99)
        assert list(got) == [int(v) for v in FX[f"case{i}.out"]], f"merge({ids}, {pair}, 99) gave {got}"


def test_overlapping_occurrences_merge_from_the_left():
    """[a, a, a] with pair (a, a) becomes [aa, a]; the input list is not modified."""
    ids = [5, 5, 5]
    assert merge(ids, (5, 5), 7) == [7, 5]
    assert ids == [5, 5, 5], "merge modified its input list"


@given(st.lists(st.integers(0, 3), max_size=30), st.tuples(st.integers(0, 3), st.integers(0, 3)))
def test_unmerging_gives_back_the_input(ids, pair):
    """Expanding the new id back into the pair restores the input, and no pair is left unmerged."""
    out = merge(list(ids), pair, 9)
    restored = [x for t in out for x in (pair if t == 9 else (t,))]
    assert restored == ids, f"expanding {out} gives {restored}, not {ids}"
    if pair[0] != pair[1]:
        assert all((a, b) != pair for a, b in zip(out, out[1:])), f"{out} still holds {pair}"
