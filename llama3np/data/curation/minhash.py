"""MinHash LSH near-duplicate detection (Broder 1997; datatrove's MinhashDedup defaults).

    text -> simplify_text -> word 5-gram shingles -> 64-bit shingle hashes (one array for many docs)
         -> signature: for each of 14 x 8 = 112 hash functions, the minimum over the doc's shingles
         -> 14 bands of 8 rows: documents whose band of rows is identical become candidate pairs
         -> a candidate pair is kept if its signatures agree on >= 0.75 of the rows (estimated Jaccard,
            VERIFY_THRESHOLD): a band shared by chance does not join two clusters
         -> union-find over the kept pairs: one cluster id per document (its smallest member)

Two documents with Jaccard similarity J agree on one row with probability J, on a whole band with
J^8, and become candidates with probability 1 - (1 - J^8)^14: about 0.5 at J = 0.72 and above 0.99 at
J = 0.85 (the "S-curve", `candidate_probability`).

Everything is NumPy over all the documents' shingles at once. The 112 hash functions are one mixing
function (splitmix64's finaliser, a bijection on 64-bit integers) applied to shingle ^ seed_i with 112
random 64-bit seeds; a bijection of a well-mixed key is as good as a random permutation for MinHash.
"""
import hashlib

import numpy as np

