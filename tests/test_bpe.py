"""The BPE trainer: exact vocabulary layout, merge order, determinism, and a tokenizer that round-trips."""
from collections import Counter

import pytest
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np.bpe import MIN_VOCAB_SIZE, learn_merges, merge, pretokenize, train
from llama3np.tokenizer import ChatFormat, Tokenizer

TEXT = """\
The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean
cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd.
Their wool is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after
a few repetitions. When using a pack, they can carry about 25 to 30% of their body weight for 8 to
13 km (5-8 miles). The name llama (in the past also spelled "lama" or "glama") was adopted by
European settlers from native Peruvians. Les lamas sont des animaux sociaux; ラマは社会的な動物です。
def count_llamas(herd):\n    return sum(1 for animal in herd if animal == "llama")  # 42 llamas!\n
""" * 3


@pytest.fixture(scope="module")
def small():
    return train(TEXT, 700)


def naive_merges(chunks, n_merges):
    """The textbook algorithm, for reference: recount every pair from scratch before each merge.

    Same rules as learn_merges: highest count first, ties to the smallest (left, right) ids, a token
    whose bytes already exist reuses that id. Returns (vocab, merges actually learned)."""
    counts = Counter(chunks)
    words = {chunk: list(chunk.encode()) for chunk in counts}
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) - 256 < n_merges:
        pairs = Counter()
        for chunk, ids in words.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += counts[chunk]
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        token = vocab[pair[0]] + vocab[pair[1]]
        if token not in vocab:
            vocab.append(token)
        new_id = vocab.index(token)
        words = {chunk: merge(ids, pair, new_id) for chunk, ids in words.items()}
    return vocab


def test_vocab_size_is_exact_with_specials_at_the_end(small):
    """train(text, 700) has exactly 700 ids: 256 bytes, 188 merges (ranks 0..443), specials 444..699."""
    assert small.n_words == 700
    assert sorted(small.mergeable_ranks.values()) == list(range(444))
    assert sorted(small.special_tokens.values()) == list(range(444, 700))
    assert small.bos_id == 444 and small.eos_id == 445 and small.pad_id == 448 and small.eot_id == 453
    assert all(small.mergeable_ranks[bytes([b])] == b for b in range(256))


def test_merges_are_learned_most_frequent_first_on_a_hand_example():
    """'ab' x5, 'cd' x3, 'abcd' x2: (a,b) occurs 7 times, (c,d) 5, then (ab,cd) 2 -> ab, cd, abcd."""
    text = "\n".join(["ab"] * 5 + ["cd"] * 3 + ["abcd"] * 2)
    tok = train(text, MIN_VOCAB_SIZE + 3)
    learned = sorted((rank, token) for token, rank in tok.mergeable_ranks.items() if rank >= 256)
    assert learned == [(256, b"ab"), (257, b"cd"), (258, b"abcd")]
    assert tok.encode("abcd ab", bos=False, eos=False) == [258, ord(" "), 256]  # " ab" is its own chunk


def test_ties_go_to_the_pair_with_the_smallest_ids():
    """'cd' and 'ab' each occur once: (a, b) = (97, 98) sorts before (99, 100), so 'ab' is learned first."""
    tok = train("cd\nab", MIN_VOCAB_SIZE + 2)
    assert tok.mergeable_ranks[b"ab"] == 256 and tok.mergeable_ranks[b"cd"] == 257


def test_training_is_deterministic():
    """The same text and size give byte-identical .model files."""
    assert train(TEXT, 600).to_bytes() == train(TEXT, 600).to_bytes()


def test_merges_never_cross_pretokenizer_chunks():
    """Merges stay inside pre-tokenizer chunks: ' llama' is learned, nothing spanning 'the' and ' llama' is."""
    tok = train("the llama " * 50, MIN_VOCAB_SIZE + 7)
    tokens = [t for t, rank in sorted(tok.mergeable_ranks.items(), key=lambda item: item[1]) if rank >= 256]
    assert tokens == [b" l", b"am", b"he", b"lam", b"the", b" llam", b" llama"]
    assert all(len(pretokenize(t.decode())) == 1 for t in tokens)


