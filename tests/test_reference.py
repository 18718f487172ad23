"""Our model against Hugging Face transformers' LlamaForCausalLM, code we did not write.

A small random LlamaForCausalLM (float32) is saved with `save_pretrained` and read with `llama3np.load`;
then logits, the gradient of the mean cross-entropy for every parameter, KV-cache decoding, a bf16
checkpoint and our own `save(..., "hf")` are compared with transformers.

The configs exercise what is easy to get wrong: grouped-query attention (4 query heads on 2 kv heads)
and multi-query attention (1 kv head, which catches permuting k with n_heads instead of n_kv_heads),
tied embeddings, and Llama 3.1's RoPE scaling with original_max_position_embeddings = 64 so that at
the test's positions every frequency but the highest is actually changed by the scaling.

Relative error is max|ours - theirs| / max|theirs| over the whole tensor. Tolerances: 1e-4 for float32
logits (both sides round differently in float32: we measure ~3e-7); 1e-3 for float32 gradients, which go
through twice as many roundings and subtract nearly equal numbers in the softmax backward (we measure ~6e-7).
Each test prints its worst error (run with -s to see them).
"""
import numpy as np
import pytest

import llama3np
from llama3np.formats import hf_to_meta_name, save, unpermute_rotary

CONFIGS = {
    "gqa": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
}
T = 48  # positions 0..47: past original_max_position_embeddings / high_freq_factor = 16
ORIGINAL_CONTEXT = 64
WORST = {}  # name -> worst relative error, printed at the end of the module


def rel_err(ours, theirs):
    theirs = np.asarray(theirs, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs)) / np.max(np.abs(theirs)))


def record(name, err):
    WORST[name] = max(WORST.get(name, 0.0), err)
    print(f"\n{name}: relative error {err:.3e}")


@pytest.fixture(scope="module", autouse=True)
def _print_worst():
    yield
    if WORST:
        print("\nworst relative errors vs transformers:")
        for name, err in WORST.items():
            print(f"  {name:60s} {err:.3e}")


def _dtype_kw(transformers, torch, dtype):
    # transformers 5 renamed from_pretrained's torch_dtype= to dtype=
    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


def make_hf_model(transformers, torch, kind, seed=0):
    """A random float32 LlamaForCausalLM whose norm weights are not all ones."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=ORIGINAL_CONTEXT),
        attn_implementation="eager", **CONFIGS[kind])
    hf = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, transformers, torch, tmp_path_factory):
    """(HF model, our model loaded from its save_pretrained folder, the folder, the config name)."""
    hf = make_hf_model(transformers, torch, request.param)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, llama3np.load(folder), folder, request.param


@pytest.fixture(params=["numpy", "c"])
def backend(request):
    """Run the model on the NumPy reference ops and on the C kernels (when built)."""
    from llama3np import kernels

    if request.param == "c" and not kernels.available():
        pytest.skip(f"C kernels not built ({kernels.import_error})")
    before = llama3np.get_backend()
    llama3np.set_backend(request.param)
    yield request.param
    llama3np.set_backend(before)


def tokens_and_targets(seed=0, B=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 300, size=(B, T)), rng.integers(0, 300, size=(B, T))


def hf_logits(hf, torch, tokens):
    with torch.no_grad():
        return hf(torch.from_numpy(tokens)).logits.float().numpy()


def test_loaded_config_has_the_scaled_rope_gqa_and_tying_of_the_hf_model(pair):
    hf, model, _, kind = pair
    a = model.args
    assert (a.dim, a.n_layers, a.n_heads, a.vocab_size, a.ffn_hidden_dim) == (64, 2, 4, 300, 160)
    assert a.n_kv_heads == CONFIGS[kind]["num_key_value_heads"]
    assert a.tie_embeddings == CONFIGS[kind]["tie_word_embeddings"]
    assert a.use_scaled_rope and a.rope_scale_factor == 8.0
    assert a.rope_original_max_seq_len == ORIGINAL_CONTEXT


def test_rope_scaling_changes_the_frequencies_at_these_settings(pair):
    """Guard for the test itself: with original context 64 the llama3 scaling moves all but the
    highest frequency, so matching logits below really checks the scaled RoPE."""
    from dataclasses import replace

    from llama3np.ops import rope_frequencies

    args = pair[1].args
    scaled, plain = rope_frequencies(args), rope_frequencies(replace(args, use_scaled_rope=False))
    assert scaled[0] == plain[0] and np.all(scaled[1:] < plain[1:])


def test_logits_match_transformers(pair, torch, backend):
    hf, model, _, kind = pair
    tokens, _ = tokens_and_targets()
    err = rel_err(model.forward(tokens), hf_logits(hf, torch, tokens))
    record(f"logits ({kind}, {backend})", err)
    assert err < 1e-4


def test_gradients_of_mean_cross_entropy_match_transformers_for_every_parameter(pair, torch, backend):
    """HF gradients mapped to Meta names (wq/wk rows un-permuted like the weights); a tied model has
    one embedding whose gradient sums the lookup and the LM head in both implementations."""
    hf, model, _, kind = pair
    tokens, targets = tokens_and_targets(1)
    loss, grads = model.loss_and_grads(tokens, targets)
    hf.zero_grad()
    logits = hf(torch.from_numpy(tokens)).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.from_numpy(targets).reshape(-1))
    hf_loss.backward()
    assert abs(float(loss) - hf_loss.item()) < 1e-5 * abs(hf_loss.item())
    hf_grads = {}
    for name, p in hf.named_parameters():  # named_parameters lists a tied matrix once
        g = p.grad.numpy()
        meta = hf_to_meta_name(name)
        if meta.endswith("attention.wq.weight"):
            g = unpermute_rotary(g, model.args.n_heads)
        elif meta.endswith("attention.wk.weight"):
            g = unpermute_rotary(g, model.args.n_kv_heads)
        hf_grads[meta] = g
    assert set(hf_grads) == set(grads)
    errs = {name: rel_err(grads[name], hf_grads[name]) for name in grads}
    worst = max(errs, key=errs.get)
    record(f"gradients ({kind}, {backend}; worst: {worst})", errs[worst])
    assert all(e < 1e-3 for e in errs.values()), {k: e for k, e in errs.items() if e >= 1e-3}


def test_kv_cache_decoding_matches_the_full_forward_of_transformers(pair, torch, backend):
    """Prefill 20 tokens into the cache, then feed one token at a time: every step's logits equal
    transformers' logits at that position of one full forward."""
    hf, model, _, kind = pair
    tokens, _ = tokens_and_targets(2, B=2)
    ref = hf_logits(hf, torch, tokens)  # (B, T, V)
    cache = model.new_cache(batch_size=2, max_seq_len=T)
    steps = [model.forward(tokens[:, :20], start_pos=0, cache=cache)]
    for pos in range(20, T):
        steps.append(model.forward(tokens[:, pos:pos + 1], start_pos=pos, cache=cache))
    err = rel_err(np.concatenate(steps, axis=1), ref)
    record(f"kv-cache decode logits ({kind}, {backend})", err)
    assert err < 1e-4


