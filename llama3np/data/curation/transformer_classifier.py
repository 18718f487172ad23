"""Quality classifier (b): a llama3np Transformer with a scalar head, trained on a teacher's labels.

Llama 3 trained transformer quality classifiers on Llama 2's judgements (then distilled them). Here:

    tokens (B, T) -> model.forward(return_hidden=True) -> hidden (B, T, dim)
    -> mean over the real (unpadded) tokens -> pooled (B, dim) -> logit = pooled . w + b

and the logistic loss against the teacher's label (classifier (a), or any scorer). The head is its own
forward/backward pair (scalar_head_forward / scalar_head_backward); its dhidden goes into
model.backward_hidden, so the whole model learns. Rows are right-padded: attention is causal, so a real
token never sees a pad, and the pads are left out of the mean.
"""
from dataclasses import dataclass

import numpy as np

from .fasttext_classifier import logistic_loss


@dataclass
class HeadCache:
    hidden: np.ndarray  # (B, T, dim)
    mask: np.ndarray  # (B, T) 1.0 for real tokens
    pooled: np.ndarray  # (B, dim)
    w: np.ndarray  # (dim,)


def scalar_head_forward(hidden, mask, w, b):
    """hidden (B, T, dim), mask (B, T) of 0/1, w (dim,), b (1,) -> (logits (B,), cache).
    pooled = sum_t mask * hidden / sum_t mask; logit = pooled . w + b."""
    mask = np.asarray(mask, dtype=hidden.dtype)
    n = np.maximum(mask.sum(axis=1, keepdims=True), 1.0)  # (B, 1)
    pooled = np.einsum("btd,bt->bd", hidden, mask) / n  # (B, dim)
    return pooled @ w + b[0], HeadCache(hidden, mask, pooled, w)


def scalar_head_backward(dlogits, cache):
    """dlogits (B,) -> (dhidden (B, T, dim), dw (dim,), db (1,))."""
    n = np.maximum(cache.mask.sum(axis=1, keepdims=True), 1.0)
    dpooled = dlogits[:, None] * cache.w[None, :]  # (B, dim)
    dhidden = (cache.mask / n)[:, :, None] * dpooled[:, None, :]  # each real token gets 1/n of it
    return dhidden.astype(cache.hidden.dtype), cache.pooled.T @ dlogits, np.array([dlogits.sum()])


def encode_batch(tokenizer, texts, max_len):
    """texts -> (tokens (B, T) int64 right-padded with 0, mask (B, T) float32); T <= max_len."""
    ids = [tokenizer.encode(t, bos=True, eos=False)[:max_len] for t in texts]
    T = max(len(x) for x in ids)
    tokens, mask = np.zeros((len(ids), T), dtype=np.int64), np.zeros((len(ids), T), dtype=np.float32)
    for i, x in enumerate(ids):
        tokens[i, :len(x)], mask[i, :len(x)] = x, 1.0
    return tokens, mask


class TransformerClassifier:
    """A llama3np Transformer + scalar head. fit(texts, teacher_labels); predict_proba(texts)."""

    def __init__(self, model, tokenizer, max_len=64, seed=0):
        self.model, self.tokenizer, self.max_len = model, tokenizer, int(max_len)
        rng = np.random.default_rng(seed)
        dim = model.args.dim
        self.head = {"head.w": (rng.standard_normal(dim) / np.sqrt(dim)).astype(model.dtype),
                     "head.b": np.zeros(1, dtype=model.dtype)}

    def logits(self, tokens, mask, keep=False):
        hidden = self.model.forward(tokens, return_hidden=True, keep=keep)
        return scalar_head_forward(hidden, mask, self.head["head.w"], self.head["head.b"])

    def loss_and_grads(self, texts, labels):
        """Mean logistic loss against labels (B,) in {0, 1} -> (loss, grads for model.params + head)."""
        tokens, mask = encode_batch(self.tokenizer, texts, self.max_len)
        logits, cache = self.logits(tokens, mask, keep=True)
        loss, dlogits = logistic_loss(logits.astype(np.float64), np.asarray(labels, dtype=np.float64))
        dhidden, dw, db = scalar_head_backward(dlogits.astype(self.model.dtype), cache)
        grads = self.model.backward_hidden(dhidden)
        grads["head.w"], grads["head.b"] = dw.astype(self.model.dtype), db.astype(self.model.dtype)
        return loss, grads

    def fit(self, texts, labels, steps=200, batch_size=16, lr=2e-3, seed=0, log=None):
        """AdamW on shuffled mini-batches; returns the loss per step."""
        from ...optim import AdamW

        params = {**self.model.params, **self.head}
        opt = AdamW(params, lr=lr, weight_decay=0.0)
        rng = np.random.default_rng(seed)
        labels, order, history = np.asarray(labels), np.zeros(0, dtype=np.int64), []
        for step in range(steps):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(texts))])
            idx, order = order[:batch_size], order[batch_size:]
            loss, grads = self.loss_and_grads([texts[i] for i in idx], labels[idx])
            opt.step(grads)
            history.append(loss)
            if log and step % 50 == 0:
                log(f"step {step}: loss {loss:.4f}")
        return history

    def predict_proba(self, texts, batch_size=32):
        out = []
        for s in range(0, len(texts), batch_size):
            tokens, mask = encode_batch(self.tokenizer, texts[s:s + batch_size], self.max_len)
            out.append(self.logits(tokens, mask)[0].astype(np.float64))
        return 1.0 / (1.0 + np.exp(-np.concatenate(out))) if out else np.zeros(0)


def agreement(student_proba, teacher_proba, threshold=0.5):
    """Fraction of documents on which student and teacher fall on the same side of the threshold."""
    return float(np.mean((np.asarray(student_proba) >= threshold) == (np.asarray(teacher_proba) >= threshold)))
