"""The built-in story corpus and its entropy, reading corpora, packing and the resumable loader."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import data
from llama3np.data import stories


# ---- the story grammar -------------------------------------------------------------------------------
def test_stories_are_deterministic_by_seed_and_differ_between_seeds():
    a, la = stories.corpus(50, seed=3)
    b, lb = stories.corpus(50, seed=3)
    c, _ = stories.corpus(50, seed=4)
    assert a == b and la == lb
    assert a != c
    assert len(set(a)) > 45  # a big grammar: almost no two stories of 50 are the same


def test_every_story_has_exactly_one_derivation_with_the_reported_probability():
    """The entropy is sum(-log p(story)) only if each text has ONE derivation: replay-parse 100 stories."""
    texts, logps = stories.corpus(100, seed=11)
    for text, logp in zip(texts, logps):
        found = stories.derivations(text)
        assert len(found) == 1, f"{len(found)} derivations of {text!r}"
        assert found[0][1] == pytest.approx(logp, abs=1e-12)
        # no story is the start of another (so where a story ends carries no extra information)
        assert text.endswith(" The end.") and text.count("The end.") == 1


def test_the_derivation_checker_finds_ambiguity_when_there_is_some():
    """A grammar that writes "ab" in two ways ("a"+"b" or "ab"+"") is caught: the check can fail."""

    def ambiguous(c):
        c.say(c.pick(["a", "ab"]))
        c.say(c.pick(["b", ""]))

    found = stories.derivations("ab", grammar=ambiguous)
    assert len(found) == 2
    assert all(lp == pytest.approx(math.log(0.25)) for _, lp in found)
    assert stories.derivations("abc", grammar=ambiguous) == []


def test_a_modified_story_has_no_derivation():
    text, _ = stories.sample_story(5)
    assert stories.derivations(text.replace("Once upon", "Twice upon")) == []
    assert stories.derivations(text + " And more.") == []


def test_story_log_probabilities_are_sums_of_decision_log_probabilities():
    """Every decision is uniform here, so p(story) is a product of 1/n factors: log p < 0 and finite."""
    _, logps = stories.corpus(200, seed=1)
    assert all(-60 < lp < -5 for lp in logps)
    mean, se = stories.entropy_per_story(500, seed=2)
    assert se < 0.5 and mean == pytest.approx(-np.mean(logps), abs=6 * se + 0.5)


def test_entropy_per_token_counts_eos_and_bos_as_predicted_tokens():
    """Two stories of 3 and 5 tokens: stream BOS s1 EOS BOS s2 EOS has 12 tokens, 11 of them predicted."""
    assert stories.entropy_per_token([-2.0, -3.5], [3, 5]) == pytest.approx(5.5 / 11)


# ---- documents -------------------------------------------------------------------------------------
def test_read_documents_from_a_folder_a_file_and_separators(tmp_path):
    (tmp_path / "b.txt").write_text("second doc\n")
    (tmp_path / "a.md").write_text("first doc")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("one\n<|end_of_text|>\ntwo\n")
    assert data.read_documents(tmp_path) == ["first doc", "second doc", "one", "two"]
    assert data.read_documents(tmp_path / "b.txt") == ["second doc"]


def test_read_documents_explains_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.read_documents(tmp_path / "nope")
    with pytest.raises(ValueError, match="no text files"):
        data.read_documents(tmp_path)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ValueError, match="holds no text"):
        data.read_documents(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="UTF-8"):
        data.read_documents(tmp_path / "bad.txt")


def test_train_val_split_is_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(40)]
    train, val = data.train_val_split(docs, 0.1)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert len(val) == 4
    one_train, one_val = data.train_val_split(["line\n" * 100], 0.1)
    assert one_train[0] + one_val[0] == "line\n" * 100 and one_val[0]


# ---- packing ---------------------------------------------------------------------------------------
class CharTokenizer:
    """A stand-in tokenizer: one id per character, BOS 1000, EOS 1001."""
    bos_id, eos_id = 1000, 1001

    def encode(self, s, bos, eos):
        return [ord(ch) for ch in s]


def test_packing_puts_bos_and_eos_around_every_document():
    stream, lengths = data.tokenize_documents(CharTokenizer(), ["ab", "c"])
    assert stream.tolist() == [1000, 97, 98, 1001, 1000, 99, 1001]
    assert lengths.tolist() == [2, 1]


@given(n=st.integers(2, 200), T=st.integers(1, 20))
def test_rows_make_every_token_but_the_first_a_target_exactly_once(n, T):
    """Rows of T+1 tokens overlapping by one: their targets tile stream[1 : rows*T + 1] without gaps."""
    stream = np.arange(n, dtype=np.int32)
    rows = data.n_rows(n, T)
    if rows == 0:
        assert n - 1 < T
        return
    r = data.get_rows(stream, T, np.arange(rows))
    targets = r[:, 1:].ravel()
    assert targets.tolist() == list(range(1, rows * T + 1))
    assert n - (rows * T + 1) < T  # fewer than one row left over
    assert np.array_equal(r[:, :-1], r[:, 1:] - 1)  # x is y shifted by one


# ---- the loader ------------------------------------------------------------------------------------
def _loader(seed=0):
    return data.DataLoader(np.arange(1000, dtype=np.int32), seq_len=8, batch_size=4, seed=seed)


def test_loader_is_deterministic_and_depends_on_the_seed():
    a, b, c = _loader(), _loader(), _loader(seed=1)
    xa = [a.next_batch()[0] for _ in range(5)]
    assert all(np.array_equal(x, b.next_batch()[0]) for x in xa)
    assert not np.array_equal(xa[0], c.next_batch()[0])


def test_loader_visits_every_row_once_per_epoch_then_reshuffles():
    ld = _loader()
    n_batches = ld.n_rows // ld.batch_size  # 124 rows -> 31 batches
    firsts = [ld.next_batch()[0][:, 0] // 8 for _ in range(n_batches)]
    seen = np.concatenate(firsts)
    assert sorted(seen.tolist()) == list(range(ld.n_rows))
    next_epoch = ld.next_batch()[0][:, 0] // 8
    assert ld.epoch == 1 and not np.array_equal(next_epoch, firsts[0])


@settings(max_examples=10)
@given(k=st.integers(0, 70))
def test_loader_resumed_from_its_state_reads_the_same_batches(k):
    """Save the position after k batches (across epoch ends too), load it into a fresh loader: same next batches."""
    a = _loader()
    for _ in range(k):
        a.next_batch()
    b = _loader()
    b.load_state_dict(a.state_dict())
    for _ in range(40):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_loader_explains_too_little_data():
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.DataLoader(np.arange(20), seq_len=8, batch_size=4)
    with pytest.raises(ValueError, match="seed"):
        _loader().load_state_dict({"epoch": 0, "pos": 0, "seed": 5})


def test_eval_batches_cover_the_rows_in_order():
    stream = np.arange(50, dtype=np.int32)
    ys = np.concatenate([y.ravel() for _, y in data.eval_batches(stream, 6, 3)])
    assert ys.tolist() == list(range(1, 49))
