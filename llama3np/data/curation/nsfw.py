"""NSFW filter: count words of a dirty-word list (C4's rule, softened to a count as in Llama 3).

C4 drops a page holding any word of the "List of Dirty, Naughty, Obscene or Otherwise Bad Words";
Llama 3 counts "dirty words" to catch adult pages. The list is not typed in here: `load_word_list()`
reads the English list the `better-profanity` package ships (an optional install: pip install
better-profanity); tests pass stand-in words.
"""
from pathlib import Path

from .text import split_into_words


def load_word_list():
    """The English profanity list shipped by better-profanity (profanity_wordlist.txt), lowercased."""
    try:
        import better_profanity
    except ImportError as e:
        raise ImportError("the NSFW word list comes from the optional package better-profanity: "
                          "pip install better-profanity (or pass words=[...] to NSFWFilter)") from e
    path = Path(better_profanity.__file__).parent / "profanity_wordlist.txt"
    return sorted({w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()})


class NSFWFilter:
    """filt(text) -> (keep, reason): removes a text with at least `max_count` words from `words`
    (single words; multi-word entries are matched as phrases on the lowercased text)."""

    def __init__(self, words=None, max_count=3):
        words = load_word_list() if words is None else [w.lower() for w in words]
        self.single = {w for w in words if " " not in w}
        self.phrases = [w for w in words if " " in w]
        self.max_count = max_count

    def count(self, text):
        lower = text.lower()
        n = sum(w in self.single for w in split_into_words(lower))
        return n + sum(lower.count(p) for p in self.phrases)

    def __call__(self, text):
        return (False, "nsfw_words") if self.count(text) >= self.max_count else (True, None)
