"""Document masks (kv_start) in the fused C attention kernel, against the NumPy reference.

kv_start (B, T) ints: query i of row b sees only keys j >= kv_start[b, i], capped at its own position
under the causal mask (ops.attention_forward). Several documents packed in one row (Llama 3's
pre-training mask) or the pad positions of left-padded rows in one KV cache.

What must hold:
- out, lse, dq, dk, dv of the C kernel equal ops.attention_* in float64 with the same kv_start, within
  test_kernels.py's tolerances, for GQA ratios, S > T (a cache), strided views, int32 and int64
  starts, 1 or 2 threads, every instruction set;
- a packed document's outputs and gradients do not depend on the values of any other document, bit
  for bit (masked probabilities are exact zeros, and the tiles a document never sees are skipped);
  and the same for a whole model's logits given doc_ids;
- results are bitwise identical on 1 and 2 threads (the backward when each kv head is its own task);
- the model's doc_ids / kv_start go to C on the "c" backend, not to the NumPy fallback;
- a bad kv_start is a ValueError raised before C.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import backend, kernels, ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"C kernels not built ({kernels.import_error})")

ISAS = kernels.available_isas() if kernels.available() else ["portable"]


def _inputs(rng, B, H, KV, T, S, hd, layout):
    """q a transposed view of (B, T, H, hd); k, v contiguous or the first S positions of a longer cache."""
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32).transpose(0, 2, 1, 3)
    if layout == "cache":
        k = rng.standard_normal((B, KV, S + 9, hd)).astype(np.float32)[:, :, :S]
        v = rng.standard_normal((B, KV, S + 9, hd)).astype(np.float32)[:, :, :S]
    else:
        k = rng.standard_normal((B, KV, S, hd)).astype(np.float32)
        v = rng.standard_normal((B, KV, S, hd)).astype(np.float32)
    return q, k, v


def _doc_ids(rng, B, T, n_docs):
    """(B, T) ids of contiguous documents with random lengths (n_docs - 1 random cut points per row)."""
    ids = np.zeros((B, T), dtype=np.int64)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=min(n_docs - 1, T - 1), replace=False)) if T > 1 else []
        for c in cuts:
            ids[b, c:] += 1
    return ids


def _kv_start(rng, B, T, S, kind):
    if kind == "docs":  # packed documents over the S positions; the queries are the last T
        return ops.kv_start_from_doc_ids(_doc_ids(rng, B, S, int(rng.integers(1, 6))))[:, S - T:]
    if kind == "left_pad":  # row b's first n_pad[b] positions are padding (a batch in one KV cache)
        return np.repeat(rng.integers(0, S, size=(B, 1)), T, axis=1)
    return rng.integers(0, S, size=(B, T))  # anything in [0, S): the kernel must not assume sorted starts


def _f64(*xs):
    return [np.asarray(x, dtype=np.float64) for x in xs]


def _assert_grad_close(got, want, name):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * scale, err_msg=name)


@settings(max_examples=30)
@given(
    B=st.integers(1, 2),
    KV=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    T=st.sampled_from([1, 2, 3, 5, 64, 65, 130]) | st.integers(1, 150),
    extra=st.sampled_from([0, 0, 7, 70]),
    hd=st.sampled_from([4, 16, 64]),
    causal=st.booleans(),
    kind=st.sampled_from(["docs", "docs", "left_pad", "random"]),
    dtype=st.sampled_from([np.int32, np.int64]),
    layout=st.sampled_from(["contiguous", "cache"]),
    isa=st.sampled_from(ISAS),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_masked_attention_forward_and_backward_equal_the_numpy_reference(
        B, KV, group, T, extra, hd, causal, kind, dtype, layout, isa, threads, seed):
    """C with kv_start equals ops.attention_* with kv_start in float64."""
    kernels.set_isa(isa)
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    H, S = KV * group, T + extra
    q, k, v = _inputs(rng, B, H, KV, T, S, hd, layout)
    kv_start = _kv_start(rng, B, T, S, kind).astype(dtype)
    out, lse = kernels.attention_forward(q, k, v, causal, kv_start)
    out64, lse64 = ops.attention_forward(*_f64(q, k, v), causal, kv_start)
    np.testing.assert_allclose(out, out64, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(lse, lse64, rtol=1e-5, atol=2e-5)
    dout = rng.standard_normal((B, T, H, hd)).astype(np.float32).transpose(0, 2, 1, 3)
    got = kernels.attention_backward(dout, q, k, v, out, lse, causal, kv_start)
    want = ops.attention_backward(*_f64(dout, q, k, v, out64, lse64), causal, kv_start)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        _assert_grad_close(g, w, name)


def _packed(seed, T=200, cuts=(70, 150)):
    """One row of three documents [0, 70), [70, 150), [150, 200), two kv heads, four query heads."""
    rng = np.random.default_rng(seed)
    q, k, v = (np.ascontiguousarray(x) for x in _inputs(rng, 1, 4, 2, T, T, 32, "contiguous"))
    doc_ids = np.zeros((1, T), dtype=np.int64)
    for c in cuts:
        doc_ids[:, c:] += 1
    dout = rng.standard_normal(q.shape).astype(np.float32)
    return q, k, v, dout, ops.kv_start_from_doc_ids(doc_ids)


@pytest.mark.parametrize("isa", ISAS)
def test_a_packed_document_does_not_depend_on_the_others_bit_for_bit(isa):
    """Changing every q, k, v and dout of the middle document leaves the first and last documents'
    out, lse, dq, dk and dv bitwise unchanged."""
    kernels.set_isa(isa)
    q, k, v, dout, kv_start = _packed(1)
    out, lse = kernels.attention_forward(q, k, v, True, kv_start)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, True, kv_start)
    q2, k2, v2, dout2 = q.copy(), k.copy(), v.copy(), dout.copy()
    mid = slice(70, 150)
    rng = np.random.default_rng(2)
    for x in (q2, k2, v2, dout2):
        x[:, :, mid] = rng.standard_normal(x[:, :, mid].shape) * 3
    out2, lse2 = kernels.attention_forward(q2, k2, v2, True, kv_start)
    grads2 = kernels.attention_backward(dout2, q2, k2, v2, out2, lse2, True, kv_start)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads, (out2, lse2) + grads2):
        for part in (slice(0, 70), slice(150, 200)):
            np.testing.assert_array_equal(a[:, :, part], b[:, :, part], err_msg=f"{name}[{part}]")
        assert not np.array_equal(a[:, :, mid], b[:, :, mid]), name


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("T", [2, 200])  # the decode rows path and the tiled path
def test_attention_is_bitwise_the_same_on_one_and_two_threads(T, masked, isa):
    """Forward always; backward with one task per kv head (B * n_kv_heads >= threads); with and
    without document masks, on every ISA's micro-kernel and row code."""
    kernels.set_isa(isa)
    q, k, v, dout, kv_start = _packed(3, T=T, cuts=(T // 3, T // 2))
    kv_start = kv_start if masked else None
    runs = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        out, lse = kernels.attention_forward(q, k, v, True, kv_start)
        runs.append((out, lse) + kernels.attention_backward(dout, q, k, v, out, lse, True, kv_start))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_a_decode_step_against_a_left_padded_cache_skips_the_pad():
    """T = 1 against S = 300 cached positions, rows padded on the left by 0 and 137: pad keys, even
    huge, never reach the output; the result equals the reference."""
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, 2, 8, 2, 1, 300, 64, "cache")
    kv_start = np.array([[0], [137]])
    k[1, :, :137] = 1e4
    v[1, :, :137] = -1e4
    out, lse = kernels.attention_forward(q, k, v, True, kv_start)
    out64, lse64 = ops.attention_forward(*_f64(q, k, v), True, kv_start)
    np.testing.assert_allclose(out, out64, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(lse, lse64, rtol=1e-5, atol=2e-5)
    assert np.abs(out[1]).max() < 10


def test_backend_sends_masked_attention_to_c(monkeypatch):
    """With kv_start, float32 attention runs on the C kernel under the "c" backend (no NumPy fallback)."""
    backend.set_backend("c")

    def refuse(*args, **kwargs):
        raise AssertionError("the NumPy reference was called")

    monkeypatch.setattr(ops, "attention_forward", refuse)
    monkeypatch.setattr(ops, "attention_backward", refuse)
    q, k, v, dout, kv_start = _packed(5)
    out, lse = backend.attention_forward(q, k, v, True, kv_start)
    dq, dk, dv = backend.attention_backward(dout, q, k, v, out, lse, True, kv_start)
    assert np.array_equal(out, kernels.attention_forward(q, k, v, True, kv_start)[0])
    assert dq.shape == q.shape and dk.shape == k.shape


@pytest.mark.parametrize(
    "kv_start, match",
    [
        (np.zeros((1, 5)), "integer"),  # float
        (np.zeros((1, 4), dtype=np.int64), r"\(1, 5\)"),  # wrong shape
        (np.full((1, 5), 7), "outside"),  # past S = 7
        (np.full((1, 5), -1), "outside"),
    ],
)
def test_a_bad_kv_start_is_refused_before_c(kv_start, match):
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, 1, 2, 1, 5, 7, 8, "contiguous")
    with pytest.raises(ValueError, match=match):
        kernels.attention_forward(q, k, v, True, kv_start)
    out, lse = kernels.attention_forward(q, k, v)
    with pytest.raises(ValueError, match=match):
        kernels.attention_backward(out, q, k, v, out, lse, True, kv_start)


@pytest.mark.timeout(120)
def test_perturbing_one_packed_document_leaves_the_other_documents_logits_bitwise_unchanged():
    """The model on the "c" backend with doc_ids: new tokens in one document change its logits and
    nothing else, bit for bit (the other documents, and the other row)."""
    from llama3np.args import ModelArgs
    from llama3np.model import Transformer

    backend.set_backend("c")
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=160)
    model = Transformer(args, seed=0)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 97, size=(2, 150))
    doc_ids = np.zeros((2, 150), dtype=np.int64)
    doc_ids[0, 40:] = 1  # row 0: [0, 40) [40, 110) [110, 150)
    doc_ids[0, 110:] = 2
    doc_ids[1, 75:] = 1  # row 1: [0, 75) [75, 150)
    logits = model.forward(tokens, doc_ids=doc_ids, keep=False)
    changed = tokens.copy()
    changed[0, 40:110] = rng.integers(0, 97, size=70)
    logits2 = model.forward(changed, doc_ids=doc_ids, keep=False)
    np.testing.assert_array_equal(logits[0, :40], logits2[0, :40])
    np.testing.assert_array_equal(logits[0, 110:], logits2[0, 110:])
    np.testing.assert_array_equal(logits[1], logits2[1])
    assert not np.allclose(logits[0, 40:110], logits2[0, 40:110])
    # and the C logits are the reference's (NumPy backend) within float32 rounding
    backend.set_backend("numpy")
    np.testing.assert_allclose(logits, model.forward(tokens, doc_ids=doc_ids, keep=False), rtol=1e-4, atol=1e-4)


