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

A document's score is its KL divided by the median KL of clean windows of its own length
(`length_adjusted_scores`): the plug-in KL of a short document is biased up, so without this a corpus
of mixed lengths either loses its short clean pages or, with the wide threshold that mixing forces,
keeps its salted ones (tests/test_curation.py shows both).

The threshold is relative to the corpus: a robust z-score on log score (the score is skewed to the
right), exp(median + z * 1.4826 * MAD) of log score, z = 6 by default, so it needs no tuning per
corpus; an absolute `threshold` may be given instead. On the real web-like corpus (3,000 documents,
benchmarks/curation_real_corpus.py) z = 6 removes every salted page and 1 of 1,819 prose documents
(the raw KL removed 14 of 34 short fortune documents).
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


def smoothed_q(counts):
    """(V,) token counts -> (V,) add-one smoothed probabilities q (no token has q = 0)."""
    return (counts + 1.0) / (counts.sum() + len(counts) + 1.0)


def kl_scores(ids_per_doc, counts, q=None):
    """Per document KL(p_doc || q_corpus) in nats; an empty document scores 0. (q: counts smoothed,
    passed in when it is already computed.)"""
    if q is None:
        q = smoothed_q(counts)
    scores = np.zeros(len(ids_per_doc))
    for i, ids in enumerate(ids_per_doc):
        if len(ids) == 0:
            continue
        tok, c = np.unique(ids, return_counts=True)
        p = c / c.sum()
        scores[i] = float(np.sum(p * (np.log(p) - np.log(q[tok]))))
    return scores


def clean_kl_by_length(ref_ids, counts, lengths, n_windows=64, seed=0):
    """The median KL(p_window || q) of windows of n consecutive tokens of clean text, each window
    inside one reference document at least n tokens long, for each n in `lengths` -> (len(lengths),).

    Why: the KL of a short document is biased up. Its empirical entropy is at most log n (n tokens),
    and KL = cross-entropy(p, q) - entropy(p): with fewer tokens each token's share is larger and the
    plug-in entropy falls short of the text's (Miller-Madow's (k-1)/(2n) is the first term of that
    bias; prose's long tail of once-seen tokens makes it larger). Measured on real prose: clean quotes
    of ~100 tokens scored 4.4 nats against ~2.7 for ~400-token pages, and the corpus-wide threshold
    removed 14 of 34 fortune documents. Comparing a document with clean text of its own length removes
    the bias without a per-corpus constant (a minimum length would skip short documents instead).
    Windows stay inside one document: a window across documents mixes topics and scores lower than
    any single page (it removed 6 of 34 long Wikipedia articles)."""
    lens = np.array([len(i) for i in ref_ids])
    q = smoothed_q(counts)
    rng = np.random.default_rng(seed)
    out = np.empty(len(lengths))
    for j, n in enumerate(lengths):
        docs = np.flatnonzero(lens >= n)
        pick = docs[rng.integers(0, len(docs), size=n_windows)]
        starts = rng.integers(0, lens[pick] - n + 1)
        out[j] = np.median(kl_scores([ref_ids[d][a:a + n] for d, a in zip(pick, starts)], counts, q))
    return out


def clean_curve(ref_ids, counts, seed=0):
    """-> (grid (G,) int64 lengths, clean (G,) median KL of clean windows of each length): lengths
    sqrt(2) apart from 8 tokens to the reference documents' median length."""
    lens = [len(i) for i in ref_ids if len(i)]
    top = max(float(np.median(lens)), 8.0) if lens else 8.0
    grid = np.unique(np.round(2.0 ** np.arange(3, np.log2(top) + 0.25, 0.5)).astype(np.int64))
    if not lens:
        return grid, np.ones(len(grid))
    return grid, clean_kl_by_length(ref_ids, counts, grid, seed=seed)


def adjusted_scores(ids_per_doc, counts, curve, q=None):
    """-> (N,) KL(p_doc || q) / (the clean curve at the document's length), interpolated in log length;
    a document longer than the curve is compared with its last point (its own KL is lower still, so
    the comparison errs towards keeping it)."""
    grid, clean = curve
    n = np.array([max(len(i), 1) for i in ids_per_doc], dtype=np.float64)
    expected = np.exp(np.interp(np.log(n), np.log(grid), np.log(np.maximum(clean, 1e-12))))
    return kl_scores(ids_per_doc, counts, q) / expected if len(n) else np.zeros(0)


def length_adjusted_scores(ids_per_doc, ref_ids, counts, seed=0):
    """-> (N,) KL(p_doc || q) / (median KL of clean windows of the document's length): about 1 for
    clean text whatever its length, higher for outlier tokens (clean_curve, adjusted_scores)."""
    return adjusted_scores(ids_per_doc, counts, clean_curve(ref_ids, counts, seed))


def robust_threshold(scores, z=6.0):
    """exp(median + z * 1.4826 * MAD) over log(scores) (1.4826 * MAD estimates a normal's sd)."""
    logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12))
    med = np.median(logs)
    return float(np.exp(med + z * 1.4826 * np.median(np.abs(logs - med))))


# without a reference, the clean curve is drawn from the corpus's first documents (enough windows, and
# the streaming pipeline does not hold the whole corpus's tokens)
CURVE_DOCS = 2000


def token_kl_filter(texts, tokenizer=None, z=6.0, threshold=None, reference_texts=None, length_aware=True):
    """-> (keep (N,) bool, scores (N,), threshold): remove documents whose score is above threshold.
    q from reference_texts if given, else from `texts`. The score is the length-adjusted KL
    (length_adjusted_scores: about 1 for clean text) or, with length_aware=False, the raw KL."""
    tokenizer = tokenizer or default_tokenizer()
    ids = token_ids(texts, tokenizer)
    ref = ids if reference_texts is None else token_ids(reference_texts, tokenizer)
    vocab = max((int(i.max()) + 1 for i in ids + ref if len(i)), default=1)
    vocab = max(vocab, getattr(tokenizer, "n_words", 0) or 0)
    counts = corpus_counts(ref, vocab)
    scores = length_adjusted_scores(ids, ref[:CURVE_DOCS], counts) if length_aware else kl_scores(ids, counts)
    thr = robust_threshold(scores, z) if threshold is None else float(threshold)
    return scores <= thr, scores, thr
