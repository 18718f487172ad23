"""C4's cleaning rules (Raffel et al. 2020, section 2.2), with datatrove's defaults and reasons.

Line by line: a line with a word over 1000 characters is dropped; Wikipedia citation marks ([1],
[edit]) are removed; a line must end in terminal punctuation (not an ellipsis) and hold >= 3 words;
a line mentioning javascript or a cookie/terms-of-use phrase is dropped. The whole page is removed for
"lorem ipsum" (reason `lorem_ipsum`), a curly bracket (`curly_bracket`, code), or fewer than 5 sentences
in the lines kept (`too_few_sentences`). C4's bad-words rule is the NSFW stage here (nsfw.py).

A kept page's text is the kept lines (C4 rewrites the page): `filt.clean(text)` returns it.
"""
import re

from .text import count_sentences

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4QualityFilter:
    """filt(text) -> (keep, reason); filt.clean(text) -> (keep, reason, kept_lines_text)."""

    def __init__(self, remove_citations=True, filter_no_terminal_punct=True, min_num_sentences=5,
                 min_words_per_line=3, max_word_length=1000, filter_lorem_ipsum=True, filter_javascript=True,
                 filter_curly_bracket=True, filter_policy=True):
        self.remove_citations, self.filter_no_terminal_punct = remove_citations, filter_no_terminal_punct
        self.min_num_sentences, self.min_words_per_line = min_num_sentences, min_words_per_line
        self.max_word_length = max_word_length
        self.filter_lorem_ipsum, self.filter_javascript = filter_lorem_ipsum, filter_javascript
        self.filter_curly_bracket, self.filter_policy = filter_curly_bracket, filter_policy

    def __call__(self, text):
        keep, reason, _ = self.clean(text)
        return keep, reason

    def clean(self, text):
        n_sentences, kept = 0, []
        for line in text.splitlines():
            line = line.strip()
            words = line.split()
            if self.max_word_length != -1 and any(len(w) > self.max_word_length for w in words):
                continue
            if self.remove_citations:
                line = CITATION_RE.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                continue
            # the word count is taken before citations were removed, as in C4's code
            if len(words) < self.min_words_per_line:
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return False, "lorem_ipsum", ""
            if self.filter_javascript and "javascript" in lower:
                continue
            if self.filter_curly_bracket and "{" in line:
                return False, "curly_bracket", ""
            if self.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                continue
            if self.min_num_sentences != -1:
                n_sentences += count_sentences(line)
            kept.append(line)
        if n_sentences < self.min_num_sentences:
            return False, "too_few_sentences", ""
        return True, None, "\n".join(kept).strip()
