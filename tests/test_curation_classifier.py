"""Quality classifier (b): a llama3np Transformer with a scalar head. The head's backward and the
whole chain (head -> model.backward_hidden) match float64 finite differences; trained on the labels of
classifier (a), it agrees with its teacher on >= 90% of held-out documents."""
import numpy as np
import pytest

from llama3np import ModelArgs, Transformer, bpe
from llama3np.data.curation import webcorpus
from llama3np.data.curation.fasttext_classifier import FastTextClassifier
from llama3np.data.curation.transformer_classifier import (TransformerClassifier, agreement, scalar_head_backward,
                                                           scalar_head_forward)
from llama3np.gradcheck import numerical_grad, rel_error

JUNK = ("boilerplate", "spam", "log", "code", "lorem", "repeated_lines", "token_noise")


def test_scalar_head_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    hidden, w, b = rng.standard_normal((3, 5, 4)), rng.standard_normal(4), rng.standard_normal(1)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=np.float64)
    coef = rng.standard_normal(3)  # loss = coef . logits

    def loss():
        return float(coef @ scalar_head_forward(hidden, mask, w, b)[0])

    _, cache = scalar_head_forward(hidden, mask, w, b)
    dhidden, dw, db = scalar_head_backward(coef, cache)
    assert rel_error(dhidden, numerical_grad(loss, hidden)) < 1e-6
    assert rel_error(dw, numerical_grad(loss, w)) < 1e-6
    assert rel_error(db, numerical_grad(loss, b)) < 1e-6
    assert np.all(dhidden[mask == 0] == 0)  # pads get no gradient


class _Bytes:
    """A byte tokenizer: enough for a gradient check."""
    n_words = 260

    def encode(self, text, bos=True, eos=False):
        return ([256] if bos else []) + list(text.encode())


def test_classifier_gradients_through_the_whole_model_match_finite_differences():
    args = ModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=260, hidden_dim=32, max_seq_len=16)
    model = Transformer(args, seed=0, dtype=np.float64)
    clf = TransformerClassifier(model, _Bytes(), max_len=12)
    texts, labels = ["a short one", "and a longer text here"], np.array([1.0, 0.0])
    _, grads = clf.loss_and_grads(texts, labels)
    rng = np.random.default_rng(1)
    for name in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight", "tok_embeddings.weight",
                 "norm.weight", "head.w"):
        p = clf.head[name] if name.startswith("head") else model.params[name]
        idx = [int(i) for i in rng.choice(p.size, size=6, replace=False)]
        if name == "tok_embeddings.weight":  # rows of tokens that occur
            idx = [ord("a") * args.dim + 3, 256 * args.dim + 1, ord("e") * args.dim]
        num = numerical_grad(lambda: clf.loss_and_grads(texts, labels)[0], p, indices=idx)
        assert rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx]) < 1e-6, name
    assert not np.any(grads["output.weight"])  # the LM head is not on this path


@pytest.mark.slow
def test_transformer_classifier_agrees_with_its_fasttext_teacher():
    texts, labels = webcorpus.make_web_corpus(600, seed=5)
    keep = [i for i, k in enumerate(labels) if k == "prose" or k in JUNK]
    texts, y = [texts[i] for i in keep], np.array([labels[i] == "prose" for i in keep], dtype=float)
    n_train = int(len(texts) * 0.7)
    teacher = FastTextClassifier(n_buckets=1 << 14, dim=8)
    teacher.fit(texts[:n_train], y[:n_train], epochs=3)
    t_proba = teacher.predict_proba(texts)
    tok = bpe.train("\n".join(texts[:200]), 1024)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, hidden_dim=192,
                     max_seq_len=64)
    student = TransformerClassifier(Transformer(args, seed=0), tok, max_len=64)
    history = student.fit(texts[:n_train], (t_proba[:n_train] >= 0.5).astype(float), steps=120)
    assert np.mean(history[-20:]) < np.mean(history[:20])
    assert agreement(student.predict_proba(texts[n_train:]), t_proba[n_train:]) >= 0.90


def test_semdedup_model_embeddings_are_unit_mean_pooled_hidden_states():
    from llama3np.data.curation.semdedup import model_embeddings

    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=260, hidden_dim=32, max_seq_len=16)
    model = Transformer(args, seed=0)
    emb = model_embeddings(model, _Bytes(), ["one text", "one text", "something else entirely"], max_len=16)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert emb[0] @ emb[1] == pytest.approx(1.0, abs=1e-6) and emb[0] @ emb[2] < 0.999


def test_semdedup_stage_embeds_with_a_saved_llama3np_model(tmp_path):
    """The pipeline's semdedup stage with params.semdedup.model: a folder llama3np.load reads."""
    import json

    from llama3np import save
    from llama3np.data.curation.evaluate import read_outcomes
    from llama3np.data.curation.pipeline import CurateConfig, curate

    texts = [webcorpus.prose(np.random.default_rng(i), 1) for i in range(12)]
    texts += [texts[0], texts[1]]  # copies: cosine 1 under any embedding
    tok = bpe.train("\n".join(texts), 600)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words, hidden_dim=32,
                     max_seq_len=512)
    model = Transformer(args, seed=0)
    model.tokenizer = tok
    save(model, tmp_path / "m", format="llama3np")
    lines = [json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)]
    (tmp_path / "in.jsonl").write_text("".join(lines))
    cfg = CurateConfig(stages=("semdedup",), progress=False,
                       params={"semdedup": {"model": str(tmp_path / "m"), "eps": 1e-4, "n_clusters": 2}})
    curate(tmp_path / "in.jsonl", tmp_path / "out", cfg)
    out = read_outcomes(tmp_path / "out")
    assert out["d12"] == ("semdedup", "semantic_duplicate") and out["d13"] == ("semdedup", "semantic_duplicate")
    assert out["d0"] is None and out["d1"] is None
