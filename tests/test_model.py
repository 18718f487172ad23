"""The whole Transformer: gradients, causality, the KV cache, batch independence, presets, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llama3np
from llama3np import ModelArgs, Transformer
from llama3np.args import n_params, preset
from llama3np.gradcheck import numerical_grad, rel_error


def tiny_args(**kw):
    base = dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=11, hidden_dim=24, max_seq_len=16,
                use_scaled_rope=True, rope_original_max_seq_len=8, rope_theta=100.0)
    base.update(kw)
    return ModelArgs(**base)


def randomize_norms(model, rng):
    """Norm weights start at 1; perturb them so that their gradients are not special-cased by luck."""
    for k, v in model.params.items():
        if k.endswith("norm.weight"):
            v[...] = 1 + 0.3 * rng.standard_normal(v.shape)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_whole_model_gradients_match_finite_differences(tied, n_kv_heads):
    """Every parameter's gradient, sampled at 6 entries each, within 1e-6 of central differences (float64)."""
    rng = np.random.default_rng(n_kv_heads + 10 * tied)
    args = tiny_args(n_kv_heads=n_kv_heads, tie_embeddings=tied)
    model = Transformer(args, seed=1, dtype=np.float64)
    for v in model.params.values():  # larger weights than init so every path carries signal
        v *= 10 if v.ndim == 2 else 1
    randomize_norms(model, rng)
    tokens = rng.integers(0, args.vocab_size, (2, 5))
    targets = rng.integers(0, args.vocab_size, (2, 5))
    mask = rng.random((2, 5)) < 0.7
    mask[0, 0] = True
    loss, grads = model.loss_and_grads(tokens, targets, mask)
    assert set(grads) == set(model.params)
    f = lambda: model.loss_and_grads(tokens, targets, mask)[0]
    for name, w in model.params.items():
        idx = rng.choice(w.size, size=min(6, w.size), replace=False)
        num = numerical_grad(f, w, indices=idx)
        err = rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx])
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_tied_model_has_no_output_weight_and_uses_the_embedding():
    model = Transformer(tiny_args(tie_embeddings=True), dtype=np.float64)
    assert "output.weight" not in model.params
    untied = Transformer(tiny_args(tie_embeddings=False), dtype=np.float64)
    for k in model.params:
        untied.params[k][...] = model.params[k]
    untied.params["output.weight"][...] = model.params["tok_embeddings.weight"]
    tokens = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(model.forward(tokens), untied.forward(tokens))


@given(st.integers(0, 2**31 - 1), st.integers(2, 12), st.integers(0, 10))
@settings(max_examples=15)
def test_changing_a_future_token_never_changes_past_logits(seed, T, where):
    """Causality: logits at positions < t do not depend on the token at t."""
    rng = np.random.default_rng(seed)
    args = tiny_args()
    model = Transformer(args, seed=seed % 7, dtype=np.float64)
    t = where % T
    tokens = rng.integers(0, args.vocab_size, (1, T))
    changed = tokens.copy()
    changed[0, t] = (changed[0, t] + 1 + rng.integers(0, args.vocab_size - 1)) % args.vocab_size
    a, b = model.forward(tokens), model.forward(changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 4), min_size=1, max_size=4),
       st.sampled_from([1, 2, 4]))
@settings(max_examples=15)
def test_kv_cache_decoding_equals_the_full_forward(seed, chunks, n_kv_heads):
    """Feeding the sequence in chunks through the KV cache gives the full forward's logits."""
    rng = np.random.default_rng(seed)
    args = tiny_args(n_kv_heads=n_kv_heads)
    model = Transformer(args, seed=3, dtype=np.float64)
    T = sum(chunks)
    tokens = rng.integers(0, args.vocab_size, (2, T))
    full = model.forward(tokens)
    cache = model.new_cache(batch_size=2)
    pos, pieces = 0, []
    for n in chunks:
        pieces.append(model.forward(tokens[:, pos:pos + n], start_pos=pos, cache=cache))
        pos += n
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-10, atol=1e-12)