from .text import simplify_text

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x):
    """splitmix64's finaliser: a fast bijection on uint64 whose output bits all depend on all input bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _mix64_inplace(x, tmp):
    """mix64 on x in place (tmp: a scratch array of x's shape): no temporaries, so a cache-sized block
    of (shingles, hash functions) stays in cache through all eight steps (5x faster than mix64 here)."""
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        np.right_shift(x, np.uint64(shift), out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        if mult is not None:
            np.multiply(x, mult, out=x)
    return x


def word_hashes(words):
    """Distinct words -> uint64 hashes (blake2b, stable across processes, unlike Python's hash())."""
    return np.array([int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                     for w in words], dtype=np.uint64)


def shingle_hashes(texts, ngram=5):
    """-> (hashes (S,) uint64, offsets (N+1,)): the word n-gram hashes of every text, concatenated;
    text i owns hashes[offsets[i]:offsets[i+1]]. A text of fewer than `ngram` words is one shingle of
    all its words (an empty text: one shingle of nothing), so every text has at least one."""
    docs = [simplify_text(t).split() for t in texts]
    vocab = {}
    flat = np.array([vocab.setdefault(w, len(vocab)) for d in docs for w in d], dtype=np.int64)
    h = word_hashes(list(vocab))[flat] if len(flat) else np.zeros(0, np.uint64)  # (W,) all words in a row
    n_words = np.array([len(d) for d in docs], dtype=np.int64)
    starts = np.r_[0, np.cumsum(n_words)[:-1]]
    n_shingles = np.maximum(n_words - ngram + 1, 1)
    # every n-gram of the whole row at once: shingle i covers words i..i+ngram-1
    L = max(len(h) - ngram + 1, 0)
    acc = np.full(L, ngram, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(ngram):
            acc = mix64(acc * _GOLDEN + h[k:k + L])
        # keep the n-grams that lie inside one text: positions start .. start + n_words - ngram
        long_doc = n_words >= ngram
        pos = np.concatenate([np.arange(s, s + n) for s, n in zip(starts[long_doc], n_shingles[long_doc])] or
                             [np.zeros(0, np.int64)])
        out = np.empty(int(n_shingles.sum()), dtype=np.uint64)
        offsets = np.r_[0, np.cumsum(n_shingles)]
        is_long = np.repeat(long_doc, n_shingles)
        out[is_long] = acc[pos]
        for i in np.flatnonzero(~long_doc):  # the whole short text as one shingle
            a = np.uint64(n_words[i])
            for x in h[starts[i]:starts[i] + n_words[i]]:
                a = mix64(a * _GOLDEN + x)
            out[offsets[i]] = a
    return out, offsets


def hash_seeds(num_perm, seed=0):
    """num_perm 64-bit seeds, one per hash function, from `seed`."""
    return np.random.default_rng(seed).integers(0, 2**64, size=num_perm, dtype=np.uint64)


def signatures(texts, num_perm=112, ngram=5, seed=0):
    """texts -> (N, num_perm) uint64 MinHash signatures of their word n-gram shingles."""
    hashes, offsets = shingle_hashes(texts, ngram)
    return signatures_from_hashes(hashes, offsets, num_perm, seed)


def signatures_from_hashes(hashes, offsets, num_perm=112, seed=0, chunk=1024):
    """Shingle hashes (S,) uint64 with offsets (N+1,) -> (N, num_perm) signatures; every set non-empty.
    Shingles are processed `chunk` at a time in two buffers of chunk * num_perm * 8 bytes (1024 x 112
    -> 0.9 MB each: they stay in cache), so memory does not grow with the corpus beyond the signatures."""
    hashes, offsets = np.asarray(hashes, dtype=np.uint64), np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    if np.any(np.diff(offsets) < 1):
        raise ValueError("every document needs at least one shingle")
    # BEGIN SOLUTION ex23
    seeds = hash_seeds(num_perm, seed)
    sig = np.full((n, num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    doc_of = np.repeat(np.arange(n), np.diff(offsets))  # (S,) which text owns each shingle
    buf, tmp = np.empty((chunk, num_perm), np.uint64), np.empty((chunk, num_perm), np.uint64)
    with np.errstate(over="ignore"):
        for s0 in range(0, len(hashes), chunk):
            c = hashes[s0:s0 + chunk]
            h = buf[:len(c)]
            np.bitwise_xor(c[:, None], seeds[None, :], out=h)
            _mix64_inplace(h, tmp[:len(c)])  # (c, num_perm): hash function i is mix64(shingle ^ seed_i)
            d = doc_of[s0:s0 + chunk]
            starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])  # each text's first row in the chunk
            mins = np.minimum.reduceat(h, starts, axis=0)  # (texts in chunk, num_perm)
            sig[d[starts]] = np.minimum(sig[d[starts]], mins)  # a text may straddle two chunks
    return sig
    # END SOLUTION


def estimated_jaccard(sig_a, sig_b):
    """Fraction of hash functions on which two signatures agree: an unbiased estimate of Jaccard."""
    return np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)


def candidate_probability(j, num_bands=14, rows_per_band=8):
    """P(two texts of Jaccard j share at least one band) = 1 - (1 - j^r)^b: LSH's S-curve."""
    return 1.0 - (1.0 - np.asarray(j, dtype=np.float64) ** rows_per_band) ** num_bands


def shingle_sets_with_jaccard(j, n_pairs, m, rng):
    """n_pairs pairs of random 64-bit shingle sets of size m whose exact Jaccard is (close to) j, as
    (hashes, offsets) for signatures_from_hashes, and that exact Jaccard: the inputs on which the
    estimate's spread and the LSH S-curve are measured (tests, benchmarks/bench_curation.py)."""
    o = int(round(2 * m * j / (1 + j)))  # shared shingles: |A & B| / |A | B| = o / (2m - o) = j
    hashes, offsets = [], [0]
    for _ in range(n_pairs):
        u = rng.integers(0, 2**64, size=2 * m - o, dtype=np.uint64)
        hashes += [u[:m], u[m - o:]]
        offsets += [offsets[-1] + m, offsets[-1] + 2 * m]
    return np.concatenate(hashes), np.array(offsets), o / (2 * m - o)


def band_keys(sig, num_bands=14, rows_per_band=8):
    """(N, b*r) signatures -> (N, b) uint64: one hash per band of r rows (equal rows -> equal key)."""
    n = sig.shape[0]
    rows = sig[:, :num_bands * rows_per_band].reshape(n, num_bands, rows_per_band)
    acc = np.full((n, num_bands), rows_per_band, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(rows_per_band):
            acc = mix64(acc * _GOLDEN + rows[:, :, k])
    return acc


def candidate_pairs(sig, num_bands=14, rows_per_band=8, window=32):
    """-> (E, 2) int64 edges (i, j), i < j, each listed once: pairs that share a band.

    Within each band, documents are sorted by key; each is paired with the next window - 1 documents
    of the same key, so a group of up to `window` members lists all its pairs (near-duplicate groups
    are small), and a larger group (many copies of one page) stays linked through overlapping windows
    at N * window pairs, not N^2 / 2."""
    return candidate_pairs_from_keys(band_keys(sig, num_bands, rows_per_band), window)


def candidate_pairs_from_keys(keys, window=32):
    """candidate_pairs from (N, b) band keys."""
    n, num_bands = keys.shape
    edges = []
    for b in range(num_bands):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        multi = np.flatnonzero(np.r_[k[1:] == k[:-1], False] | np.r_[False, k[1:] == k[:-1]])
        o, kk = order[multi], k[multi]  # only members of groups of two or more
        for d in range(1, window):
            same = np.flatnonzero(kk[d:] == kk[:-d])
            if len(same) == 0:
                break  # no group has more than d members
            edges.append(np.stack([o[same], o[same + d]], axis=1))
    if not edges:
        return np.zeros((0, 2), np.int64)
    e = np.sort(np.concatenate(edges), axis=1)
    code = np.unique(e[:, 0] * np.int64(n) + e[:, 1])  # one code per pair: drops pairs seen in two bands
    return np.stack([code // n, code % n], axis=1)


# Candidates are verified at estimated Jaccard >= 0.75. The LSH's own threshold is (1/14)^(1/8) = 0.719
# (datatrove's 0.72), and a near-duplicate is J >= 0.7 (the oracle of benchmarks/bench_curation.py);
# the 112-row estimate has sd 0.043 at J = 0.7, so a pair must clear that line by about one sd for the
# pairs joined to be near-duplicates. Measured on 4 planted corpora of 2,500 documents, precision of
# one-cluster pairs at J >= 0.7: 0.94-0.96 verifying at 0.719, 0.965-0.979 at 0.75; recall at J >= 0.85
# 0.995-1.0 either way.
VERIFY_THRESHOLD = 0.75


def lsh_threshold(num_bands=14, rows_per_band=8):
    """(1/b)^(1/r): the Jaccard where the S-curve rises steepest, about where 1-(1-J^r)^b = 0.5.
    0.719 for 14 x 8: datatrove's 0.72."""
    return (1.0 / num_bands) ** (1.0 / rows_per_band)


def verified_pairs(sig, edges, threshold, rows=None, block=20000):
    """Keep the candidate pairs whose signature-estimated Jaccard is >= threshold (edge ends are rows
    of sig, or indices into `rows`, the rows of sig being clustered).

    A band shared by chance (J = 0.5 shares one of 14 bands with probability 0.05) would otherwise
    join two documents, and union-find would join their clusters; the 112-row estimate (sd <= 0.047)
    sends those back. text-dedup and others verify candidates the same way."""
    keep = np.zeros(len(edges), dtype=bool)
    for a in range(0, len(edges), block):  # blocks of pairs keep memory small
        e = edges[a:a + block] if rows is None else rows[edges[a:a + block]]
        keep[a:a + block] = np.mean(sig[e[:, 0]] == sig[e[:, 1]], axis=1) >= threshold
    return edges[keep]


def union_find(n, edges):
    """Connected components of n nodes -> (n,) ids: each node's smallest connected node.

    Vectorised: every edge pulls both ends to the smaller label, then labels jump to their label's
    label (pointer jumping) until nothing changes; O(log n) rounds on chains."""
    label = np.arange(n, dtype=np.int64)
    if len(edges) == 0:
        return label
    a, b = edges[:, 0], edges[:, 1]
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]  # pointer jumping
        if np.array_equal(new, label):
            return label
        label = new


def clusters_from_signatures(sig, num_bands=14, rows_per_band=8, threshold=None, rows=None, block=65536):
    """(N, b*r) signatures -> (N,) cluster ids (the smallest index in each cluster): LSH candidates,
    verified by estimated Jaccard >= threshold (default VERIFY_THRESHOLD; 0 keeps every candidate),
    joined by union-find. rows: cluster only these rows of sig (ids then index `rows`); sig is read
    in blocks, never copied whole (on a large corpus the signatures are most of the memory)."""
    threshold = VERIFY_THRESHOLD if threshold is None else threshold
    rows = np.arange(sig.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    keys = np.zeros((len(rows), num_bands), np.uint64)  # (M, b): 8 bytes a band
    for a in range(0, len(rows), block):
        keys[a:a + block] = band_keys(sig[rows[a:a + block]], num_bands, rows_per_band)
    edges = candidate_pairs_from_keys(keys)
    return union_find(len(rows), verified_pairs(sig, edges, threshold, rows))


def minhash_clusters(texts, num_bands=14, rows_per_band=8, ngram=5, seed=0):
    """texts -> (N,) int64 cluster ids: near-duplicates (by MinHash LSH on word n-grams of the
    normalised text) share an id, the smallest index among them; a text with none is alone."""
    texts = list(texts)
    if not texts:
        return np.zeros(0, dtype=np.int64)
    sig = signatures(texts, num_bands * rows_per_band, ngram, seed)
    return clusters_from_signatures(sig, num_bands, rows_per_band)
