"""Checkpoint I/O: our safetensors reader/writer, the torch-free .pth reader, the HF rotary permutation,
and save -> load round trips of the three folder formats. None of this needs PyTorch, except the tests
that write a real `.pth` with `torch.save` (the `torch` fixture skips them when it is absent).
"""
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3np import ModelArgs, Transformer
from llama3np.formats import (args_from_hf_config, args_from_meta_params, hf_config_from_args,
                                 hf_to_meta_name, load, meta_to_hf_name, permute_rotary, save,
                                 unpermute_rotary)
from llama3np.ops import rope_cos_sin, rope_forward, rope_frequencies
from llama3np.formats.pth_io import load_pth
from llama3np.formats.safetensors_io import SafeTensorsFile, bf16_to_f32, decode, f32_to_bf16, load_file, save_file

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=48, max_seq_len=64)


def tiny_model(seed=0, dtype=np.float32, **overrides):
    """A small random model whose norm weights are not all ones (so a swapped norm would show)."""
    model = Transformer(ModelArgs(**{**TINY, **overrides}), seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for name, w in model.params.items():
        if w.ndim == 1:
            w += (0.1 * rng.standard_normal(w.shape)).astype(dtype)
    return model


def same_params(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 12))

# ----------------------------------------------------------------------------------------------------
# bfloat16


def test_bf16_widening_matches_hand_computed_values():
    """A bfloat16 is the top half of a float32: 0x3F80 is 1.0, 0xC000 is -2.0, 0x3FC0 is 1.5,
    0x7F80 is +inf, 0x0001 is the smallest subnormal 2**-133, 0x4049 is 3.140625."""
    words = np.array([0x3F80, 0xC000, 0x3FC0, 0x7F80, 0x0001, 0x4049, 0x0000, 0x8000], dtype=np.uint16)
    expected = np.array([1.0, -2.0, 1.5, np.inf, 2.0 ** -133, 3.140625, 0.0, -0.0], dtype=np.float32)
    got = bf16_to_f32(words)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert np.signbit(got[-1])  # -0.0 keeps its sign bit


def test_f32_to_bf16_rounds_to_nearest_with_ties_to_even():
    """1 + 2**-8 lies exactly between bf16 neighbours 1 and 1 + 2**-7: ties go to the even one (1.0);
    1 + 3 * 2**-8 lies between 1 + 2**-7 (odd) and 1 + 2**-6 (even): it goes up.
    Just above a tie rounds up."""
    x = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -20, np.nan], dtype=np.float32)
    words = f32_to_bf16(x)
    np.testing.assert_array_equal(words[:3], [0x3F80, 0x3F82, 0x3F81])
    assert np.isnan(bf16_to_f32(words)[3])


@given(st.lists(st.floats(width=32, allow_nan=False, min_value=-2.0 ** 127, max_value=2.0 ** 127),
                min_size=1, max_size=50))
def test_bf16_rounding_error_is_at_most_half_an_ulp(values):
    """Rounding keeps 8 significant bits: |x - bf16(x)| <= 2**-8 |x| for normal numbers (and
    widening then rounding again gives back the same words)."""
    x = np.array(values, dtype=np.float32)
    words = f32_to_bf16(x)
    back = bf16_to_f32(words)
    normal = np.abs(x) >= np.finfo(np.float32).tiny
    assert np.all(np.abs(back - x)[normal] <= 2.0 ** -8 * np.abs(x)[normal])
    np.testing.assert_array_equal(f32_to_bf16(back), words)


