"""Gopher's repetition rules (Rae et al. 2021, table A1), with datatrove's thresholds and reasons.

Repeated content (logs, boilerplate, spam) shows up as duplicated lines and paragraphs and as
n-grams that cover too much of the text. In datatrove's order:
  dup_para_frac 0.30, dup_para_char_frac 0.20     duplicated paragraphs (by count, by characters)
  dup_line_frac 0.30, dup_line_char_frac 0.20     duplicated lines
  top_{2,3,4}_gram 0.20, 0.18, 0.16               characters of the most frequent n-gram x its count
  duplicated_{5..10}_n_grams 0.15 ... 0.10        characters covered by repeated n-grams
All fractions are of len(text).
"""
import re
from collections import Counter

from .text import split_into_words

_PARAGRAPH_RE = re.compile(r"\n{2,}")
_LINE_RE = re.compile(r"\n+")


def find_duplicates(items):
    """-> (number of items that repeat an earlier one, their characters)."""
    seen, n_dup, dup_chars = set(), 0, 0
    for x in items:
        if x in seen:
            n_dup += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return n_dup, dup_chars


def top_ngram_chars(words, n):
    """Characters of the most frequent word n-gram (joined by spaces) times its count; 0 if none."""
    grams = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def duplicated_ngram_chars(words, n):
    """Characters (words joined without spaces) inside n-grams that repeat an earlier n-gram; after a
    repeat the scan jumps past it, so overlapping repeats are not counted twice."""
    seen, chars, i = set(), 0, 0
    while i < len(words) - n + 1:
        gram = "".join(words[i:i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


class GopherRepetitionFilter:
    """filt(text) -> (keep, reason). Thresholds are datatrove's defaults; None disables a check."""

    def __init__(self, dup_line_frac=0.3, dup_para_frac=0.3, dup_line_char_frac=0.2, dup_para_char_frac=0.2,
                 top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                 dup_n_grams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))):
        self.dup_line_frac, self.dup_para_frac = dup_line_frac, dup_para_frac
        self.dup_line_char_frac, self.dup_para_char_frac = dup_line_char_frac, dup_para_char_frac
        self.top_n_grams, self.dup_n_grams = tuple(map(tuple, top_n_grams)), tuple(map(tuple, dup_n_grams))

    def __call__(self, text):
        if not text:
            return False, "empty"
        paragraphs = _PARAGRAPH_RE.split(text.strip())
        n_dup, dup_chars = find_duplicates(paragraphs)
        if self.dup_para_frac and n_dup / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and dup_chars / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = _LINE_RE.split(text)
        n_dup, dup_chars = find_duplicates(lines)
        if self.dup_line_frac and n_dup / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and dup_chars / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = split_into_words(text)
        for n, frac in self.top_n_grams:
            if top_ngram_chars(words, n) / len(text) > frac:
                return False, f"top_{n}_gram"
        for n, frac in self.dup_n_grams:
            if duplicated_ngram_chars(words, n) / len(text) > frac:
                return False, f"duplicated_{n}_n_grams"
        return True, None
