"""Token-distribution KL filter (Llama 3 section 3.1.1): documents full of outlier tokens.

A document's token frequencies p (under the Llama 3 tokenizer) are compared with the corpus's q:

    KL(p || q) = sum_t p(t) log(p(t) / q(t))       q smoothed: (count(t) + 1) / (total + V + 1)

Prose uses the corpus's common tokens and scores low; a page of hashes, base64, mojibake or a foreign
script uses tokens the corpus hardly has and scores high.

q comes from a clean reference corpus when one is given (`reference_texts`), else from the corpus
itself. Measured on the web-like corpus (3,000 documents, 4.5% of them salted with outlier tokens):
with q from the corpus itself the salted pages do NOT stand out (their rare tokens are frequent enough
in q, and their flat p has a high entropy, which KL subtracts); with q from 200 clean reference
documents all of them are removed. At web scale the corpus's own q is close to a clean one; on a
small corpus give a reference.

The threshold is relative to the corpus: a robust z-score on log KL (KL is skewed to the right),
exp(median + z * 1.4826 * MAD) of log KL, z = 6 by default, so it needs no tuning per corpus; an
absolute `threshold` may be given instead. On the real web-like corpus z = 6 removes every salted
page and 0.9% of the prose (z = 3: 4.4% of the prose).
"""
import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """Llama 3's tokenizer (Meta's tokenizer.model), built once per process."""
    from ...tokenizer import Tokenizer

    return Tokenizer()


def token_ids(texts, tokenizer=None):
    tokenizer = tokenizer or default_tokenizer()
    return [np.asarray(tokenizer.encode(t, bos=False, eos=False), dtype=np.int64) for t in texts]


def corpus_counts(ids_per_doc, vocab_size):
    """(vocab_size,) float64: how often each token occurs in the corpus."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for ids in ids_per_doc:
        np.add.at(counts, ids, 1.0)
    return counts


def kl_scores(ids_per_doc, counts):
    """Per document KL(p_doc || q_corpus) in nats; an empty document scores 0."""
    q = (counts + 1.0) / (counts.sum() + len(counts) + 1.0)
    scores = np.zeros(len(ids_per_doc))
    for i, ids in enumerate(ids_per_doc):
        if len(ids) == 0:
            continue
        tok, c = np.unique(ids, return_counts=True)
        p = c / c.sum()
        scores[i] = float(np.sum(p * (np.log(p) - np.log(q[tok]))))
    return scores


def robust_threshold(scores, z=6.0):
    """exp(median + z * 1.4826 * MAD) over log(scores) (1.4826 * MAD estimates a normal's sd)."""
    logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12))
    med = np.median(logs)
    return float(np.exp(med + z * 1.4826 * np.median(np.abs(logs - med))))


def token_kl_filter(texts, tokenizer=None, z=6.0, threshold=None, reference_texts=None):
    """-> (keep (N,) bool, scores (N,), threshold): remove documents whose KL is above threshold.
    q from reference_texts if given, else from `texts`."""
    tokenizer = tokenizer or default_tokenizer()
    ids = token_ids(texts, tokenizer)
    ref = ids if reference_texts is None else token_ids(reference_texts, tokenizer)
    vocab = max((int(i.max()) + 1 for i in ids + ref if len(i)), default=1)
    vocab = max(vocab, getattr(tokenizer, "n_words", 0) or 0)
    scores = kl_scores(ids, corpus_counts(ref, vocab))
    thr = robust_threshold(scores, z) if threshold is None else float(threshold)
    return scores <= thr, scores, thr