# ----------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_layout_is_length_header_then_data(tmp_path):
    """The file is: 8-byte little-endian header length, JSON header (padded to 8 bytes), raw data at the
    offsets the header gives."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, -2], dtype=np.int64)
    path = tmp_path / "t.safetensors"
    save_file({"a": a, "b": b}, path, metadata={"format": "pt"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}
    assert data[8 + n:8 + n + 24] == a.tobytes() and data[8 + n + 24:] == b.tobytes()
    assert len(data) == 8 + n + 40


@settings(max_examples=15)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
       dtype=st.sampled_from(["float64", "float32", "float16", "int64", "int32", "int8", "uint8", "bool"]),
       seed=st.integers(0, 2 ** 16))
def test_safetensors_round_trip_is_exact_for_every_dtype(tmp_path_factory, shape, dtype, seed):
    """Whatever we write (any shape, including scalars and empty tensors) reads back bit for bit."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    save_file({"x": x, "y": x[..., ::-1] if x.ndim else x}, path)  # a non-contiguous view too
    back = load_file(path)
    assert back["x"].dtype == x.dtype and back["x"].shape == x.shape
    np.testing.assert_array_equal(back["x"], x)
    np.testing.assert_array_equal(back["y"], x[..., ::-1] if x.ndim else x)