def test_bf16_checkpoints_match_transformers_upcasting_them_to_float32(pair, transformers, torch, tmp_path):
    """save_pretrained in bfloat16; we widen the words exactly, as torch's bf16 -> float32 does."""
    hf, _, _, kind = pair
    folder = tmp_path / "bf16"
    hf_bf16 = make_hf_model(transformers, torch, kind).to(torch.bfloat16)
    hf_bf16.save_pretrained(folder, safe_serialization=True)
    ours = llama3np.load(folder)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", **_dtype_kw(transformers, torch, torch.float32)).eval()
    assert next(ref_model.parameters()).dtype == torch.float32
    emb = ref_model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(ours.params["tok_embeddings.weight"], emb)  # widening is exact
    tokens, _ = tokens_and_targets(3)
    err = rel_err(ours.forward(tokens), hf_logits(ref_model, torch, tokens))
    record(f"bf16 checkpoint logits ({kind})", err)
    assert err < 1e-4


def test_our_hf_save_loads_in_transformers_with_the_same_weights_and_logits(pair, transformers, torch,
                                                                            tmp_path):
    """HF -> llama3np -> save(format="hf") -> from_pretrained gives back the original tensors bit for
    bit (permutation and its inverse) and logits equal to ours."""
    hf, model, _, kind = pair
    save(model, tmp_path / "ours", format="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    back.eval()
    assert back.config.tie_word_embeddings == model.args.tie_embeddings
    assert back.config.num_key_value_heads == model.args.n_kv_heads
    original = hf.state_dict()
    for name, t in back.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), original[name].numpy(), err_msg=name)
    tokens, _ = tokens_and_targets(4)
    err = rel_err(model.forward(tokens), hf_logits(back, torch, tokens))
    record(f"save(hf) -> transformers logits ({kind})", err)
    assert err < 1e-4


def test_our_bf16_hf_save_loads_in_transformers_with_the_same_logits(pair, transformers, torch, tmp_path):
    """save(format="hf", dtype="bfloat16"): transformers reads our rounded words as we do."""
    _, model, _, kind = pair
    save(model, tmp_path / "bf16", format="hf", dtype="bfloat16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", attn_implementation="eager", **_dtype_kw(transformers, torch, torch.float32))
    ref.eval()
    ours = llama3np.load(tmp_path / "bf16")
    tokens, _ = tokens_and_targets(5)
    err = rel_err(ours.forward(tokens), hf_logits(ref, torch, tokens))
    record(f"save(hf, bf16) -> transformers logits ({kind})", err)
    assert err < 1e-4