def test_kv_cache_decoding_in_float32_stays_close():
    args = tiny_args()
    model = Transformer(args, seed=0)
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (1, 10))
    full = model.forward(tokens)
    cache = model.new_cache(1)
    steps = [model.forward(tokens[:, i:i + 1], start_pos=i, cache=cache) for i in range(10)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


@given(st.integers(0, 2**31 - 1), st.integers(2, 4))
@settings(max_examples=10)
def test_rows_of_a_batch_are_independent(seed, B):
    """Each row's logits equal the logits of that row run alone."""
    rng = np.random.default_rng(seed)
    args = tiny_args()
    model = Transformer(args, seed=0, dtype=np.float64)
    tokens = rng.integers(0, args.vocab_size, (B, 7))
    batch = model.forward(tokens)
    for b in range(B):
        np.testing.assert_allclose(batch[b:b + 1], model.forward(tokens[b:b + 1]), rtol=1e-12, atol=1e-13)


def test_backward_of_loss_equals_backward_of_its_dlogits():
    """loss_and_grads is forward + cross-entropy backward + model.backward: the plug-in point for DPO/PPO."""
    from llama3np import ops

    args = tiny_args()
    model = Transformer(args, dtype=np.float64)
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, 11, (2, 4)), rng.integers(0, 11, (2, 4))
    loss, grads = model.loss_and_grads(tokens, targets)
    logits = model.forward(tokens)
    l2, cache = ops.cross_entropy_forward(logits, targets)
    grads2 = model.backward(ops.cross_entropy_backward(1.0, cache))
    assert l2 == loss
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads2[k])


def test_loss_and_grads_in_float32_give_the_unfused_loss_bits():
    """float32 on the C kernels: the loss and dlogits in one pass over the logits (written in place) give the
    bits of cross_entropy_forward then cross_entropy_backward, and so the same gradients."""
    from llama3np import backend

    model = Transformer(tiny_args(), seed=3)
    rng = np.random.default_rng(2)
    tokens, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    mask = rng.random((2, 6)) < 0.7
    mask[0, 0] = True
    for m in (None, mask):
        loss, grads = model.loss_and_grads(tokens, targets, m)
        l2, cache = backend.cross_entropy_forward(model.forward(tokens), targets, m)
        grads2 = model.backward(backend.cross_entropy_backward(1.0, cache))
        assert l2 == loss
        for k in grads:
            np.testing.assert_array_equal(grads[k], grads2[k])


def test_float32_and_float64_models_agree():
    args = tiny_args()
    m32, m64 = Transformer(args, seed=5), Transformer(args, seed=5, dtype=np.float64)
    tokens = np.random.default_rng(1).integers(0, 11, (2, 9))
    l32, l64 = m32.forward(tokens), m64.forward(tokens)
    assert l32.dtype == np.float32
    assert rel_error(l32, l64) < 1e-5


@pytest.mark.parametrize("name,billions", [
    ("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama3.1-405b", 405.85),
    ("llama3.2-1b", 1.24), ("llama3.2-3b", 3.21)])
def test_presets_have_the_published_parameter_counts(name, billions):
    """8.03B, 70.6B, 405.9B, 1.24B, 3.21B as Meta publishes (embeddings counted once when tied)."""
    assert abs(n_params(preset(name)) / 1e9 - billions) < 0.006


def test_preset_ffn_widths_follow_metas_formula():
    assert [preset(n).ffn_hidden_dim for n in ["llama3-8b", "llama3-70b", "llama3.1-405b", "llama3.2-1b"]] == \
        [14336, 28672, 53248, 8192]


def test_n_params_counts_the_arrays_of_a_real_model():
    for tied in (False, True):
        args = tiny_args(tie_embeddings=tied)
        assert n_params(args) == sum(v.size for v in Transformer(args).params.values())


# ---- bad input: clear errors, never a wrong number ----------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_args())


@pytest.mark.parametrize("tokens,error,match", [
    (np.array([[1, 2, 11]]), ValueError, r"outside \[0, 11\)"),
    (np.array([[-1, 2]]), ValueError, "outside"),
    (np.array([[1.0, 2.0]]), TypeError, "integer"),
    (np.array([["a"]], dtype=object), TypeError, "integer"),
    (np.array([1, 2, 3]), ValueError, r"shape \(batch, seqlen\)"),
    (np.zeros((1, 2, 3), dtype=int), ValueError, r"shape \(batch, seqlen\)"),
    (np.zeros((1, 17), dtype=int), ValueError, "longer than max_seq_len"),
    (np.zeros((1, 0), dtype=int), ValueError, "empty"),
])
def test_forward_rejects_bad_tokens(model, tokens, error, match):
    with pytest.raises(error, match=match):
        model.forward(tokens)


