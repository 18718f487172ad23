"""Load and save Llama 3 checkpoints: Hugging Face folders, Meta's original folders and our own format.

    model = llama3np.load("Llama-3.2-1B")           # a folder; the format is recognised from its files
    llama3np.save(model, "out", format="hf")        # transformers' from_pretrained reads it back
    llama3np.save(model, "out2", format="llama3np")  # our own: llama3np.json + model.safetensors

What each folder holds (the file that identifies it first):
- llama3np: `llama3np.json` (our ModelArgs) and `model.safetensors` with Meta's tensor names.
- Hugging Face: `config.json` and `model.safetensors` (or shards listed in `model.safetensors.index.json`),
  HF's tensor names, and the rows of wq/wk reordered for HF's rotate-half RoPE (undone here).
- Meta: `params.json` and `consolidated.00.pth` (more shards for 70B+), Meta's names, bf16.
- a training run of `llama3np train`: `ckpt_*.npz` files, a `latest` file or `data.npz` (read by llama3np.training).

Loading creates the model with `Transformer(args, init=False)` (zeros: no memory until written) and copies each tensor, converted to the model's
dtype, straight from the memory-mapped file into the model's arrays: the weights are never held twice.
"""
import json
import os
import re

import numpy as np

from ..args import LLAMA3_VOCAB_SIZE, ModelArgs
from ..model import Transformer
from ..fileio import atomic_write_bytes
from .safetensors_io import FLOAT_DTYPES, SafeTensorsFile, decode, save_file

LLAMA3NP_CONFIG = "llama3np.json"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
META_PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
DEFAULT_VOCAB_SIZE = LLAMA3_VOCAB_SIZE  # Meta's tokenizer: 128,000 BPE tokens + 256 special tokens

# ----------------------------------------------------------------------------------------------------
# names: Hugging Face <-> Meta

_HF_LAYER = {  # model.layers.{i}.<HF suffix> -> layers.{i}.<Meta suffix>
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
_HF_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_META_LAYER = {v: k for k, v in _HF_LAYER.items()}
_META_TOP = {v: k for k, v in _HF_TOP.items()}


def hf_to_meta_name(name: str):
    """'model.layers.3.mlp.gate_proj.weight' -> 'layers.3.feed_forward.w1.weight'; None for buffers
    we ignore (rotary_emb.inv_freq); ValueError for a name that is not part of a Llama model."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):  # a cached RoPE table some old checkpoints carry
        return None
    raise ValueError(f"unexpected tensor {name!r}: not a Llama weight name")


def meta_to_hf_name(name: str) -> str:
    if name in _META_TOP:
        return _META_TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _META_LAYER:
        return f"model.layers.{m.group(1)}.{_META_LAYER[m.group(2)]}"
    raise ValueError(f"unexpected parameter {name!r}: not a Llama weight name")


# ----------------------------------------------------------------------------------------------------
# the rotary permutation
#
# Meta's RoPE rotates adjacent pairs (x[2i], x[2i+1]) of each head; HF's rotates (x[i], x[i + hd/2]).
# HF's converter reorders the rows of wq and wk so that the same rotation happens: inside each head,
# Meta row 2i + j becomes HF row j * hd/2 + i (j = 0, 1). q has n_heads heads, k has n_kv_heads.


def _rotary_shape(w, n_heads):
    if w.ndim != 2 or w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise ValueError(f"cannot split a weight of shape {w.shape} into {n_heads} heads of even size")
    return n_heads, w.shape[0] // n_heads // 2, w.shape[1]  # (n_heads, hd/2, dim)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta -> HF (HF's converter's `permute`): (n_heads*hd, dim) rows reordered, same shape."""
    n, half, dim = _rotary_shape(w, n_heads)
    return w.reshape(n, half, 2, dim).transpose(0, 2, 1, 3).reshape(w.shape)  # (n, 2, hd/2, dim)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF -> Meta, the inverse of `permute_rotary`."""
    n, half, dim = _rotary_shape(w, n_heads)
    return w.reshape(n, 2, half, dim).transpose(0, 2, 1, 3).reshape(w.shape)  # (n, hd/2, 2, dim)


def _unpermute_into(raw, dtype_name, n_heads, out):
    """Convert an HF wq/wk into Meta's row order, writing straight into `out` (no full temporary)."""
    n, half, dim = _rotary_shape(raw, n_heads)
    src = raw.reshape(n, 2, half, dim).transpose(0, 2, 1, 3)  # (n, hd/2, 2, dim), a strided view
    decode(src, dtype_name, out.dtype, out=out.reshape(n, half, 2, dim))


# ----------------------------------------------------------------------------------------------------
# configs


def args_from_hf_config(cfg: dict, max_seq_len: int = None) -> ModelArgs:
    """A Hugging Face `config.json` (hub style, or transformers 5's `rope_parameters`) -> ModelArgs."""
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json has model_type {cfg['model_type']!r}; expected 'llama'")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {missing}, needed to build the model")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("config.json asks for biases (attention_bias/mlp_bias); Llama 3 has none")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act {cfg['hidden_act']!r}; Llama 3 uses 'silu' (SwiGLU)")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        raise ValueError(f"config.json has head_dim={head_dim} but hidden_size // num_attention_heads = "
                         f"{dim} // {n_heads} = {dim // n_heads}; llama3np needs head_dim = dim / n_heads")
    # transformers < 5 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))  # 10000 is HF's default
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(use_scaled_rope=True, rope_scale_factor=float(rope["factor"]),
                       rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ValueError(f"config.json has rope type {rope_type!r}; supported: 'default' and 'llama3'")
    return ModelArgs(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_seq_len=max_seq_len or int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), **scaling)