MASKED_CHILD = """
import numpy as np
from llama3np import kernels, ops
rng = np.random.default_rng(8)
q = rng.standard_normal((2, 4, 70, 16)).astype(np.float32)
k = rng.standard_normal((2, 2, 90, 16)).astype(np.float32)
v = rng.standard_normal((2, 2, 90, 16)).astype(np.float32)
kv_start = ops.kv_start_from_doc_ids((np.arange(90) // 25)[None].repeat(2, 0))[:, 20:]  # 4 documents
out, lse = kernels.attention_forward(q, k, v, True, kv_start)
f64 = [x.astype(np.float64) for x in (q, k, v)]
out64, lse64 = ops.attention_forward(*f64, True, kv_start)
np.testing.assert_allclose(out, out64, rtol=1e-4, atol=2e-5)
dq, dk, dv = kernels.attention_backward(out, q, k, v, out, lse, True, kv_start)
want = ops.attention_backward(out.astype(np.float64), *f64, out64, lse64, True, kv_start)
for g, w in zip((dq, dk, dv), want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * max(1.0, float(np.abs(w).max())))
print(kernels.isa())
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("isa", ISAS)
def test_masked_attention_matches_the_reference_under_each_llama3np_isa(isa):
    """The same check in a fresh process started with LLAMA3NP_ISA=<isa> (the variable, not set_isa)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA3NP_")}
    env.update(PYTHONPATH=root, LLAMA3NP_ISA=isa)
    r = subprocess.run([sys.executable, "-c", MASKED_CHILD], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [isa]


@pytest.mark.timeout(120)
def test_packed_training_step_gives_the_same_loss_and_gradients_on_both_backends():
    """model.loss_and_grads with doc_ids: the C backend (masked kernel, forward and backward) equals the
    NumPy reference within float32 rounding."""
    from llama3np.args import ModelArgs
    from llama3np.model import Transformer

    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=160)
    model = Transformer(args, seed=2)
    rng = np.random.default_rng(9)
    tokens, targets = rng.integers(0, 97, size=(2, 140)), rng.integers(0, 97, size=(2, 140))
    doc_ids = np.cumsum(rng.random((2, 140)) < 0.03, axis=1)  # a few documents per row
    results = {}
    for name in ("numpy", "c"):
        backend.set_backend(name)
        results[name] = model.loss_and_grads(tokens, targets, doc_ids=doc_ids)
    (loss_np, g_np), (loss_c, g_c) = results["numpy"], results["c"]
    assert abs(float(loss_c) - float(loss_np)) < 1e-5 * abs(float(loss_np))
    for key in g_np:
        scale = max(1e-3, float(np.abs(g_np[key]).max()))
        np.testing.assert_allclose(g_c[key], g_np[key], rtol=1e-3, atol=1e-4 * scale, err_msg=key)
