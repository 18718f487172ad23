"""Our heuristic filters give datatrove's verdict and reason on every document of a varied corpus.

datatrove (with spaCy, offline) is a test-only reference: pip install 'datatrove[processing]' spacy.
The corpus (webcorpus.varied_corpus) puts documents on both sides of every threshold. It leaves out
logs and code, where spaCy keeps "pid=42", "12:30:01" and "f(x" as single tokens and our regex does not
(see llama3np/data/curation/text.py for where verdicts can differ). C4's bad-words filter is left out:
it downloads its list.
"""
from collections import Counter

import pytest

from llama3np.data.curation import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from llama3np.data.curation.webcorpus import KINDS, varied_corpus

dt_filters = pytest.importorskip("datatrove.pipeline.filters",
                                 reason="datatrove is a test reference: pip install 'datatrove[processing]' spacy")
pytest.importorskip("spacy", reason="datatrove's English word tokenizer needs spaCy: pip install spacy")
from datatrove.data import Document  # noqa: E402
from datatrove.utils.text import split_into_words as dt_split_into_words  # noqa: E402

CORPUS = varied_corpus(300, seed=11, kinds=[k for k in KINDS if k not in ("log", "code")])


def _theirs(filt, text, i):
    r = filt.filter(Document(text=text, id=str(i)))
    return (True, None) if r is True else tuple(r)


@pytest.mark.parametrize("ours, theirs_name", [
    (GopherQualityFilter(), "GopherQualityFilter"),
    (GopherRepetitionFilter(), "GopherRepetitionFilter"),
    (C4QualityFilter(), "C4QualityFilter"),
    (FineWebQualityFilter(), "FineWebQualityFilter"),
])
def test_same_verdict_and_reason_as_datatrove_on_every_document(ours, theirs_name):
    theirs = getattr(dt_filters, theirs_name)()
    got = [ours(t) for t in CORPUS]
    want = [_theirs(theirs, t, i) for i, t in enumerate(CORPUS)]
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{len(bad)} of {len(CORPUS)} differ, first: {bad[:3]}"
    # the corpus really exercises the filter: it keeps some and removes some for >= 2 reasons
    reasons = Counter(r for _, r in want)
    assert reasons[None] > 0 and len(reasons) >= 3, reasons


def test_words_match_spacy_on_the_corpus():
    from llama3np.data.curation.text import split_into_words

    assert all(split_into_words(t) == tuple(dt_split_into_words(t)) for t in CORPUS)