def hf_config_from_args(args: ModelArgs, torch_dtype="float32", tokenizer=None) -> dict:
    """ModelArgs -> a hub-style `config.json` for transformers' LlamaForCausalLM."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "hidden_act": "silu", "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": None, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    if args.use_scaled_rope:
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": args.rope_scale_factor,
            "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    if tokenizer is not None:
        cfg["bos_token_id"], cfg["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
    return cfg


# Llama 3.2 1B and 3B stretch RoPE by 32, not 8, but Meta's params.json does not say so (Meta's code
# passes the factor separately); we recognise the two shapes. Pass rope_scale_factor= to override.
_META_FACTOR_32_SHAPES = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B and 3B


def args_from_meta_params(params: dict, rope_scale_factor: float = None, max_seq_len: int = None,
                          vocab_size: int = None, tie_embeddings: bool = False) -> ModelArgs:
    """Meta's `params.json` -> ModelArgs (see the note on Llama 3.2's rope factor above)."""
    d = dict(params)
    # later llama-models releases may record the factor in params.json; it then wins over our guess
    if d.get("rope_scaling_factor") is not None:
        d["rope_scale_factor"] = d.pop("rope_scaling_factor")
    if d.get("vocab_size", -1) in (None, -1):  # llama-models' default is -1: take it from the weights
        d["vocab_size"] = vocab_size
    d.setdefault("max_seq_len", 131072 if d.get("use_scaled_rope") else 8192)
    if max_seq_len:
        d["max_seq_len"] = max_seq_len
    if rope_scale_factor is not None:
        d["rope_scale_factor"] = float(rope_scale_factor)
    elif d.get("use_scaled_rope") and "rope_scale_factor" not in d:
        d["rope_scale_factor"] = 32.0 if (d.get("dim"), d.get("n_layers")) in _META_FACTOR_32_SHAPES else 8.0
    d["tie_embeddings"] = tie_embeddings
    try:
        return ModelArgs.from_dict(d)
    except TypeError as e:
        raise ValueError(f"params.json does not describe a model: {e}") from None


# ----------------------------------------------------------------------------------------------------
# loading


def load(path, dtype=np.float32, *, rope_scale_factor: float = None, max_seq_len: int = None) -> Transformer:
    """Load a checkpoint folder (or a file inside it) into a Transformer of float `dtype`.

    Recognised folders, checked in this order: a `llama3np train` run (training.run_folder.is_run), our own
    format (llama3np.json), Hugging Face (config.json), Meta's original (params.json + consolidated.*.pth).
    `rope_scale_factor` overrides the RoPE stretch of Meta folders (params.json does not record it; we
    use 32 for the Llama 3.2 1B/3B shapes and 8 otherwise). `max_seq_len` overrides the context length
    the model accepts (HF: max_position_embeddings; Meta: 131072 with scaled RoPE, else 8192).
    `model.tokenizer` is the folder's tokenizer.model, else Meta's tokenizer if vocab_size is 128256.
    """
    folder = os.fspath(path)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"no checkpoint at {folder}")
    from ..training.run_folder import is_run, load_run  # `llama3np train` run folders: their one test and reader

    if os.path.isfile(folder) and not is_run(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    if is_run(folder):
        return load_run(folder, dtype=dtype)
    files = set(os.listdir(folder))
    if LLAMA3NP_CONFIG in files:
        model = _load_llama3np(folder, dtype, max_seq_len)
    elif HF_CONFIG in files:
        model = _load_hf(folder, dtype, max_seq_len)
    elif META_PARAMS in files:
        model = _load_meta(folder, dtype, rope_scale_factor, max_seq_len)
    else:
        raise ValueError(f"{folder} is not a checkpoint folder: looked for {LLAMA3NP_CONFIG} (llama3np), "
                         f"{HF_CONFIG} (Hugging Face), {META_PARAMS} (Meta), or ckpt_*.npz / latest / "
                         "data.npz (a training run)")
    model.tokenizer = _find_tokenizer(folder, model.args.vocab_size)
    return model


def _read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def _fill(model, sources: dict, where: str):
    """Copy every checkpoint tensor into the model. `sources`: {Meta name: (shape, fill(out))}.

    All names and shapes are checked against the model (i.e. the config) before any data is read.
    """
    params = model.params
    missing = sorted(set(params) - set(sources))
    unexpected = sorted(set(sources) - set(params))
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not match the config: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for name, (shape, _) in sources.items():
        if tuple(shape) != params[name].shape:
            raise ValueError(f"{where}: {name} has shape {tuple(shape)} in the weights but the config "
                             f"implies {params[name].shape}")
    for name, (_, fill) in sources.items():
        fill(params[name])


def _load_llama3np(folder, dtype, max_seq_len=None):
    meta = _read_json(os.path.join(folder, LLAMA3NP_CONFIG))
    if meta.get("format") != "llama3np" or not isinstance(meta.get("args"), dict):
        raise ValueError(f"{os.path.join(folder, LLAMA3NP_CONFIG)}: expected {{'format': 'llama3np', "
                         "'args': {...}}")
    d = dict(meta["args"], **({"max_seq_len": max_seq_len} if max_seq_len else {}))
    try:
        args = ModelArgs.from_dict(d)
    except TypeError as e:
        raise ValueError(f"{LLAMA3NP_CONFIG} has bad args: {e}") from None
    model = Transformer(args, dtype=dtype, init=False)
    with SafeTensorsFile(os.path.join(folder, HF_WEIGHTS)) as f:
        sources = {name: (_float_shape(f, name), _plain_fill(f, name)) for name in f.keys()}
        _fill(model, sources, f.path)
    return model


def _float_shape(f, name):
    """The shape of a tensor of a SafeTensorsFile, after checking that it holds floats."""
    dtype_name, shape = f.info(name)
    if dtype_name not in FLOAT_DTYPES:
        raise ValueError(f"{f.path}: {name} has dtype {dtype_name}; expected a float "
                         f"({', '.join(FLOAT_DTYPES)}); quantised checkpoints are not supported")
    return shape


def _plain_fill(f, name):
    def fill(out):
        decode(f.raw(name), f.info(name)[0], out.dtype, out=out)
        f.release(name)  # the pages are copied; drop them from our resident memory
    return fill


def _load_hf(folder, dtype, max_seq_len=None):
    args = args_from_hf_config(_read_json(os.path.join(folder, HF_CONFIG)), max_seq_len)
    # which file holds which tensor: one model.safetensors, or the shards of an index (as transformers)
    if os.path.isfile(os.path.join(folder, HF_WEIGHTS)):
        files = {HF_WEIGHTS: SafeTensorsFile(os.path.join(folder, HF_WEIGHTS))}
        where = {name: HF_WEIGHTS for name in files[HF_WEIGHTS].keys()}
    elif os.path.isfile(os.path.join(folder, HF_INDEX)):
        index = _read_json(os.path.join(folder, HF_INDEX))
        where = index.get("weight_map")
        if not isinstance(where, dict):
            raise ValueError(f"{os.path.join(folder, HF_INDEX)} has no weight_map")
        files = {}
        for shard in sorted(set(where.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{HF_INDEX} lists {shard}, which is not in {folder}")
            files[shard] = SafeTensorsFile(shard_path)
        for name, shard in where.items():
            if name not in files[shard]:
                raise ValueError(f"{HF_INDEX} says {name!r} is in {shard}, but that file has no such tensor")
    else:
        raise FileNotFoundError(f"{folder} has {HF_CONFIG} but neither {HF_WEIGHTS} nor {HF_INDEX} "
                                "(pytorch_model.bin files are not read: re-save them as safetensors)")
    try:
        model = Transformer(args, dtype=dtype, init=False)
        sources = {}
        for hf_name, shard in where.items():
            name = hf_to_meta_name(hf_name)
            if name is None or (name == "output.weight" and args.tie_embeddings):
                continue  # a RoPE buffer, or a copy of the embedding that tying makes redundant
            f = files[shard]
            shape = _float_shape(f, hf_name)
            n_heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}.get(
                name.split(".", 2)[-1])
            sources[name] = (shape, _hf_fill(f, hf_name, n_heads))
        _fill(model, sources, folder)
    finally:
        for f in files.values():
            f.close()
    return model


def _hf_fill(f, hf_name, n_heads):
    def fill(out):
        raw, dtype_name = f.raw(hf_name), f.info(hf_name)[0]
        if n_heads is None:
            decode(raw, dtype_name, out.dtype, out=out)
        else:  # wq (n_heads) or wk (n_kv_heads): back to Meta's interleaved-pair row order
            _unpermute_into(raw, dtype_name, n_heads, out)
        f.release(hf_name)
    return fill


# Meta's model-parallel shards (70B: 8 files) split each matrix across files: along the rows (axis 0)
# for the column-parallel layers and the vocab-parallel embedding, along the columns (axis 1) for the
# row-parallel wo and w2; norms are replicated. (As llama-models' checkpoint.py `reshard_mp`.)
_MP_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def _load_meta(folder, dtype, rope_scale_factor=None, max_seq_len=None):
    params = _read_json(os.path.join(folder, META_PARAMS))
    shard_files = sorted(f for f in os.listdir(folder) if re.fullmatch(r"consolidated\.\d+\.pth", f))
    if not shard_files:
        raise FileNotFoundError(f"{folder} has {META_PARAMS} but no consolidated.*.pth weights")
    shards = [_read_pth(os.path.join(folder, f)) for f in shard_files]
    for f, s in zip(shard_files[1:], shards[1:]):
        if set(s) != set(shards[0]):
            raise ValueError(f"{f} holds different tensor names than {shard_files[0]}")
    first = shards[0]
    if "tok_embeddings.weight" not in first:
        raise ValueError(f"{shard_files[0]} has no tok_embeddings.weight: not a Llama checkpoint")
    emb = first["tok_embeddings.weight"]
    # tied (3.2 1B/3B) when there is no separate output matrix or it is a copy of the embedding
    tied = "output.weight" not in first or (
        len(shards) == 1 and first["output.weight"].dtype == emb.dtype
        and np.array_equal(first["output.weight"].array, emb.array))
    for t in (first.get("output.weight"), emb):  # the comparison read them: give the pages back
        if t is not None and t.release is not None:
            t.release()
    args = args_from_meta_params(params, rope_scale_factor, max_seq_len,
                                 vocab_size=emb.shape[0] * len(shards), tie_embeddings=tied)
    model = Transformer(args, dtype=dtype, init=False)
    mp = len(shards)
    # with more shards than kv heads, each kv head was stored in mp // n_kv_heads shards: keep one copy
    kv_step = max(mp // args.n_kv_heads, 1)
    sources = {}
    for name in first:
        if name == "rope.freqs" or (tied and name == "output.weight"):
            continue  # Meta's stray RoPE buffer; a redundant copy of the tied embedding
        t = first[name]
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{shard_files[0]}: {name} has dtype {t.dtype}; expected a float")
        if mp == 1 or t.array.ndim == 1:
            parts, axis = [t], 0  # a single file, or a replicated norm weight
        else:
            axis = 1 if name.endswith(_MP_ROW_PARALLEL) else 0
            step = kv_step if name.endswith(("attention.wk.weight", "attention.wv.weight")) else 1
            parts = [s[name] for s in shards[::step]]
        shape = list(t.shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        sources[name] = (tuple(shape), _concat_fill(parts, axis))
    _fill(model, sources, folder)
    return model


def _read_pth(path):
    """Our torch-free reader; PyTorch (if installed) only for the legacy pre-1.6 non-zip format."""
    from .pth_io import load_pth, load_pth_with_torch

    try:
        return load_pth(path)
    except ValueError as e:
        if "not a zip archive" not in str(e):
            raise
        try:
            return load_pth_with_torch(path)
        except ImportError:
            raise e from None


def _concat_fill(parts, axis):
    def fill(out):
        start = 0
        for p in parts:
            n = p.shape[axis]
            dst = out[start:start + n] if axis == 0 else out[:, start:start + n]
            if p.shape != dst.shape:
                raise ValueError(f"a model-parallel shard of shape {p.shape} does not fit {dst.shape}")
            decode(p.array, p.dtype, out.dtype, out=dst)
            if p.release is not None:
                p.release()
            start += n
    return fill


def _find_tokenizer(folder, vocab_size):
    """The folder's tokenizer.model (or HF's original/tokenizer.model), else Meta's if the vocab fits."""
    try:
        from ..tokenizer import Tokenizer
    except ImportError:
        return None
    for candidate in (os.path.join(folder, TOKENIZER), os.path.join(folder, "original", TOKENIZER)):
        if os.path.isfile(candidate):
            tok = Tokenizer(candidate)
            if tok.n_words > vocab_size:
                raise ValueError(f"{candidate} has {tok.n_words} tokens but the model's vocab_size is "
                                 f"{vocab_size}: ids past the embedding table would be out of range")
            return tok
    return Tokenizer() if vocab_size == DEFAULT_VOCAB_SIZE else None


