"""Text utilities shared by the filters and dedup: normalisation, words, sentences, punctuation.

datatrove splits English into words and sentences with spaCy's blank "en" tokenizer and its
sentencizer. We use one regular expression instead (no model, ~10x faster) that agrees with spaCy on
ordinary prose: words, numbers like 3.5, punctuation split off as one token per character, "..." as
one token, and English clitics split the way spaCy splits them (do|n't, it|'s).

Where the verdicts could differ from datatrove's (spaCy keeps these whole; we split them):
  - abbreviations with periods ("U.S.", "e.g.", "Mr.") -> we give "U", ".", "S", "." ;
  - URLs and e-mail addresses -> we split at every punctuation character;
  - emoticons (":)"), all-capital clitics ("DON'T") and other entries of spaCy's exception table.
The word count, the mean word length and the n-gram ratios then move a little, and a document near a
threshold can fall on the other side. The reference test (tests/test_curation_reference.py) uses a
corpus without these forms and agrees on every document.

Punctuation: ASCII punctuation, the typographic and full-width marks below and control characters
(the same set datatrove lists), plus every Unicode Sentence_Terminal character (datatrove lists those
by hand: 17 rare ones differ). Other symbols ("•", "©", "€") count as word characters, as there.
"""
import functools
import string
import unicodedata

import regex

# a word: a number with inner separators (3.5, 1,000), a clitic ('s, n't), words joined by periods
# not followed by a capital (spaCy splits "end.Next" but not "x.length"), a run of word characters,
# a run of dots (an ellipsis is one token, as in spaCy), or any other single visible character.
_WORD_RE = regex.compile(
    r"\d+(?:[.,]\d+)+"
    r"|n't(?!\w)"
    r"|\w+?(?=n't(?!\w))"
    r"|'(?i:s|re|ve|ll|d|m)(?!\w)"
    r"|\w+(?:\.(?![A-Z])\w+)+"
    r"|\w+"
    r"|\.{2,}"
    r"|[^\w\s]"
)
_STERM_RE = regex.compile(r"\p{Sentence_Terminal}")
_NUMBERS_RE = regex.compile(r"\p{Nd}+([.,،٫⎖⎗⎘]\p{Nd}+)?")
_WHITESPACE_RE = regex.compile(r"\s+")


_TYPOGRAPHIC = "«´»–—’“”„…∶━►、。〈〉《》「」【】！％（），．１：；？～"
# control characters except tab and newline, and the C1 block with no-break space (U+00A0 is not one)
_CONTROLS = "".join(chr(i) for i in (*range(0, 9), *range(11, 32), *range(127, 160)))
PUNCTUATION = frozenset(string.punctuation + _TYPOGRAPHIC + _CONTROLS)


_PUNCTUATION_TO_SPACE = {ord(c): " " for c in PUNCTUATION}


def is_punctuation_char(c):
    """In PUNCTUATION or a Unicode sentence terminal: a word made only of these is a "symbol word"."""
    return c in PUNCTUATION or bool(_STERM_RE.match(c))


def is_terminal_punctuation(c):
    """A character that can end a sentence (Unicode Sentence_Terminal: . ! ? and their kin)."""
    return bool(_STERM_RE.match(c))


TERMINAL_ASCII = (".", "!", "?")


@functools.lru_cache(maxsize=8)
def split_into_words(text):
    """English words as spaCy's tokenizer gives them (see the module docstring for the differences).
    A tuple, cached for the last few texts: the filters of one document all split the same text."""
    return tuple(_WORD_RE.findall(text))


def _is_spacy_punct(token):
    return all(unicodedata.category(c).startswith("P") for c in token)


def count_sentences(text):
    """How many sentences spaCy's sentencizer finds: a new one starts at the first non-punctuation
    token after a single-character sentence terminal (so "Wait... what" is one sentence)."""
    words = split_into_words(text)
    if not words:
        return 0
    n, seen_terminal = 1, False
    for w in words:
        terminal = len(w) == 1 and is_terminal_punctuation(w)
        if seen_terminal and not terminal and not _is_spacy_punct(w):
            n += 1
            seen_terminal = False
        elif terminal:
            seen_terminal = True
    return n


def simplify_text(text):
    """Normalise for dedup (datatrove's simplify_text): lowercase, numbers -> 0, punctuation -> space,
    whitespace collapsed, diacritics removed. "Café, 12 Rue!" -> "cafe 0 rue"."""
    text = _NUMBERS_RE.sub("0", text.lower())
    text = text.translate(_PUNCTUATION_TO_SPACE)
    text = _WHITESPACE_RE.sub(" ", text.strip())
    if not text.isascii():  # ASCII has no diacritics to strip
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text.strip()
