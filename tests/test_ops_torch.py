"""Each op's forward and backward against PyTorch autograd (float64), on the same inputs.

Finite differences check our backward against our own forward; these tests check both against code
we did not write. Skipped with a reason when PyTorch (the `[ref]` extra) is absent.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import ops
from llama3np.args import ModelArgs

TOL = 1e-10  # both sides compute in float64; differences are round-off only
seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True, scope="module")
def _torch(torch):
    torch.set_num_threads(1)


def T(x, torch):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


@settings(max_examples=10)
@given(seed=seeds, B=st.integers(1, 3), S=st.integers(1, 6), C=st.integers(2, 12))
def test_rmsnorm_matches_torch(torch, seed, B, S, C):
    rng = np.random.default_rng(seed)
    x, w, dy = rng.standard_normal((B, S, C)), rng.standard_normal(C), rng.standard_normal((B, S, C))
    y, cache = ops.rmsnorm_forward(x, w, 1e-5)
    dx, dw = ops.rmsnorm_backward(dy, cache)
    tx, tw = T(x, torch), T(w, torch)
    ty = torch.nn.functional.rms_norm(tx, (C,), tw, eps=1e-5)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=TOL)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-9, atol=TOL)


def rope_torch_meta(x, freqs_cis, torch):
    """Meta's apply_rotary_emb: adjacent pairs as complex numbers times e^{i m theta}."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


@settings(max_examples=10)
@given(seed=seeds, S=st.integers(1, 8), start=st.integers(0, 40000), scaled=st.booleans())
def test_rope_matches_metas_complex_rotation(torch, seed, S, start, scaled):
    rng = np.random.default_rng(seed)
    args = ModelArgs(dim=64, n_heads=4, use_scaled_rope=scaled)
    freqs = ops.rope_frequencies(args)
    x, dy = rng.standard_normal((2, S, 3, 16)), rng.standard_normal((2, S, 3, 16))
    y, cache = ops.rope_forward(x, *ops.rope_cos_sin(freqs, start, S, np.float64))
    tx = T(x, torch)
    angles = torch.outer(torch.arange(start, start + S, dtype=torch.float64), torch.tensor(freqs))
    ty = rope_torch_meta(tx, torch.polar(torch.ones_like(angles), angles), torch)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ops.rope_backward(dy, cache), tx.grad.numpy(), rtol=1e-9, atol=1e-9)


@settings(max_examples=15)
@given(seed=seeds, rep=st.sampled_from([1, 2, 4]), KV=st.integers(1, 2), S=st.integers(1, 6), extra=st.integers(0, 3))
def test_attention_matches_torch_sdpa(torch, seed, rep, KV, S, extra):
    """GQA causal attention (queries at the last positions) against scaled_dot_product_attention."""
    rng = np.random.default_rng(seed)
    H, L = KV * rep, S + extra
    q, k, v = rng.standard_normal((2, H, S, 8)), rng.standard_normal((2, KV, L, 8)), rng.standard_normal((2, KV, L, 8))
    dout = rng.standard_normal((2, H, S, 8))
    out, lse = ops.attention_forward(q, k, v)
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse)
    tq, tk, tv = T(q, torch), T(k, torch), T(v, torch)
    mask = torch.ones(S, L, dtype=torch.bool).tril(diagonal=L - S)  # query i sees keys <= L - S + i
    tout = torch.nn.functional.scaled_dot_product_attention(
        tq, tk.repeat_interleave(rep, dim=1), tv.repeat_interleave(rep, dim=1), attn_mask=mask)
    tout.backward(torch.tensor(dout))
    for ours, theirs in [(out, tout.detach()), (dq, tq.grad), (dk, tk.grad), (dv, tv.grad)]:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-9, atol=1e-10)


@settings(max_examples=10)
@given(seed=seeds, n=st.integers(1, 20))
def test_swiglu_matches_torch(torch, seed, n):
    rng = np.random.default_rng(seed)
    a, b, dy = 3 * rng.standard_normal((2, n)), rng.standard_normal((2, n)), rng.standard_normal((2, n))
    y, cache = ops.swiglu_forward(a, b)
    da, db = ops.swiglu_backward(dy, cache)
    ta, tb = T(a, torch), T(b, torch)
    ty = torch.nn.functional.silu(ta) * tb
    ty.backward(torch.tensor(dy))
    for ours, theirs in [(y, ty.detach()), (da, ta.grad), (db, tb.grad)]:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-9, atol=1e-12)


@settings(max_examples=10)
@given(seed=seeds, V=st.integers(2, 50), masked=st.booleans())
def test_cross_entropy_matches_torch(torch, seed, V, masked):
    rng = np.random.default_rng(seed)
    logits, targets = 4 * rng.standard_normal((3, 5, V)), rng.integers(0, V, (3, 5))
    mask = (rng.random((3, 5)) < 0.5) if masked else np.ones((3, 5), bool)
    mask[0, 0] = True
    loss, cache = ops.cross_entropy_forward(logits, targets, mask)
    tl = T(logits, torch)
    tt = torch.tensor(np.where(mask, targets, -100))  # PyTorch's ignore_index plays the mask's role
    tloss = torch.nn.functional.cross_entropy(tl.reshape(-1, V), tt.reshape(-1), ignore_index=-100)
    tloss.backward()
    assert abs(loss - tloss.item()) < 1e-12
    np.testing.assert_allclose(ops.cross_entropy_backward(1.0, cache), tl.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_rope_frequencies_match_metas_apply_scaling(torch):
    """Our Llama 3.1 frequencies against Meta's own `apply_scaling` (llama_models, factor 8)."""
    meta = pytest.importorskip("llama_models.llama3.model", reason="Meta's model code needs fairscale")
    args = ModelArgs(dim=4096, n_heads=32, use_scaled_rope=True, rope_scale_factor=8.0)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    np.testing.assert_allclose(ops.rope_frequencies(args), meta.apply_scaling(plain).numpy(), rtol=1e-13)
