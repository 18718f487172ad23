"""Semantic dedup (SemDeDup, Abbas et al. 2023): remove documents that say the same thing in other words.

    embed every document (unit vectors) -> k-means into clusters (deterministic, NumPy)
    -> within each cluster, walk the documents in order; drop one whose cosine similarity to an
       already kept one exceeds 1 - eps

Embeddings: `model_embeddings` mean-pools a trained llama3np model's final hidden states (what the
paper does with an OPT/CLIP encoder); `tfidf_embeddings` is the fallback that needs no model: hashed
word uni/bigram TF-IDF projected to `dim` dimensions with a fixed random Gaussian matrix.
"""
import hashlib

import numpy as np

from .text import simplify_text


def _bucket(g, n_buckets):
    return int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") % n_buckets


def _tf(text, n_buckets):
    """-> (bucket ids, sublinear tf 1 + log count) of the text's hashed word uni/bigrams."""
    w = simplify_text(text).split()
    grams = w + [a + " " + b for a, b in zip(w, w[1:])]
    ids, counts = np.unique(np.array([_bucket(g, n_buckets) for g in grams] or [0], dtype=np.int64),
                            return_counts=True)
    return ids, 1.0 + np.log(counts)


def document_frequencies(texts, n_buckets=1 << 16):
    """-> (df (n_buckets,), number of texts): in how many texts each hashed n-gram occurs. Sums over
    chunks of a corpus, so a streamed corpus needs only this array between its two passes."""
    return _document_frequencies((_tf(t, n_buckets) for t in texts), n_buckets)


def _document_frequencies(tfs, n_buckets):
    """_tf's (bucket ids, tf) of each text -> (df, number of texts)."""
    df = np.zeros(n_buckets)
    n = 0
    for ids, _ in tfs:
        df[ids] += 1
        n += 1
    return df, n


def random_projection(n_buckets, dim=256, seed=0):
    """(n_buckets, dim) float32 Gaussian / sqrt(dim): distances are kept in expectation (Johnson-Lindenstrauss)."""
    return np.random.default_rng(seed).standard_normal((n_buckets, dim)).astype(np.float32) / np.sqrt(dim)


def tfidf_transform(texts, df, n_docs, dim=256, seed=0, proj=None):
    """texts -> (N, dim) float32 unit rows: TF-IDF with the corpus's (df, n_docs), random projection
    (proj: random_projection(len(df), dim, seed), passed in when it is already built)."""
    return _tfidf_transform([_tf(t, len(df)) for t in texts], df, n_docs, dim, seed, proj)


def _tfidf_transform(tfs, df, n_docs, dim, seed, proj):
    """_tf's (bucket ids, tf) of each text -> (N, dim) float32 unit rows (tfidf_transform)."""
    n_buckets = len(df)
    idf = np.log((1 + n_docs) / (1 + df)) + 1.0
    proj = random_projection(n_buckets, dim, seed) if proj is None else proj
    emb = np.zeros((len(tfs), dim), dtype=np.float32)
    for n, (ids, tf) in enumerate(tfs):
        emb[n] = (tf * idf[ids]).astype(np.float32) @ proj[ids]
    return normalize(emb)


def tfidf_embeddings(texts, dim=256, n_buckets=1 << 16, seed=0):
    """texts -> (N, dim) float32 unit rows: hashed uni/bigram TF-IDF (sublinear tf), random projection.
    Each text is hashed once: its (bucket ids, tf) serve both the document frequencies and its row."""
    tfs = [_tf(t, n_buckets) for t in texts]
    df, n = _document_frequencies(tfs, n_buckets)
    return _tfidf_transform(tfs, df, n, dim, seed, None)


def model_embeddings(model, tokenizer, texts, max_len=256):
    """texts -> (N, dim) unit rows: the mean over tokens of a llama3np model's final hidden state."""
    out = []
    for t in texts:
        ids = tokenizer.encode(t, bos=True, eos=False)[:max_len]
        h = model.forward(np.array([ids]), return_hidden=True, keep=False)  # (1, T, dim)
        out.append(np.asarray(h[0], dtype=np.float64).mean(axis=0))
    return normalize(np.array(out, dtype=np.float32))


def normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans(x, k, n_iter=30, seed=0):
    """Spherical k-means on unit rows -> (labels (N,), centroids (k, d)). Deterministic: k-means++ seeding
    from `seed`, ties to the lowest centroid index, an emptied cluster re-seeded at the worst-fit point."""
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: far points are likelier centres
        d = 1.0 - np.max(x @ np.array(centers).T, axis=1)
        p = np.maximum(d, 0)
        centers.append(x[rng.choice(n, p=p / p.sum())] if p.sum() > 0 else x[rng.integers(n)])
    c = np.array(centers)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(n_iter):
        sim = x @ c.T  # (N, k)
        new = np.argmax(sim, axis=1)
        for j in range(k):
            members = x[new == j]
            if len(members):
                c[j] = members.sum(0)
            else:
                worst = int(np.argmin(sim[np.arange(n), new]))
                c[j], new[worst] = x[worst], j
        c = normalize(c)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels, c


def semdedup(emb, eps=0.05, n_clusters=None, seed=0):
    """emb (N, d) unit rows -> keep (N,) bool. In each k-means cluster (default k = sqrt(N)), a document
    is dropped when its cosine similarity to an earlier kept one is above 1 - eps (the first in input
    order survives, as with the other dedups)."""
    n = len(emb)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    labels, _ = kmeans(emb, n_clusters or max(1, int(np.sqrt(n))), seed=seed)
    for j in np.unique(labels):
        members = np.flatnonzero(labels == j)  # ascending: input order
        sim = emb[members] @ emb[members].T
        for a in range(1, len(members)):
            kept_before = keep[members[:a]]
            if np.any(sim[a, :a][kept_before] > 1.0 - eps):
                keep[members[a]] = False
    return keep
