"""ex13b: bpe.learn_merges, the most frequent pair becomes a new token, again and again."""
from collections import Counter

import pytest

from llama3np import bpe
from llama3np.bpe import MIN_VOCAB_SIZE, OutOfPairs, learn_merges, pretokenize
from llama3np.exercises.fixtures import bpe_text
from llama3np.exercises.testing import load_fixture

FX = load_fixture("ex13b")


def _replace_pair(ids, pair, new_id):
    """The grader's own merge (ex13a is another exercise): rebuild the list, skipping matched seconds."""
    out, skip = [], False
    for here, nxt in zip(ids, list(ids[1:]) + [None]):
        if skip:
            skip = False
        elif (here, nxt) == tuple(pair):
            out.append(new_id)
            skip = True
        else:
            out.append(here)
    return out


@pytest.fixture(autouse=True)
def own_merge(monkeypatch):
    """learn_merges may call bpe.merge (ex13a): it gets the grader's own, so ex13b stands alone."""
    monkeypatch.setattr(bpe, "merge", _replace_pair)


def _reference_tokens():
    out, pos = [], 0
    data = bytes(FX["bytes"])
    for n in FX["lengths"]:
        out.append(data[pos:pos + int(n)])
        pos += int(n)
    return out


def test_first_forty_merges_match_the_reference():
    """On a generated 400-word text the 40 learned tokens, in order, equal the reference's."""
    vocab = learn_merges(Counter(pretokenize(bpe_text())), 40)
    assert [bytes([b]) for b in range(256)] == list(vocab[:256]), "the vocabulary must start with the 256 bytes"
    got, want = list(vocab[256:]), _reference_tokens()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"merge {i}: learned {g!r}, expected {w!r}"
    assert len(got) == len(want), f"{len(got)} tokens learned, expected {len(want)}"


def test_ties_go_to_the_smallest_pair_and_counts_weigh_in():
    """'ab' x3 and 'cd' x3 tie: (a, b) is merged first; 'ef' x5 beats both."""
    vocab = learn_merges({"ab": 3, "cd": 3, "ef": 5}, 3)
    assert list(vocab[256:]) == [b"ef", b"ab", b"cd"], f"learned {vocab[256:]}"


def test_running_out_of_pairs_raises_with_the_largest_size():
    """'abc' allows 2 merges; asking for 5 raises OutOfPairs with max_vocab_size = MIN_VOCAB_SIZE + 2."""
    with pytest.raises(OutOfPairs) as e:
        learn_merges({"abc": 1}, 5)
    assert e.value.max_vocab_size == MIN_VOCAB_SIZE + 2
