"""Quality classifier (a): fastText-style (Joulin et al. 2017), as Llama 3 and FineWeb-Edu use.

    words -> hashed unigram and bigram ids -> mean of their embeddings h (dim) -> logit = w . h + b

trained with the logistic loss on "reference" text (Wikipedia-like prose: label 1) against web junk
(label 0). Hashing ("the trick") gives a fixed table of n_buckets rows without a vocabulary.
The forward/backward pair is written out (bag_forward / bag_backward) and checked against finite
differences; training is Adam (sparse rows for the table) on the mean logistic loss.
"""
import hashlib
from dataclasses import dataclass

import numpy as np

from ...fileio import atomic_write
from .text import simplify_text


def hashed_ngrams(text, n_buckets):
    """Lowercased words and word bigrams of simplify_text(text) -> (K,) int64 bucket ids (K >= 1)."""
    words = simplify_text(text).split()
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    if not grams:
        grams = [""]
    return np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") % n_buckets
                     for g in grams], dtype=np.int64)


@dataclass
class BagCache:
    ids: np.ndarray  # (K,) all bucket ids of the batch, concatenated
    doc: np.ndarray  # (K,) which document each id belongs to
    counts: np.ndarray  # (B,) ids per document
    h: np.ndarray  # (B, dim) mean embedding


def bag_forward(ids_list, E, w, b):
    """ids_list: B arrays of bucket ids; E (n_buckets, dim); w (dim,); b (1,) -> (logits (B,), cache)."""
    counts = np.array([len(x) for x in ids_list], dtype=np.int64)
    ids = np.concatenate(ids_list)
    doc = np.repeat(np.arange(len(ids_list)), counts)
    h = np.zeros((len(ids_list), E.shape[1]), dtype=E.dtype)
    np.add.at(h, doc, E[ids])
    h /= counts[:, None]  # (B, dim) mean of the bag's embeddings
    return h @ w + b, BagCache(ids, doc, counts, h)


def bag_backward(dlogits, cache, w, n_buckets):
    """dlogits (B,) -> (dE as (unique ids, rows), dw (dim,), db): dE is sparse, only touched rows."""
    dw = cache.h.T @ dlogits
    db = dlogits.sum()
    dh = dlogits[:, None] * w[None, :]  # (B, dim)
    drows = dh[cache.doc] / cache.counts[cache.doc, None]  # (K, dim): each id gets its bag's share
    uniq, inv = np.unique(cache.ids, return_inverse=True)
    dE = np.zeros((len(uniq), len(w)), dtype=drows.dtype)
    np.add.at(dE, inv, drows)
    return (uniq, dE), dw, db


def logistic_loss(logits, y):
    """Mean binary cross-entropy of sigmoid(logits) against y in {0, 1} -> (loss, dlogits)."""
    loss = np.mean(np.logaddexp(0.0, logits) - y * logits)
    return float(loss), (1.0 / (1.0 + np.exp(-logits)) - y) / len(y)


class FastTextClassifier:
    """Hashed-n-gram bag of embeddings + logistic regression. fit(texts, labels); predict_proba(texts)."""

    def __init__(self, n_buckets=1 << 18, dim=16, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.n_buckets, self.dim = int(n_buckets), int(dim)
        self.E = (rng.standard_normal((self.n_buckets, self.dim)) / np.sqrt(self.dim)).astype(dtype)
        self.w = np.zeros(self.dim, dtype=dtype)
        self.b = np.zeros(1, dtype=dtype)  # (1,): a bias

    def features(self, texts):
        return [hashed_ngrams(t, self.n_buckets) for t in texts]

    def logits(self, ids_list):
        return bag_forward(ids_list, self.E, self.w, self.b)[0]

    def fit(self, texts, labels, epochs=5, lr=0.05, batch_size=32, seed=0):
        """Adam on the mean logistic loss over shuffled mini-batches; returns the loss per epoch."""
        feats, y = self.features(texts), np.asarray(labels, dtype=np.float64)
        rng = np.random.default_rng(seed)
        state = {k: [np.zeros_like(v), np.zeros_like(v)] for k, v in (("E", self.E), ("w", self.w), ("b", self.b))}
        step, history = 0, []
        for _ in range(epochs):
            order, total = rng.permutation(len(feats)), 0.0
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                logits, cache = bag_forward([feats[i] for i in idx], self.E, self.w, self.b)
                loss, dlogits = logistic_loss(logits, y[idx])
                (rows, dE), dw, db = bag_backward(dlogits, cache, self.w, self.n_buckets)
                step += 1
                self._adam(state["E"], self.E, dE, lr, step, rows)
                self._adam(state["w"], self.w, dw, lr, step)
                self._adam(state["b"], self.b, np.array([db]), lr, step)
                total += loss * len(idx)
            history.append(total / len(feats))
        return history

    @staticmethod
    def _adam(st, param, grad, lr, step, rows=None, b1=0.9, b2=0.999, eps=1e-8):
        """Adam on param (or on its `rows` only: a sparse update, as fastText's SGD touches only the bag)."""
        m, v = st
        sel = slice(None) if rows is None else rows
        m[sel] = b1 * m[sel] + (1 - b1) * grad
        v[sel] = b2 * v[sel] + (1 - b2) * grad * grad
        mhat, vhat = m[sel] / (1 - b1 ** step), v[sel] / (1 - b2 ** step)
        param[sel] -= (lr * mhat / (np.sqrt(vhat) + eps)).astype(param.dtype)

    def predict_proba(self, texts, batch_size=256):
        feats = self.features(texts)
        out = [self.logits(feats[s:s + batch_size]) for s in range(0, len(feats), batch_size)]
        return 1.0 / (1.0 + np.exp(-np.concatenate(out).astype(np.float64))) if out else np.zeros(0)

    def save(self, path):
        atomic_write(path, lambda f: np.savez(f, E=self.E, w=self.w, b=self.b))

    @classmethod
    def load(cls, path):
        with np.load(path) as z:
            model = cls(n_buckets=z["E"].shape[0], dim=z["E"].shape[1])
            model.E, model.w, model.b = z["E"].copy(), z["w"].copy(), z["b"].copy()
        return model


def auroc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties 1/2."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train_quality_classifier(positive, negative, holdout=0.2, seed=0, n_buckets=1 << 18, dim=16, epochs=5,
                             lr=0.05):
    """Train classifier (a) on positive texts (reference prose: label 1) against negative ones (junk:
    label 0). A `holdout` fraction of each class, drawn with `seed`, is kept out and scored.
    -> (classifier, {"train": n, "heldout": n, "heldout_auroc": float or None, "loss": [per epoch]})."""
    positive, negative = list(positive), list(negative)
    if not positive or not negative:
        raise ValueError(f"training the quality classifier needs positive and negative texts, got "
                         f"{len(positive)} positive and {len(negative)} negative")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for texts, label in ((positive, 1.0), (negative, 0.0)):
        order = rng.permutation(len(texts))
        n_held = int(len(texts) * holdout)
        held += [(texts[i], label) for i in order[:n_held]]
        train += [(texts[i], label) for i in order[n_held:]]
    train = [train[i] for i in rng.permutation(len(train))]
    clf = FastTextClassifier(n_buckets=n_buckets, dim=dim, seed=seed)
    loss = clf.fit([t for t, _ in train], [y for _, y in train], epochs=epochs, lr=lr, seed=seed)
    labels = [y for _, y in held]
    score = auroc(clf.predict_proba([t for t, _ in held]), labels) if 0 < sum(labels) < len(labels) else None
    return clf, {"train": len(train), "heldout": len(held), "heldout_auroc": score, "loss": loss}