def test_loss_and_grads_rejects_mismatched_targets_and_masks(model):
    tokens = np.zeros((2, 3), dtype=int)
    with pytest.raises(ValueError, match="targets has shape"):
        model.loss_and_grads(tokens, np.zeros((2, 4), dtype=int))
    with pytest.raises(ValueError, match="outside"):
        model.loss_and_grads(tokens, np.full((2, 3), 99))
    with pytest.raises(TypeError, match="targets must be an integer"):
        model.loss_and_grads(tokens, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="mask has shape"):
        model.loss_and_grads(tokens, tokens, mask=np.ones((3, 2), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        model.loss_and_grads(tokens, tokens, mask=np.array([["a"] * 3] * 2))


def test_cache_misuse_is_a_clear_error(model):
    with pytest.raises(ValueError, match="needs a KV cache"):
        model.forward(np.zeros((1, 2), dtype=int), start_pos=3)
    cache = model.new_cache(1, max_seq_len=4)
    with pytest.raises(ValueError, match="do not fit the cache"):
        model.forward(np.zeros((1, 3), dtype=int), start_pos=2, cache=cache)
    with pytest.raises(ValueError, match="batch of 2"):
        model.forward(np.zeros((2, 1), dtype=int), start_pos=0, cache=cache)
    with pytest.raises(RuntimeError, match="forward without a KV cache"):
        fresh = Transformer(tiny_args())
        fresh.backward(np.zeros((1, 1, 11), np.float32))


def test_model_args_reject_shapes_that_do_not_divide():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ModelArgs(dim=10, n_heads=4)
    with pytest.raises(ValueError, match="not divisible by n_kv_heads"):
        ModelArgs(dim=12, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("llama4")


def test_public_names_are_importable():
    for name in ["ModelArgs", "Transformer", "Tokenizer", "ChatFormat", "load", "save", "set_backend",
                 "AdamW", "generate", "generate_stream"]:
        assert callable(getattr(llama3np, name)), name


# ----------------------------------------------------------------------------------------------------
# the final hidden state: out of forward, gradients in at backward_hidden (reward heads, classifiers)


def test_return_hidden_is_what_the_lm_head_reads():
    """forward(return_hidden=True) is the last RMSNorm's output: the LM head applied to it gives the logits."""
    model = Transformer(tiny_args(), seed=3, dtype=np.float64)
    tokens = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    hidden = model.forward(tokens, return_hidden=True)
    assert hidden.shape == (2, 4, model.args.dim)
    np.testing.assert_allclose(hidden @ model.params["output.weight"].T, model.forward(tokens), rtol=1e-13)


@pytest.mark.parametrize("tied", [False, True])
def test_backward_hidden_matches_finite_differences(tied):
    """A scalar loss of the hidden state, sum(hidden * u): every parameter's gradient within 1e-6 of
    central differences (float64); the LM head, which the hidden state does not reach, gets exactly 0."""
    rng = np.random.default_rng(5)
    args = tiny_args(tie_embeddings=tied)
    model = Transformer(args, seed=2, dtype=np.float64)
    for v in model.params.values():
        v *= 10 if v.ndim == 2 else 1
    randomize_norms(model, rng)
    tokens = rng.integers(0, args.vocab_size, (2, 5))
    u = rng.standard_normal((2, 5, args.dim))
    model.forward(tokens, return_hidden=True)
    grads = model.backward_hidden(u)
    assert list(grads) == list(model.params)
    if not tied:
        assert not grads["output.weight"].any()
    f = lambda: float(np.sum(model.forward(tokens, return_hidden=True, keep=False) * u))
    for name, w in model.params.items():
        idx = rng.choice(w.size, size=min(5, w.size), replace=False)
        num = numerical_grad(f, w, indices=idx)
        err = rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx])
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_keep_false_holds_no_activations_and_backward_says_why():
    model = Transformer(tiny_args(), seed=0)
    model.forward(np.array([[1, 2, 3]]), keep=False)
    assert model.activations is None
    with pytest.raises(RuntimeError, match="forward without a KV cache"):
        model.backward(np.zeros((1, 3, model.args.vocab_size), np.float32))
    model.forward(np.array([[1, 2, 3]]), return_hidden=True)
    with pytest.raises(RuntimeError, match="backward_hidden"):
        model.backward(np.zeros((1, 3, model.args.vocab_size), np.float32))
    with pytest.raises(ValueError, match="dhidden has shape"):
        model.backward_hidden(np.zeros((1, 2, model.args.dim)))


# ----------------------------------------------------------------------------------------------------
# document masks: packed documents attend only within themselves


@given(st.lists(st.integers(1, 5), min_size=2, max_size=4), st.integers(0, 10_000))
@settings(max_examples=15)
def test_perturbing_one_packed_document_leaves_the_others_bitwise_unchanged(lengths, seed):
    """Several documents in one row with doc_ids: changing every token of one document changes no
    logit of any other document, bit for bit (on whichever backend is active)."""
    rng = np.random.default_rng(seed)
    args = tiny_args(max_seq_len=sum(lengths))
    model = Transformer(args, seed=seed % 7)
    doc_ids = np.repeat(np.arange(len(lengths)), lengths)[None]
    tokens = rng.integers(0, args.vocab_size, doc_ids.shape)
    victim = int(rng.integers(len(lengths)))
    changed = tokens.copy()
    where = doc_ids[0] == victim
    changed[0, where] = (tokens[0, where] + 1 + rng.integers(0, args.vocab_size - 1, where.sum())) % args.vocab_size
    a = model.forward(tokens, doc_ids=doc_ids, keep=False)
    b = model.forward(changed, doc_ids=doc_ids, keep=False)
    np.testing.assert_array_equal(a[0, ~where], b[0, ~where])
    assert not np.array_equal(a[0, where], b[0, where])


def test_a_packed_document_reads_like_the_same_document_at_the_same_positions_alone():
    """The first document of a packed row has exactly the logits of a plain causal forward of that
    document; later ones equal a forward whose earlier positions are masked out (float64, rounding only)."""
    rng = np.random.default_rng(0)
    model = Transformer(tiny_args(), seed=1, dtype=np.float64)
    tokens = rng.integers(0, 11, (1, 9))
    doc_ids = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2]])
    packed = model.forward(tokens, doc_ids=doc_ids, keep=False)
    np.testing.assert_allclose(packed[:, :4], model.forward(tokens[:, :4], keep=False), rtol=1e-12, atol=1e-12)
    kv_start = np.broadcast_to([0, 0, 0, 0, 4, 4, 4, 7, 7], (1, 9))
    np.testing.assert_array_equal(packed, model.forward(tokens, kv_start=kv_start, keep=False))