@given(st.text(alphabet="ab \n.é", max_size=40), st.integers(1, 12))
@settings(max_examples=40)
def test_incremental_training_equals_recounting_from_scratch(text, n_merges):
    """The fast trainer (incremental counts, heap) learns exactly the textbook algorithm's merges."""
    reference = naive_merges(pretokenize(text), n_merges)
    learned = len(reference) - 256
    if learned < n_merges:  # the text ran out of pairs: the trainer says so instead of padding
        with pytest.raises(ValueError, match="ran out of pairs"):
            learn_merges(Counter(pretokenize(text)), n_merges)
    assert learn_merges(Counter(pretokenize(text)), learned) == reference


@given(st.text(max_size=200))
def test_trained_tokenizer_round_trips_any_text(small, text):
    """decode(encode(s)) == s for any text, including characters never seen in training (byte fallback)."""
    assert small.decode(small.encode(text, bos=False, eos=False)) == text


@given(st.text(max_size=200))
def test_pretokenize_splits_like_tiktoken(text):
    """Our chunks are tiktoken's: joined they give the text, and encoding chunk by chunk gives the same ids."""
    tok = Tokenizer.get_instance()  # Meta's vocabulary: the chunking is the same for any vocabulary
    chunks = pretokenize(text)
    assert "".join(chunks) == text
    assert [i for c in chunks for i in tok.model.encode_ordinary(c)] == tok.model.encode_ordinary(text)


def test_merges_compress_the_training_text(small):
    """188 merges learned on the text make it at least 1.5x shorter than raw bytes."""
    n_bytes = len(TEXT.encode())
    assert len(small.encode(TEXT, bos=False, eos=False)) < n_bytes / 1.5


def test_save_and_load_round_trip_through_our_loader_and_tiktokens(small, tmp_path):
    """The saved .model reloads to the same ranks, with Tokenizer(path) and with tiktoken's own loader."""
    path = tmp_path / "tiny.model"
    small.save(path)
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == small.mergeable_ranks
    again = Tokenizer(path)
    assert again.mergeable_ranks == small.mergeable_ranks and again.n_words == small.n_words
    assert again.encode(TEXT, bos=True, eos=True) == small.encode(TEXT, bos=True, eos=True)


def test_chat_format_works_with_a_trained_tokenizer(small):
    """The specials carry Meta's names, so ChatFormat works unchanged on a small vocabulary."""
    ids = ChatFormat(small).encode_dialog_prompt([{"role": "user", "content": "Hello llama"}])
    assert ids[0] == small.bos_id and ids[1] == small.special_tokens["<|start_header_id|>"]
    assert small.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_bad_arguments_raise_clear_errors():
    """Too-small vocab sizes, non-int sizes, non-str text and too little text are rejected with reasons."""
    with pytest.raises(ValueError, match="at least 512"):
        train(TEXT, 511)
    with pytest.raises(TypeError, match="int"):
        train(TEXT, 600.0)
    with pytest.raises(TypeError, match="str"):
        train(TEXT.encode(), 600)
    with pytest.raises(ValueError, match="ran out of pairs to merge after 3 merges"):
        train("\n".join(["ab"] * 5 + ["cd"] * 3 + ["abcd"] * 2), MIN_VOCAB_SIZE + 4)
    assert train("", MIN_VOCAB_SIZE).n_words == MIN_VOCAB_SIZE  # zero merges needs no text


def test_running_out_of_pairs_carries_the_largest_size_as_data():
    """The size the text supports is a number on the exception (data.train_bpe retries with it), not
    something to read back out of the message."""
    from llama3np import bpe

    with pytest.raises(bpe.OutOfPairs) as info:
        bpe.train("ab ab ab", 600)
    assert info.value.max_vocab_size == MIN_VOCAB_SIZE + 2  # two merges: a+b, then " "+ab
    assert bpe.train("ab ab ab", info.value.max_vocab_size).n_words == info.value.max_vocab_size


def test_data_train_bpe_shrinks_the_vocabulary_to_what_the_text_supports():
    from llama3np import data

    tok = data.train_bpe("ab ab ab", 600)
    assert tok.n_words < 600 and tok.encode("ab", bos=False, eos=False) == [256]
