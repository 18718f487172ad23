"""Gopher's quality rules (Rae et al. 2021, appendix A), with datatrove's thresholds and reason strings.

Checks in datatrove's order; the first failing one is the reason:
  gopher_short_doc / gopher_long_doc          non-symbol words outside [50, 100000]
  gopher_below_avg_threshold / _above_        mean non-symbol word length outside [3, 10]
  gopher_too_many_hashes / _ellipsis          "#" or "..." per word above 0.1
  gopher_too_many_bullets                     > 90% of lines start with a bullet
  gopher_too_many_end_ellipsis                > 30% of lines end with an ellipsis
  gopher_below_alpha_threshold                < 80% of words hold a letter (words = spaCy tokens, with
                                              punctuation, as datatrove; alpha_words="whitespace": the paper's)
  gopher_enough_stop_words                    < 2 of the stop words (the, be, to, of, and, that, have, with)
"""
from .text import is_punctuation_char, split_into_words

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


class GopherQualityFilter:
    """filt(text) -> (keep, reason). Thresholds are datatrove's defaults; None disables a check."""

    def __init__(self, min_doc_words=50, max_doc_words=100000, min_avg_word_length=3, max_avg_word_length=10,
                 max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3,
                 max_non_alpha_words_ratio=0.8, min_stop_words=2, stop_words=STOP_WORDS, alpha_words="tokens"):
        self.min_doc_words, self.max_doc_words = min_doc_words, max_doc_words
        self.min_avg_word_length, self.max_avg_word_length = min_avg_word_length, max_avg_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio, self.max_ellipsis_lines_ratio = max_bullet_lines_ratio, max_ellipsis_lines_ratio
        # datatrove's name; it is really the minimum fraction of words that hold a letter
        self.max_non_alpha_words_ratio = max_non_alpha_words_ratio
        self.min_stop_words, self.stop_words = min_stop_words, set(stop_words)
        if alpha_words not in ("tokens", "whitespace"):
            raise ValueError(f"alpha_words must be 'tokens' (datatrove) or 'whitespace' (the Gopher paper), "
                             f"got {alpha_words!r}")
        self.alpha_words = alpha_words

    def __call__(self, text):
        words = split_into_words(text)
        # a "symbol word" is made only of punctuation ("," "..." "#"): not counted as a word
        content = [w for w in words if not all(is_punctuation_char(c) for c in w)]
        n_words = len(words)
        if self.min_doc_words and len(content) < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and len(content) > self.max_doc_words:
            return False, "gopher_long_doc"
        mean_len = sum(map(len, content)) / len(content)
        if self.min_avg_word_length and mean_len < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and mean_len > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"
        lines = text.splitlines()
        bullets = sum(s.lstrip().startswith(("•", "-")) for s in lines)
        if self.max_bullet_lines_ratio and bullets / len(lines) > self.max_bullet_lines_ratio:
            return False, "gopher_too_many_bullets"
        ellipsis_end = sum(s.rstrip().endswith(("...", "…")) for s in lines)
        if self.max_ellipsis_lines_ratio and ellipsis_end / len(lines) > self.max_ellipsis_lines_ratio:
            return False, "gopher_too_many_end_ellipsis"
        # datatrove counts punctuation tokens as words here, so punctuation-dense prose (plays, dialogue)
        # fails; the Gopher paper means whitespace-separated words: alpha_words="whitespace"
        alpha_units = words if self.alpha_words == "tokens" else text.split()
        with_letter = sum(any(c.isalpha() for c in w) for w in alpha_units)
        if self.max_non_alpha_words_ratio and with_letter / max(1, len(alpha_units)) < self.max_non_alpha_words_ratio:
            return False, "gopher_below_alpha_threshold"
        # stop words are matched case-sensitively, as datatrove does ("The" does not count)
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True, None