# ----------------------------------------------------------------------------------------------------
# saving

FORMATS = ("hf", "llama3np")


def save(model, path, format: str = "hf", dtype=None) -> None:
    """Write `model` to the folder `path` (created if needed), each file atomically.

    format="hf": config.json + model.safetensors as transformers' `LlamaForCausalLM.save_pretrained`
    writes them (HF names, wq/wk rows permuted for HF's RoPE, no lm_head when tied), float32 unless
    dtype="bfloat16". format="llama3np": llama3np.json (our ModelArgs) + model.safetensors with Meta's
    names in the model's dtype (or `dtype`). A non-default tokenizer is written as tokenizer.model.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a Transformer, got {type(model).__name__}")
    dtype_name = _save_dtype(model, format, dtype)
    folder = os.fspath(path)
    if os.path.isfile(folder):
        raise ValueError(f"{folder} is a file; save writes a folder")
    os.makedirs(folder, exist_ok=True)
    # a folder holding the other format would be read as that one by `load`: refuse to mix them
    other = HF_CONFIG if format == "llama3np" else LLAMA3NP_CONFIG
    if os.path.exists(os.path.join(folder, other)):
        raise ValueError(f"{folder} already holds a checkpoint of another format ({other}); "
                         "save into an empty folder")
    args, bf16 = model.args, dtype_name == "bfloat16"
    out_dtype = np.float32 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    if format == "hf":
        tensors = {}
        for name, w in model.params.items():
            w = w.astype(out_dtype, copy=False)
            if name.endswith("attention.wq.weight"):
                w = permute_rotary(w, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                w = permute_rotary(w, args.n_kv_heads)
            tensors[meta_to_hf_name(name)] = w
        save_file(tensors, os.path.join(folder, HF_WEIGHTS), metadata={"format": "pt"}, bf16=bf16)
        config = hf_config_from_args(args, dtype_name, model.tokenizer)
        _write_json(os.path.join(folder, HF_CONFIG), config)
    else:
        tensors = {name: w.astype(out_dtype, copy=False) for name, w in model.params.items()}
        save_file(tensors, os.path.join(folder, HF_WEIGHTS), metadata={"format": "llama3np"}, bf16=bf16)
        _write_json(os.path.join(folder, LLAMA3NP_CONFIG),
                    {"format": "llama3np", "version": 1, "dtype": dtype_name, "args": args.to_dict()})
    _save_tokenizer(model.tokenizer, folder)


def _save_dtype(model, format, dtype):
    if dtype is None:
        return "float32" if format == "hf" else model.dtype.name
    # NumPy has no bfloat16 dtype, so that one is named by a string
    name = {"bf16": "bfloat16"}.get(dtype, dtype) if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in ("float32", "float64", "bfloat16") or (format == "hf" and name == "float64"):
        allowed = "float32, bfloat16" if format == "hf" else "float32, float64, bfloat16"
        raise ValueError(f"cannot save format {format!r} as {dtype!r}; expected one of {allowed}")
    return name


def _write_json(path, obj):
    data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    atomic_write_bytes(path, data)


def _save_tokenizer(tokenizer, folder):
    if tokenizer is None:
        return
    from ..tokenizer import default_model_path

    if getattr(tokenizer, "model_path", None) is not None and \
            os.path.abspath(tokenizer.model_path) == os.path.abspath(default_model_path()):
        return  # Meta's tokenizer: `load` finds it from vocab_size, no need to copy 2 MB
    tokenizer.save(os.path.join(folder, TOKENIZER))
