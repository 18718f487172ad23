"""FineWeb's own quality rules (Penedo et al. 2024), with datatrove's thresholds and reasons.

In order: `empty` (no non-blank line); `line_punct_ratio` (< 12% of lines end in terminal
punctuation); `short_line_ratio` (> 67% of lines are <= 30 characters: menus, lists); `char_dup_ratio`
(> 1% of the characters sit in duplicated lines); `list_ratio` (more than 0.3 newlines per word).
"""
from .gopher_repetition import find_duplicates
from .text import is_terminal_punctuation, split_into_words


class FineWebQualityFilter:
    """filt(text) -> (keep, reason). `stop_chars`=None means any Unicode sentence terminal."""

    def __init__(self, line_punct_thr=0.12, line_punct_exclude_zero=False, stop_chars=None, short_line_thr=0.67,
                 short_line_length=30, char_duplicates_ratio=0.01, new_line_ratio=0.3):
        self.line_punct_thr, self.line_punct_exclude_zero = line_punct_thr, line_punct_exclude_zero
        self.stop_chars = None if stop_chars is None else tuple(stop_chars)
        self.short_line_thr, self.short_line_length = short_line_thr, short_line_length
        self.char_duplicates_ratio, self.new_line_ratio = char_duplicates_ratio, new_line_ratio

    def _ends_in_stop(self, line):
        if self.stop_chars is not None:
            return line.endswith(self.stop_chars)
        return is_terminal_punctuation(line[-1])

    def __call__(self, text):
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return False, "empty"
        ratio = sum(map(self._ends_in_stop, lines)) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return False, "line_punct_ratio"
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) > self.short_line_thr:
            return False, "short_line_ratio"
        if find_duplicates(lines)[1] / len(text.replace("\n", "")) > self.char_duplicates_ratio:
            return False, "char_dup_ratio"
        if text.count("\n") / len(split_into_words(text)) > self.new_line_ratio:
            return False, "list_ratio"
        return True, None