def test_document_masked_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    args = tiny_args()
    model = Transformer(args, seed=4, dtype=np.float64)
    for v in model.params.values():
        v *= 10 if v.ndim == 2 else 1
    tokens, targets = rng.integers(0, 11, (2, 7)), rng.integers(0, 11, (2, 7))
    doc_ids = np.array([[0, 0, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 6, 6]])
    _, grads = model.loss_and_grads(tokens, targets, doc_ids=doc_ids)
    f = lambda: model.loss_and_grads(tokens, targets, doc_ids=doc_ids)[0]
    for name in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight", "layers.0.attention.wv.weight",
                 "tok_embeddings.weight"):
        w = model.params[name]
        idx = rng.choice(w.size, size=6, replace=False)
        err = rel_error(grads[name].reshape(-1)[idx], numerical_grad(f, w, indices=idx).reshape(-1)[idx])
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_left_padded_rows_in_one_cache_decode_like_each_row_alone():
    """Two prompts of different lengths, left-padded into one KV cache with kv_start = the first real
    position: every step's logits equal decoding each prompt alone (float64, to rounding)."""
    model = Transformer(tiny_args(), seed=2, dtype=np.float64)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    P = max(map(len, prompts))
    pad = np.array([P - len(p) for p in prompts])
    tokens = np.array([[0] * n + p for n, p in zip(pad, prompts)])
    cache = model.new_cache(2)
    kv_start = np.broadcast_to(pad[:, None], (2, P))
    batched = model.forward(tokens, 0, cache, kv_start=kv_start)
    step = model.forward(np.array([[7], [8]]), P, cache, kv_start=pad[:, None])
    for b, p in enumerate(prompts):
        alone_cache = model.new_cache(1)
        alone = model.forward(np.array([p]), 0, alone_cache)
        np.testing.assert_allclose(batched[b, -1], alone[0, -1], rtol=1e-10, atol=1e-12)
        nxt = model.forward(np.array([[7 + b]]), len(p), alone_cache)
        np.testing.assert_allclose(step[b, 0], nxt[0, 0], rtol=1e-10, atol=1e-12)


def test_bad_masks_are_clear_errors():
    model = Transformer(tiny_args(), seed=0)
    tokens = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="doc_ids has shape"):
        model.forward(tokens, doc_ids=np.zeros((1, 4), int))
    with pytest.raises(ValueError, match="not both"):
        model.forward(tokens, doc_ids=np.zeros((1, 3), int), kv_start=np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="kv_start holds key positions"):
        model.forward(tokens, kv_start=np.array([[0, 0, 5]]))
    with pytest.raises(ValueError, match="KV cache"):
        model.forward(tokens, 0, model.new_cache(1), doc_ids=np.zeros((1, 3), int))
