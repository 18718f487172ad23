"""Train a small byte-level BPE vocabulary with Llama 3's pre-tokenizer; the result is a normal Tokenizer.

Byte-pair encoding in four lines: write every chunk of the text as its UTF-8 bytes (256 base tokens);
count every adjacent pair of tokens; make the most frequent pair a new token and replace it
everywhere; repeat until the vocabulary is big enough. The order in which merges were learned is the
rank, and tiktoken's encoder (used by `Tokenizer`) replays merges by rank, lowest first.

Chunks come from Llama 3's pattern (`tokenizer.PAT_STR`), so merges never cross a word, number or
punctuation boundary, exactly as when encoding. Two things make this fast enough for a few MB of text
in pure Python:
  - the text has millions of chunks but only tens of thousands of *distinct* chunks: we train on the
    distinct chunks, each weighted by how often it occurs;
  - after a merge only the chunks containing that pair change, so we keep, for every pair, its count
    and the set of chunks it occurs in, update both incrementally, and find the most frequent pair
    with a heap (stale heap entries are skipped when popped) instead of rescanning all pairs.

Vocabulary layout (what `vocab_size` means): ids 0..255 are the single bytes, 256..vocab_size-257
the learned merges in the order learned, and the last 256 ids are Llama 3's special tokens with
Meta's names (`<|begin_of_text|>` = vocab_size-256, ..., `<|eot_id|>` = vocab_size-247). So
`train(text, 4096).n_words == 4096`: use `ModelArgs(vocab_size=tokenizer.n_words)`.

Ties: when several pairs are equally frequent, the pair with the smallest (left id, right id) wins,
so training is deterministic.

Command line: `python -m llama3np.bpe input.txt 4096 out.model` trains, times and saves.
"""
import heapq
import sys
import time
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import regex  # tiktoken's own dependency; the stdlib `re` has no \p{L} (Unicode letter) classes

from .tokenizer import NUM_SPECIAL_TOKENS, PAT_STR, Tokenizer

_PATTERN = regex.compile(PAT_STR)
MIN_VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS  # the bytes and the special tokens, no merges


class OutOfPairs(ValueError):
    """The text ran out of pairs to merge before the vocabulary was full.

    `max_vocab_size` is the largest vocab_size this text supports (every chunk is one token by then):
    call `train` again with it to get the biggest vocabulary the text can fill.
    """

    def __init__(self, message, max_vocab_size):
        super().__init__(message)
        self.max_vocab_size = max_vocab_size


def pretokenize(text: str) -> List[str]:
    """Split text into the chunks BPE works inside, with Llama 3's pattern ("Hi there" -> ["Hi", " there"])."""
    return _PATTERN.findall(text)


def merge(ids: List[int], pair: Tuple[int, int], new_id: int) -> List[int]:
    """Replace every occurrence of `pair` in `ids`, scanning left to right ([a, a, a] with (a, a) -> [aa, a])."""
    # BEGIN SOLUTION ex13a
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
    # END SOLUTION


def learn_merges(chunk_counts: Dict[str, int], n_merges: int) -> List[bytes]:
    """The vocabulary (id -> bytes) after `n_merges` merges over chunks weighted by their counts.

    Returns the 256 single bytes followed by the learned tokens in the order learned.
    Raises OutOfPairs (a ValueError) if the chunks run out of pairs before `n_merges` merges.
    """
    # BEGIN SOLUTION ex13b
    vocab = [bytes([b]) for b in range(256)]
    id_of = {token: i for i, token in enumerate(vocab)}
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # each distinct chunk as byte ids
    counts = list(chunk_counts.values())

    pair_counts: Dict[Tuple[int, int], int] = defaultdict(int)  # pair -> occurrences in the text
    where: Dict[Tuple[int, int], set] = defaultdict(set)  # pair -> indices of the words holding it
    for wi, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where[pair].add(wi)
    # a max-heap by count via negated counts; ties pop the smallest (left, right) pair first
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    n_learned = 0
    while n_learned < n_merges:
        # pop the most frequent pair, skipping entries made stale by earlier updates
        while heap and -heap[0][0] != pair_counts.get(heap[0][1], 0):
            heapq.heappop(heap)
        if not heap:
            raise OutOfPairs(
                f"the text ran out of pairs to merge after {n_learned} merges, {n_merges} were asked for: "
                f"use more text or a vocab_size of at most {MIN_VOCAB_SIZE + n_learned}",
                max_vocab_size=MIN_VOCAB_SIZE + n_learned,
            )
        _, pair = heapq.heappop(heap)
        token = vocab[pair[0]] + vocab[pair[1]]
        # The same bytes can be reached by two different splits (b"ab"+b"c" and b"a"+b"bc"). A .model
        # file holds each token once, and tiktoken would form it either way, so reuse the id.
        new_id = id_of.get(token)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(token)
            id_of[token] = new_id
            n_learned += 1

        changed = set()
        for wi in where.pop(pair):
            word, count = words[wi], counts[wi]
            new_word = merge(word, pair, new_id)
            if len(new_word) == len(word):
                continue  # stale index: an earlier merge already took this pair apart
            for p in zip(word, word[1:]):
                pair_counts[p] -= count
                changed.add(p)
            for p in zip(new_word, new_word[1:]):
                pair_counts[p] += count
                where[p].add(wi)
                changed.add(p)
            words[wi] = new_word
        del pair_counts[pair]
        changed.discard(pair)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return vocab
    # END SOLUTION


def train(text: str, vocab_size: int, *, name: str = "bpe", verbose: bool = False) -> Tokenizer:
    """Learn a byte-level BPE on `text`; returns a Tokenizer with exactly `vocab_size` ids (n_words).

    `vocab_size` counts everything: 256 byte tokens + (vocab_size - 512) merges + 256 special tokens,
    so it must be at least 512. Deterministic: the same text and size give the same ranks.
    Raises OutOfPairs (with the largest size the text supports) if the text is too small for vocab_size.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it counts 256 byte tokens + the merges + "
            f"{NUM_SPECIAL_TOKENS} special tokens, so it must be at least {MIN_VOCAB_SIZE}"
        )
    t0 = time.perf_counter()
    chunk_counts = Counter(pretokenize(text))
    t1 = time.perf_counter()
    vocab = learn_merges(chunk_counts, vocab_size - MIN_VOCAB_SIZE)
    t2 = time.perf_counter()
    if verbose:
        print(
            f"bpe: {len(text):,} chars -> {sum(chunk_counts.values()):,} chunks ({len(chunk_counts):,} distinct) "
            f"in {t1 - t0:.2f}s; {len(vocab) - 256} merges in {t2 - t1:.2f}s",
            file=sys.stderr,
        )
    return Tokenizer.from_ranks({token: rank for rank, token in enumerate(vocab)}, name=name)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train a byte-level BPE with Llama 3's pre-tokenizer.")
    parser.add_argument("input", help="a UTF-8 text file")
    parser.add_argument("vocab_size", type=int, help="total ids, including 256 bytes and 256 special tokens")
    parser.add_argument("output", help="where to write the tiktoken .model file")
    args = parser.parse_args(argv)
    with open(args.input, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    tokenizer = train(text, args.vocab_size, verbose=True)
    seconds = time.perf_counter() - t0
    tokenizer.save(args.output)
    n_tokens = len(tokenizer.encode(text, bos=False, eos=False))
    print(
        f"trained {tokenizer.n_words} ids in {seconds:.1f}s; {len(text.encode()) / n_tokens:.2f} bytes per token "
        f"on the training text; saved {args.output}"
    )


if __name__ == "__main__":
    main()