def test_safetensors_bf16_is_written_rounded_and_read_widened(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    save_file({"x": x}, tmp_path / "b.safetensors", bf16=True)
    with SafeTensorsFile(tmp_path / "b.safetensors") as f:
        assert f.info("x") == ("BF16", (4, 5))
        np.testing.assert_array_equal(f.raw("x"), f32_to_bf16(x))
        np.testing.assert_array_equal(f.get("x"), bf16_to_f32(f32_to_bf16(x)))
        assert f.get("x", np.float64).dtype == np.float64


def test_safetensors_files_agree_with_the_reference_implementation(tmp_path):
    """Our writer's files load in the `safetensors` package, and its files load in our reader."""
    st_numpy = pytest.importorskip("safetensors.numpy",
                                   reason="the safetensors package is a test reference only: pip install safetensors")
    tensors = {"w": np.random.default_rng(1).standard_normal((3, 7)).astype(np.float32),
               "h": np.arange(5, dtype=np.float16), "i": np.array([[1, 2]], dtype=np.int32)}
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    theirs = st_numpy.load_file(str(tmp_path / "ours.safetensors"))
    assert same_params(theirs, tensors)
    st_numpy.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    assert same_params(load_file(tmp_path / "theirs.safetensors"), tensors)


def _corrupt(tmp_path, data):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    return path


def test_truncated_or_corrupt_safetensors_files_raise_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": np.ones((4, 4), np.float32)}, good)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    with pytest.raises(ValueError, match="truncated"):  # data cut short
        SafeTensorsFile(_corrupt(tmp_path, data[:-1]))
    with pytest.raises(ValueError, match="at least 8"):  # not even a header length
        SafeTensorsFile(_corrupt(tmp_path, data[:5]))
    with pytest.raises(ValueError, match="header length"):  # header cut short
        SafeTensorsFile(_corrupt(tmp_path, data[:8 + n // 2]))
    with pytest.raises(ValueError, match="not valid JSON"):
        SafeTensorsFile(_corrupt(tmp_path, data[:8] + b"x" + data[9:]))
    bad_offsets = json.dumps({"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    with pytest.raises(ValueError, match="do not hold 64 bytes"):
        SafeTensorsFile(_corrupt(tmp_path, struct.pack("<Q", len(bad_offsets)) + bad_offsets + bytes(64)))
    bad_dtype = json.dumps({"a": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}).encode()
    with pytest.raises(ValueError, match="unsupported dtype"):
        SafeTensorsFile(_corrupt(tmp_path, struct.pack("<Q", len(bad_dtype)) + bad_dtype + bytes(1)))
    with pytest.raises(FileNotFoundError):
        SafeTensorsFile(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------------------------------
# the rotary permutation


@given(n_heads=st.integers(1, 6), half=st.integers(1, 5), dim=st.integers(1, 6))
def test_rotary_permutation_moves_meta_row_2i_plus_j_to_hf_row_j_half_plus_i(n_heads, half, dim):
    """Inside each head, Meta row 2i + j becomes HF row j * hd/2 + i, and unpermute undoes permute."""
    hd = 2 * half
    w = np.arange(n_heads * hd * dim, dtype=np.float64).reshape(n_heads * hd, dim)
    hf = permute_rotary(w, n_heads)
    for h in range(n_heads):
        for i in range(half):
            for j in range(2):
                np.testing.assert_array_equal(hf[h * hd + j * half + i], w[h * hd + 2 * i + j])
    np.testing.assert_array_equal(unpermute_rotary(hf, n_heads), w)
    np.testing.assert_array_equal(permute_rotary(unpermute_rotary(w, n_heads), n_heads), w)


def _rotate_half_rope(x, cos, sin):
    """Hugging Face's RoPE: rotate (x[i], x[i + hd/2]); x (T, n, hd), cos/sin (T, hd/2)."""
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return np.concatenate([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)


@settings(max_examples=15)
@given(n_heads=st.integers(1, 4), group=st.sampled_from([1, 2, 4]), half=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_permuted_weights_with_rotate_half_rope_equal_meta_weights_with_pair_rope(n_heads, group, half, seed):
    """The point of the permutation: HF's rotate-half RoPE on permuted q/k weights gives the same
    attention scores as Meta's adjacent-pair RoPE on the original weights. k is permuted with its own
    (n_kv_heads) head count, which is what grouped-query checkpoints need."""
    n_kv_heads = max(n_heads // group, 1)
    hd, dim, T = 2 * half, 5, 7
    rng = np.random.default_rng(seed)
    args = ModelArgs(dim=n_heads * hd, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=1, vocab_size=2)
    cos, sin = rope_cos_sin(rope_frequencies(args), 0, T, np.float64)
    x = rng.standard_normal((T, dim))
    wq, wk = rng.standard_normal((n_heads * hd, dim)), rng.standard_normal((n_kv_heads * hd, dim))
    q_meta = rope_forward((x @ wq.T).reshape(1, T, n_heads, hd), cos, sin)[0][0]
    k_meta = rope_forward((x @ wk.T).reshape(1, T, n_kv_heads, hd), cos, sin)[0][0]
    q_hf = _rotate_half_rope((x @ permute_rotary(wq, n_heads).T).reshape(T, n_heads, hd), cos, sin)
    k_hf = _rotate_half_rope((x @ permute_rotary(wk, n_kv_heads).T).reshape(T, n_kv_heads, hd), cos, sin)
    rep = n_heads // n_kv_heads
    scores_meta = np.einsum("thd,shd->hts", q_meta, np.repeat(k_meta, rep, axis=1))
    scores_hf = np.einsum("thd,shd->hts", q_hf, np.repeat(k_hf, rep, axis=1))
    np.testing.assert_allclose(scores_hf, scores_meta, rtol=1e-12, atol=1e-12)


def test_hf_and_meta_names_map_both_ways():
    model = tiny_model()
    for name in model.params:
        assert hf_to_meta_name(meta_to_hf_name(name)) == name
    assert meta_to_hf_name("layers.1.feed_forward.w1.weight") == "model.layers.1.mlp.gate_proj.weight"
    assert meta_to_hf_name("layers.0.feed_forward.w3.weight") == "model.layers.0.mlp.up_proj.weight"
    assert meta_to_hf_name("output.weight") == "lm_head.weight"
    assert hf_to_meta_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError, match="q_proj.bias"):
        hf_to_meta_name("model.layers.0.self_attn.q_proj.bias")


# ----------------------------------------------------------------------------------------------------
# save -> load round trips


@pytest.mark.parametrize("fmt", ["hf", "llama3np"])
@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True, n_kv_heads=1),
                                       dict(use_scaled_rope=True, rope_scale_factor=32.0,
                                            rope_original_max_seq_len=16)])
def test_save_then_load_gives_identical_weights_args_and_logits(tmp_path, fmt, overrides):
    model = tiny_model(**overrides)
    save(model, tmp_path / "ckpt", format=fmt)
    back = load(tmp_path / "ckpt")
    assert back.args == model.args
    assert same_params(back.params, model.params)
    np.testing.assert_array_equal(back.forward(TOKENS), model.forward(TOKENS))
    if model.args.tie_embeddings and fmt == "hf":  # HF files have no lm_head when tied
        with SafeTensorsFile(tmp_path / "ckpt" / "model.safetensors") as f:
            assert "lm_head.weight" not in f.keys()


def test_llama3np_format_keeps_float64_and_load_converts_to_the_requested_dtype(tmp_path):
    model = tiny_model(dtype=np.float64)
    save(model, tmp_path / "c", format="llama3np")
    assert json.loads((tmp_path / "c" / "llama3np.json").read_text())["dtype"] == "float64"
    assert same_params(load(tmp_path / "c", dtype=np.float64).params, model.params)
    as32 = load(tmp_path / "c")
    assert all(w.dtype == np.float32 for w in as32.params.values())


def test_bf16_save_stores_rounded_weights(tmp_path):
    model = tiny_model()
    save(model, tmp_path / "b", format="hf", dtype="bfloat16")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load(tmp_path / "b")
    for name, w in model.params.items():
        np.testing.assert_array_equal(back.params[name], bf16_to_f32(f32_to_bf16(w)), err_msg=name)


def test_hf_config_maps_to_model_args_and_back():
    args = ModelArgs(**{**TINY, "use_scaled_rope": True, "rope_scale_factor": 32.0, "tie_embeddings": True})
    cfg = hf_config_from_args(args)
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert args_from_hf_config(cfg) == args
    # transformers 5 puts the theta and the scaling into rope_parameters instead
    v5 = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**cfg["rope_scaling"], "rope_theta": cfg["rope_theta"]}
    assert args_from_hf_config(v5) == args


def _hf_folder(tmp_path, **overrides):
    folder = tmp_path / "hf"
    save(tiny_model(**overrides), folder, format="hf")
    return folder


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_sharded_hf_checkpoints_load_through_the_index(tmp_path):
    model = tiny_model()
    folder = tmp_path / "hf"
    save(model, folder, format="hf")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    os.remove(folder / "model.safetensors")
    assert same_params(load(folder).params, model.params)
    # an index that points at the wrong shard, and a missing shard
    bad = dict(weight_map, **{names[0]: "model-00002-of-00002.safetensors"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
    with pytest.raises(ValueError, match="no such tensor"):
        load(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load(folder)


@pytest.mark.parametrize("changes, message", [
    (dict(num_hidden_layers=1), r"unexpected \['layers.1"),
    (dict(num_hidden_layers=3), r"missing \['layers.2"),
    (dict(intermediate_size=40), r"layers.0.feed_forward.w1.weight has shape \(48, 32\) in the weights "
                                 r"but the config implies \(40, 32\)"),
    (dict(num_key_value_heads=4), r"attention.wk.weight has shape \(16, 32\) .* \(32, 32\)"),
    (dict(head_dim=16), "head_dim=16 but hidden_size // num_attention_heads = 32 // 4 = 8"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(attention_bias=True), "biases"),
])
def test_config_and_weights_that_disagree_raise_errors_naming_the_key(tmp_path, changes, message):
    folder = _hf_folder(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        load(folder)


def test_a_tied_config_ignores_lm_head_as_transformers_does(tmp_path):
    model = tiny_model()
    save(model, tmp_path / "hf", format="hf")
    _edit_config(tmp_path / "hf", tie_word_embeddings=True)
    back = load(tmp_path / "hf")
    assert back.args.tie_embeddings and "output.weight" not in back.params
    np.testing.assert_array_equal(back.params["tok_embeddings.weight"], model.params["tok_embeddings.weight"])


def test_missing_weights_are_named_in_the_error(tmp_path):
    folder = _hf_folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['tok_embeddings.weight'\]"):
        load(folder)


def test_unknown_folders_missing_paths_and_formats_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="looked for llama3np.json .*config.json .*params.json"):
        load(tmp_path / "empty")
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown checkpoint format 'gguf'"):
        save(model, tmp_path / "x", format="gguf")
    save(model, tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match="another format"):  # load would read the wrong one
        save(model, tmp_path / "hf", format="llama3np")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        _edit_config_and_load(tmp_path / "hf")


def _edit_config_and_load(folder):
    (folder / "config.json").write_text(json.dumps(hf_config_from_args(ModelArgs(**TINY))))
    return load(folder)


@pytest.mark.parametrize("fmt, dtype", [("hf", "bfloat16"), ("hf", None), ("llama3np", None)])
def test_loading_copies_tensors_into_the_model_without_temporary_copies(tmp_path, monkeypatch, fmt, dtype):
    """After the model is built, filling it from the file allocates < 2% of the weights' bytes
    (tracemalloc sees NumPy's allocations): bf16 words are widened straight into the model's arrays,
    and wq/wk are un-permuted through strided views, not through float32 temporaries."""
    import tracemalloc

    import llama3np.formats.folders as checkpoint
    import llama3np.tokenizer  # noqa: F401  (imported now, so its import is not counted below)

    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=256)
    save(Transformer(args), tmp_path / "c", format=fmt, dtype=dtype)
    after_build = {}

    def build(args, dtype=np.float32, init=True):  # the loader's Transformer, then start counting
        model = Transformer(args, dtype=dtype, init=init)
        tracemalloc.reset_peak()
        after_build["bytes"] = tracemalloc.get_traced_memory()[0]
        return model

    monkeypatch.setattr(checkpoint, "Transformer", build)
    tracemalloc.start()
    try:
        model = load(tmp_path / "c")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    weights = sum(w.nbytes for w in model.params.values())  # 3.7 MB; wq alone is 7% of it
    assert peak - after_build["bytes"] < 0.02 * weights


def test_load_accepts_a_file_inside_the_folder(tmp_path):
    model = tiny_model()
    save(model, tmp_path / "c", format="llama3np")
    assert same_params(load(tmp_path / "c" / "model.safetensors").params, model.params)


def test_saving_over_an_existing_checkpoint_replaces_it_and_leaves_no_temp_files(tmp_path):
    save(tiny_model(seed=1), tmp_path / "c", format="hf")
    model = tiny_model(seed=2)
    save(model, tmp_path / "c", format="hf")
    assert same_params(load(tmp_path / "c").params, model.params)
    assert sorted(os.listdir(tmp_path / "c")) == ["config.json", "model.safetensors"]


def test_a_training_run_folder_is_handed_to_the_training_reader(tmp_path, monkeypatch):
    """A folder of `llama3np train` (ckpt_*.npz / latest), recognised by the run folder's own test
    (run_folder.is_run), is read by llama3np.training.run_folder."""
    from llama3np.training.run_folder import is_run

    seen = []
    fake = types.ModuleType("llama3np.training.run_folder")
    fake.load_run = lambda path, dtype=np.float32: seen.append(os.fspath(path)) or "the run's model"
    fake.is_run = is_run
    monkeypatch.setitem(sys.modules, "llama3np.training.run_folder", fake)
    (tmp_path / "ckpt_00000100.npz").write_bytes(b"")
    assert load(tmp_path) == "the run's model" and seen == [os.fspath(tmp_path)]
    assert load(tmp_path / "ckpt_00000100.npz") == "the run's model"  # one checkpoint file of the run
    assert seen[-1] == os.fspath(tmp_path / "ckpt_00000100.npz")


# ----------------------------------------------------------------------------------------------------
# tokenizers travel with the checkpoint


def test_a_custom_tokenizer_is_saved_and_loaded_with_the_model(tmp_path):
    from llama3np.tokenizer import Tokenizer

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})  # 256 byte tokens + 256 specials
    model = tiny_model(vocab_size=tok.n_words)
    model.tokenizer = tok
    save(model, tmp_path / "c", format="llama3np")
    back = load(tmp_path / "c")
    assert back.tokenizer.n_words == tok.n_words
    text = "hi there"
    assert back.tokenizer.encode(text, bos=True, eos=False) == tok.encode(text, bos=True, eos=False)


def test_the_default_llama3_tokenizer_is_attached_when_the_vocab_is_meta_s(tmp_path):
    model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=128256, hidden_dim=8))
    save(model, tmp_path / "c", format="hf")
    assert load(tmp_path / "c").tokenizer.n_words == 128256
    assert not (tmp_path / "c" / "tokenizer.model").exists()  # found from vocab_size, not copied
    save(tiny_model(), tmp_path / "d", format="hf")
    assert load(tmp_path / "d").tokenizer is None


# ----------------------------------------------------------------------------------------------------
# Meta's original format (.pth)


def _pth_zip(tmp_path, payload: bytes):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    return path


class _Evil:
    """Unpickling this calls os.system(command): what a malicious "checkpoint" could do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pth_reader_refuses_globals_other_than_tensors_without_running_them(tmp_path):
    """A pickle can call any function on load; ours only accepts the few a state dict needs."""
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="refusing to load global (posix|os).system"):
        load_pth(_pth_zip(tmp_path, pickle.dumps({"w": _Evil(f"touch {marker}")}, protocol=4)))
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load global (posix|os).system"):
        load_pth(_pth_zip(tmp_path, pickle.dumps({"x": os.system}, protocol=4)))
    with pytest.raises(ValueError, match="refusing to load global builtins.print"):
        load_pth(_pth_zip(tmp_path, pickle.dumps({"x": print}, protocol=4)))
    not_zip = tmp_path / "legacy.pth"
    not_zip.write_bytes(pickle.dumps({}))
    with pytest.raises(ValueError, match="not a zip archive"):
        load_pth(not_zip)


def test_pth_tensors_read_without_torch_equal_what_torch_saved(tmp_path, torch, monkeypatch):
    """bf16, fp16, fp32, a transposed view and a slice at a storage offset all come back exactly,
    with torch made unimportable while we read."""
    state = {"bf16": torch.randn(5, 3).to(torch.bfloat16), "f16": torch.randn(4).half(),
             "f32t": torch.randn(3, 4).t(), "slice": torch.arange(20.0)[7:12],
             "param": torch.nn.Parameter(torch.randn(2, 2))}
    torch.save(state, tmp_path / "x.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    got = load_pth(tmp_path / "x.pth")
    monkeypatch.undo()
    assert got["bf16"].dtype == "BF16" and got["f16"].dtype == "F16"
    for name, t in state.items():
        np.testing.assert_array_equal(decode(got[name].array, got[name].dtype, np.float32),
                                      t.detach().float().numpy(), err_msg=name)


def test_truncated_pth_files_raise_instead_of_reading_garbage(tmp_path, torch):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "x.pth")
    data = (tmp_path / "x.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_pth(tmp_path / "cut.pth")


def _meta_folder(tmp_path, torch, model, n_shards=1):
    """Write `model` the way Meta distributes weights: params.json + consolidated.NN.pth in bf16,
    split for model parallelism like llama-models (rows of column-parallel weights, columns of wo/w2)."""
    folder = tmp_path / "meta"
    folder.mkdir()
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                  vocab_size=a.vocab_size, multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_dim_multiplier,
                  norm_eps=a.norm_eps, rope_theta=a.rope_theta, use_scaled_rope=a.use_scaled_rope)
    (folder / "params.json").write_text(json.dumps(params))
    for r in range(n_shards):
        sd = {}
        for name, w in model.params.items():
            t = torch.from_numpy(w.copy()).to(torch.bfloat16)
            if n_shards > 1 and t.ndim == 2:
                axis = 1 if name.endswith(("wo.weight", "w2.weight")) else 0
                if name.endswith(("wk.weight", "wv.weight")) and n_shards > a.n_kv_heads:
                    t = t.repeat(n_shards // a.n_kv_heads, 1)  # more ranks than kv heads: replicated
                t = t.chunk(n_shards, dim=axis)[r].clone()
            sd[name] = t
        if a.tie_embeddings:
            sd["output.weight"] = sd["tok_embeddings.weight"].clone()  # Meta's 3.2 files keep a copy
        torch.save(sd, folder / f"consolidated.{r:02d}.pth")
    return folder


@pytest.mark.parametrize("n_shards, tied, n_kv_heads", [(1, False, 2), (1, True, 2), (2, False, 2), (2, False, 1)])
def test_meta_folders_load_with_bf16_weights_and_model_parallel_shards(tmp_path, torch, n_shards, tied,
                                                                       n_kv_heads):
    """One file, a tied 3.2-style file (with its redundant output copy), two model-parallel shards,
    and two shards of a one-kv-head model (each shard holds a copy of wk/wv)."""
    # Meta's formula for the FFN width (no hidden_dim in params.json): 2*4*32/3 = 85 -> 96 with multiple_of 32
    model = tiny_model(hidden_dim=None, multiple_of=32, tie_embeddings=tied, vocab_size=96,
                       n_kv_heads=n_kv_heads)
    folder = _meta_folder(tmp_path, torch, model, n_shards)
    back = load(folder)
    assert back.args.tie_embeddings == tied and back.args.ffn_hidden_dim == 96
    for name, w in model.params.items():
        np.testing.assert_array_equal(back.params[name], bf16_to_f32(f32_to_bf16(w)), err_msg=name)


def test_meta_params_pick_rope_factor_32_for_llama32_shapes_and_8_otherwise():
    """Meta's params.json says only use_scaled_rope: Llama 3.2 1B/3B (dim 2048/16 layers, 3072/28)
    stretch by 32, Llama 3.1 by 8; an explicit rope_scale_factor wins."""
    p1b = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
               multiple_of=256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    p8b = dict(p1b, dim=4096, n_layers=32, ffn_dim_multiplier=1.3, multiple_of=1024)
    args = args_from_meta_params(p1b)
    assert args.rope_scale_factor == 32.0 and args.ffn_hidden_dim == 8192 and args.max_seq_len == 131072
    assert args_from_meta_params(p8b).rope_scale_factor == 8.0
    assert args_from_meta_params(p8b, rope_scale_factor=16).rope_scale_factor == 16.0
    assert args_from_meta_params(dict(p8b, use_scaled_rope=False)).max_seq_len == 8192


def test_legacy_non_zip_pth_files_fall_back_to_torch_when_it_is_installed(tmp_path, torch):
    model = tiny_model(hidden_dim=None, multiple_of=32, vocab_size=96)
    folder = _meta_folder(tmp_path, torch, model)
    sd = {k: torch.from_numpy(w.copy()) for k, w in model.params.items()}
    torch.save(sd, folder / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not a zip archive"):
        load_pth(folder / "consolidated.00.pth")  # our reader only knows the zip format
    assert same_params(load(folder).params, model.params)  # float32 here: exact


def test_meta_folders_without_weights_or_with_other_names_raise_clear_errors(tmp_path, torch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(dict(dim=32, n_layers=1, n_heads=4, vocab_size=96)))
    with pytest.raises(FileNotFoundError, match="consolidated"):
        load(folder)
    torch.save({"tok_embeddings.weight": torch.zeros(96, 32), "bogus.weight": torch.zeros(3)},
               folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"unexpected \['bogus.weight'\]"):
        load(folder)


def test_hf_save_of_a_float64_model_writes_float32(tmp_path):
    model = tiny_model(dtype=np.float64)
    save(model, tmp_path / "c", format="hf")
    with SafeTensorsFile(tmp_path / "c" / "model.safetensors") as f:
        assert {f.info(k)[0] for k in f.keys()} == {"F32"}
    back = load(tmp_path / "c", dtype=np.float64)
    for name, w in model.params.items():
        np.testing.assert_array_equal(back.params[name], w.astype(np.float32), err_msg=name)
    with pytest.raises(ValueError, match="cannot save format 'hf' as 'float64'"):
        save(model, tmp_path / "d", format="hf", dtype="float64")


def test_max_seq_len_can_be_overridden_at_load(tmp_path):
    save(tiny_model(), tmp_path / "a", format="llama3np")
    save(tiny_model(), tmp_path / "b", format="hf")
    assert load(tmp_path / "a", max_seq_len=32).args.max_seq_len == 32
    assert load(tmp_path / "b", max_seq_len=32).args.max_seq_len == 32
