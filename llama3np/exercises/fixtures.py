"""Reference fixtures: float64 inputs and the solutions' outputs, one .npz per exercise.

    llama3np exercises fixtures          (in the solved package; writes llama3np/exercises/fixtures/*.npz)

Every file records how it was made under `_meta` (JSON): the exercise, the seed, the config (shapes,
hyper-parameters), the generator and NumPy's version. The grading tests read these instead of calling
the student's other exercises, so the exercises can be done in any order. Nothing here runs during
grading; a student version cannot regenerate them (its solutions are stubs).
"""
import json
from pathlib import Path

import numpy as np

from . import testing

SEED = 1234


def _rng(offset):
    return np.random.default_rng(SEED + offset)


# ---------------------------------------------------------------------------------------------------
# one generator per exercise: -> (arrays, config)


def ex01():
    from ..gradcheck import numerical_grad

    x = _rng(1).standard_normal((3, 4))
    w = _rng(2).standard_normal((3, 4))
    grad = numerical_grad(lambda: float(np.sum(np.sin(x) * w * x)), x)
    return {"x": x, "w": w, "grad": grad}, {"f": "sum(sin(x) * w * x)", "h": 1e-5}


def ex02():
    from .. import ops

    rng = _rng(2)
    tokens = np.array([[3, 1, 3, 0], [5, 3, 1, 1]])  # repeated ids: the gradient must accumulate
    weight = rng.standard_normal((7, 5))
    dout = rng.standard_normal((2, 4, 5))
    _, cache = ops.embedding_forward(tokens, weight)
    return {"tokens": tokens, "weight": weight, "dout": dout,
            "dweight": ops.embedding_backward(dout, cache)}, {"vocab": 7, "dim": 5}


def ex03():
    from .. import ops

    rng = _rng(3)
    x = rng.standard_normal((2, 3, 6))
    w = rng.standard_normal((4, 6))
    dout = rng.standard_normal((2, 3, 4))
    _, cache = ops.linear_forward(x, w)
    return {"x": x, "weight": w, "dout": dout, "dx": ops.linear_backward_input(dout, cache),
            "dweight": ops.linear_backward_weight(dout, cache)}, {"in": 6, "out": 4}


def ex04a():
    from .. import ops

    rng = _rng(4)
    x = rng.standard_normal((2, 3, 8)) * 3
    w = rng.standard_normal(8)
    y, (xhat, rstd, _) = ops.rmsnorm_forward(x, w, 1e-5)
    return {"x": x, "weight": w, "y": y, "xhat": xhat, "rstd": rstd}, {"eps": 1e-5}


def ex04b():
    from .. import ops

    rng = _rng(5)
    x = rng.standard_normal((2, 3, 8))
    w = rng.standard_normal(8)
    dout = rng.standard_normal((2, 3, 8))
    _, (xhat, rstd, _) = ops.rmsnorm_forward(x, w, 1e-5)
    dx, dw = ops.rmsnorm_backward(dout, (xhat, rstd, w))
    return {"x": x, "weight": w, "xhat": xhat, "rstd": rstd, "dout": dout, "dx": dx, "dweight": dw}, {"eps": 1e-5}


def _qkv(rng, B, H, KV, T, hd, S=None):
    S = S or T
    return (rng.standard_normal((B, H, T, hd)), rng.standard_normal((B, KV, S, hd)),
            rng.standard_normal((B, KV, S, hd)))


def ex05a():
    from .. import ops

    rng = _rng(6)
    arrays = {}
    for name, (H, KV, T, S) in {"mha": (2, 2, 5, 5), "gqa": (4, 2, 5, 5), "decode": (4, 1, 1, 6)}.items():
        q, k, v = _qkv(rng, 2, H, KV, T, 4, S)
        out, lse = ops.attention_forward(q, k, v)
        arrays.update({f"{name}.q": q, f"{name}.k": k, f"{name}.v": v, f"{name}.out": out, f"{name}.lse": lse})
    q, k, v = _qkv(rng, 2, 4, 2, 5, 4)
    kv_start = np.array([[0, 0, 2, 2, 2], [0, 1, 1, 3, 3]])
    out, lse = ops.attention_forward(q, k, v, True, kv_start)
    arrays.update({"docs.q": q, "docs.k": k, "docs.v": v, "docs.kv_start": kv_start, "docs.out": out,
                   "docs.lse": lse})
    return arrays, {"cases": {"mha": "H=KV=2, T=S=5", "gqa": "H=4, KV=2", "decode": "T=1, S=6",
                              "docs": "kv_start (packed documents)"}, "hd": 4, "B": 2}


def ex05b():
    from .. import ops

    rng = _rng(7)
    arrays = {}
    for name, (H, KV, T, S) in {"mha": (2, 2, 5, 5), "gqa": (4, 2, 5, 5), "mqa": (3, 1, 4, 4),
                                "decode": (2, 1, 2, 5)}.items():
        q, k, v = _qkv(rng, 2, H, KV, T, 4, S)
        out, lse = ops.attention_forward(q, k, v)
        dout = rng.standard_normal(out.shape)
        dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse)
        arrays.update({f"{name}.{k_}": a for k_, a in dict(q=q, k=k, v=v, out=out, lse=lse, dout=dout, dq=dq,
                                                            dk=dk, dv=dv).items()})
    return arrays, {"cases": {"mha": "H=KV=2", "gqa": "H=4, KV=2", "mqa": "H=3, KV=1", "decode": "T=2, S=5"},
                    "hd": 4, "B": 2}


def ex06a():
    from .. import ops

    rng = _rng(8)
    x = rng.standard_normal((2, 5, 3, 8))
    freqs = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
    cos, sin = ops.rope_cos_sin(freqs, 2, 5, np.float64)
    out, _ = ops.rope_forward(x, cos, sin)
    return {"x": x, "cos": cos, "sin": sin, "out": out}, {"theta": 10000.0, "start_pos": 2, "head_dim": 8}


def ex06b():
    from .. import ops

    rng = _rng(9)
    dout = rng.standard_normal((2, 5, 3, 8))
    freqs = 1.0 / (500000.0 ** (np.arange(0, 8, 2) / 8))
    cos, sin = ops.rope_cos_sin(freqs, 0, 5, np.float64)
    return {"dout": dout, "cos": cos, "sin": sin, "dx": ops.rope_backward(dout, (cos, sin))}, \
        {"theta": 500000.0, "start_pos": 0, "head_dim": 8}


def ex07():
    from .. import ops

    rng = _rng(10)
    a = rng.standard_normal((2, 3, 6)) * 3
    b = rng.standard_normal((2, 3, 6))
    dout = rng.standard_normal((2, 3, 6))
    y, cache = ops.swiglu_forward(a, b)
    da, db = ops.swiglu_backward(dout, cache)
    return {"a": a, "b": b, "y": y, "dout": dout, "da": da, "db": db}, {}


def ex08():
    from .. import ops

    rng = _rng(11)
    logits = rng.standard_normal((2, 4, 7)) * 2
    targets = rng.integers(0, 7, (2, 4))
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=bool)
    arrays = {"logits": logits, "targets": targets, "mask": mask}
    for name, m in (("plain", None), ("masked", mask)):
        loss, cache = ops.cross_entropy_forward(logits, targets, m)
        arrays[f"{name}.dlogits"] = ops.cross_entropy_backward(0.7, cache)
        arrays[f"{name}.loss"] = np.array(loss)
    return arrays, {"dloss": 0.7}


BLOCK_CONFIG = dict(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=8,
                    max_seq_len=16, norm_eps=1e-5, rope_theta=10000.0)


def _block_setup(seed):
    from .. import model, ops
    from ..args import ModelArgs

    args = ModelArgs(**BLOCK_CONFIG)
    params = model.init_params(args, seed, np.float64)
    layer = {k: v for k, v in params.items() if k.startswith("layers.0.")}
    for k in layer:  # norm weights away from 1, so a missing weight gradient shows
        if k.endswith("norm.weight"):
            layer[k] = layer[k] + _rng(seed).standard_normal(layer[k].shape) * 0.3
    freqs = ops.rope_frequencies(args)
    return args, layer, freqs


def _backend_targets():
    from .. import backend, ops

    return [(ops, "rmsnorm_backward"), (ops, "rope_backward"), (ops, "swiglu_backward"),
            (backend, "attention_backward"), (backend, "linear_backward"), (backend, "linear_backward_input"),
            (backend, "linear_backward_weight")]


def ex09():
    from .. import backend, model, ops

    backend.set_backend("numpy")
    args, layer, freqs = _block_setup(12)
    rng = _rng(12)
    B, T = 2, 5
    x = rng.standard_normal((B, T, args.dim))
    dout = rng.standard_normal((B, T, args.dim))
    rope = ops.rope_cos_sin(freqs, 0, T, np.float64)
    _, bc = model.block_forward(layer, 0, x, rope, args)
    arrays = {"x": x, "dout": dout}
    store = {}
    bc_tree = testing.flatten(bc, "bc", arrays)
    grads = {}
    with testing.record_calls(_backend_targets(), store, "sub", arrays):
        dx = model.block_backward(0, dout, bc, grads)
    arrays.update(store)
    arrays["bc.tree"] = np.array(json.dumps(bc_tree))
    arrays["dx"] = dx
    for k, g in grads.items():
        arrays[f"grad.{k}"] = g
    return arrays, dict(BLOCK_CONFIG, B=B, T=T, backend="numpy")


def _forward_targets():
    from .. import backend, ops

    return [(ops, "rmsnorm_forward"), (ops, "rope_forward"), (ops, "swiglu_forward"),
            (backend, "attention_forward"), (backend, "linear_forward")]


def ex14():
    from .. import backend, model, ops
    from ..args import ModelArgs

    backend.set_backend("numpy")
    args, layer, freqs = _block_setup(14)
    rng = _rng(14)
    B, T0, L = 2, 3, 8
    arrays, store = {}, {}
    cache = model.KVCache(ModelArgs(**BLOCK_CONFIG), B, L, np.float64)
    x0 = rng.standard_normal((B, T0, args.dim))
    x1 = rng.standard_normal((B, 1, args.dim))
    arrays["x0"], arrays["x1"] = x0, x1
    arrays.update({f"p.{k}": v for k, v in layer.items()})
    rope0, rope1 = ops.rope_cos_sin(freqs, 0, T0, np.float64), ops.rope_cos_sin(freqs, T0, 1, np.float64)
    arrays["rope0.cos"], arrays["rope0.sin"], arrays["rope1.cos"], arrays["rope1.sin"] = *rope0, *rope1
    with testing.record_calls(_forward_targets(), store, "prefill", arrays):
        out0, _ = model.block_forward(layer, 0, x0, rope0, args, None, 0, cache)
    arrays.update(store)
    arrays["out0"], arrays["cache_k0"], arrays["cache_v0"] = out0, cache.cache_k[0].copy(), cache.cache_v[0].copy()
    store = {}
    with testing.record_calls(_forward_targets(), store, "decode", arrays):
        out1, _ = model.block_forward(layer, 0, x1, rope1, args, None, T0, cache)
    arrays.update(store)
    arrays["out1"], arrays["cache_k1"], arrays["cache_v1"] = out1, cache.cache_k[0].copy(), cache.cache_v[0].copy()
    return arrays, dict(BLOCK_CONFIG, B=B, prefill=T0, max_seq_len_cache=L, backend="numpy")


def ex10():
    from ..optim import AdamW

    rng = _rng(15)
    params = {"w": rng.standard_normal((3, 4)), "g": rng.standard_normal(4)}
    start = {k: v.copy() for k, v in params.items()}
    opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    arrays = {"w0": start["w"], "g0": start["g"]}
    for t in range(3):
        grads = {"w": rng.standard_normal((3, 4)), "g": rng.standard_normal(4)}
        lr = 1e-2 if t < 2 else 5e-3
        opt.step(grads, lr=lr)
        arrays.update({f"grad{t}.w": grads["w"], f"grad{t}.g": grads["g"], f"lr{t}": np.array(lr),
                       f"after{t}.w": params["w"].copy(), f"after{t}.g": params["g"].copy(),
                       f"m{t}.w": opt.m["w"].copy(), f"v{t}.w": opt.v["w"].copy()})
    return arrays, {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "steps": 3}


LR_CASES = ((6e-4, 10, 100, 0.1), (1e-3, 1, 20, 0.0), (3e-4, 5, 6, 0.1), (3e-4, 0, 50, 0.01))


def ex11():
    from ..optim import get_lr

    arrays = {}
    for i, (max_lr, warmup, total, ratio) in enumerate(LR_CASES):
        arrays[f"case{i}"] = np.array([get_lr(s, max_lr, warmup, total, ratio) for s in range(total + 5)])
    return arrays, {"cases": [list(c) for c in LR_CASES], "fields": "max_lr, warmup_steps, total_steps, min_lr_ratio"}


def ex12():
    from ..optim import clip_grad_norm

    rng = _rng(16)
    arrays = {}
    for name, max_norm in (("clipped", 1.0), ("kept", 100.0)):
        grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
        arrays[f"{name}.a"], arrays[f"{name}.b"] = grads["a"].copy(), grads["b"].copy()
        norm = clip_grad_norm(grads, max_norm)
        arrays[f"{name}.norm"] = np.array(norm)
        arrays[f"{name}.a_out"], arrays[f"{name}.b_out"] = grads["a"], grads["b"]
        arrays[f"{name}.max_norm"] = np.array(max_norm)
    return arrays, {"cases": ["clipped (max_norm 1)", "kept (max_norm 100)"]}


BPE_TEXT_SEED = 17


def bpe_text(n_words=400, seed=BPE_TEXT_SEED):
    """A small generated text (no third-party data): words from a few syllables, with repeats."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ra", "tu", "ne", "so", "ba", "ri", "do"]
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(60)]
    return " ".join(words[int(i)] for i in rng.zipf(1.5, n_words) % len(words)) + ". 123 4567!"


def ex13a():
    from ..bpe import merge

    rng = _rng(18)
    arrays = {}
    for i in range(6):
        ids = rng.integers(0, 4, 20)
        pair = tuple(int(v) for v in rng.integers(0, 4, 2))
        arrays[f"case{i}.ids"], arrays[f"case{i}.pair"] = ids, np.array(pair)
        arrays[f"case{i}.out"] = np.array(merge([int(v) for v in ids], pair, 99))
    return arrays, {"new_id": 99, "cases": 6}


def ex13b():
    from collections import Counter

    from ..bpe import learn_merges, pretokenize

    counts = Counter(pretokenize(bpe_text()))
    vocab = learn_merges(counts, 40)
    learned = vocab[256:]
    return {"lengths": np.array([len(t) for t in learned]),
            "bytes": np.frombuffer(b"".join(learned), dtype=np.uint8)}, \
        {"text": "exercises.fixtures.bpe_text(400, seed 17)", "n_merges": 40}


def ex15():
    from ..generation import sample_next

    rng = _rng(19)
    logits = rng.standard_normal((4, 40)) * 2
    arrays = {"logits": logits}
    cases = [(1.0, 0.9), (0.7, 0.5), (1.3, 0.95), (1.0, 1.0), (1.0, 0.05)]
    for i, (temperature, top_p) in enumerate(cases):
        draws = [sample_next(logits, temperature, top_p, None, np.random.default_rng(100 + s)) for s in range(20)]
        arrays[f"case{i}"] = np.stack(draws)
    return arrays, {"cases": [list(c) for c in cases], "seeds": "100..119, one generator per draw"}


def _ring_inputs(rng):
    return {n: rng.standard_normal((n, 11)) for n in (2, 3, 4)}


def ex16a():
    rng = _rng(20)
    arrays = {}
    for n, x in _ring_inputs(rng).items():
        arrays[f"n{n}.x"] = x
        arrays[f"n{n}.sum"] = x.sum(0)
        arrays[f"n{n}.max"] = x.max(0)
    return arrays, {"world_sizes": [2, 3, 4], "length": 11}


def ex16b():
    rng = _rng(21)
    arrays = {}
    for n, x in _ring_inputs(rng).items():
        arrays[f"n{n}.x"] = x
    return arrays, {"world_sizes": [2, 3, 4], "length": 11}


ONE_F_ONE_B_CASES = ((1, 1), (2, 4), (4, 4), (4, 8), (3, 2), (4, 1))


def ex17():
    from ..parallel import schedule

    arrays = {}
    for p, m in ONE_F_ONE_B_CASES:
        arrays[f"p{p}m{m}"] = np.array(json.dumps([[list(a) for a in acts] for acts in schedule.one_f_one_b(p, m)]))
    return arrays, {"cases": [list(c) for c in ONE_F_ONE_B_CASES]}


def ex18():
    rng = _rng(22)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    b = rng.standard_normal((7, 3)).astype(np.float32)
    return {"a": a, "b": b, "c": a.astype(np.float64) @ b.astype(np.float64)}, {"M": 5, "K": 7, "N": 3}


def ex19():
    from ..posttrain import losses

    rng = _rng(23)
    x = [rng.standard_normal(6) * 3 - 20 for _ in range(4)]
    arrays = {"pc": x[0], "pr": x[1], "rc": x[2], "rr": x[3]}
    cases = {"sigmoid": dict(beta=0.1), "cdpo": dict(beta=0.5, label_smoothing=0.2),
             "ipo": dict(beta=0.3, loss_type="ipo")}
    for name, kw in cases.items():
        loss, cache = losses.dpo_forward(*x, **kw)
        dc, dr = losses.dpo_backward(0.5, cache)
        arrays.update({f"{name}.loss": np.array(loss), f"{name}.dchosen": dc, f"{name}.drejected": dr})
    return arrays, {"cases": cases, "dloss": 0.5}


def ex20():
    from ..posttrain import losses

    rng = _rng(24)
    rewards = rng.standard_normal((3, 6))
    values = rng.standard_normal((3, 6))
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    arrays = {"rewards": rewards, "values": values, "mask": mask}
    for name, (gamma, lam) in {"default": (1.0, 0.95), "discounted": (0.9, 0.8), "td": (0.99, 0.0)}.items():
        adv, ret = losses.gae_loop(rewards, values, mask, gamma, lam)
        arrays.update({f"{name}.adv": adv, f"{name}.ret": ret})
    return arrays, {"cases": {"default": [1.0, 0.95], "discounted": [0.9, 0.8], "td": [0.99, 0.0]}}


class TableModel:
    """A stand-in language model for ex21: the logits of position t depend on token t alone (a bigram
    table), so the scoring exercise never runs the student's transformer."""

    def __init__(self, table):
        self.table = np.asarray(table, dtype=np.float64)

    def forward(self, tokens, start_pos=0, cache=None):
        return self.table[np.asarray(tokens)]  # (B, T, V)


def ex21():
    from ..eval.scoring import loglikelihood_full

    rng = _rng(25)
    table = rng.standard_normal((12, 12)) * 2
    context = np.array([1, 5, 7, 2, 9])
    choices = np.array([[3], [4], [10, 11], [6, 0, 8]], dtype=object)
    arrays = {"table": table, "context": context}
    for i, c in enumerate(choices):
        arrays[f"choice{i}"] = np.array(c, dtype=np.int64)
        arrays[f"ll{i}"] = np.array(loglikelihood_full(TableModel(table), list(context), list(c)))
    return arrays, {"vocab": 12, "model": "TableModel: logits[t] = table[token t]", "choices": 4}


def ex23():
    from ..data.curation.minhash import signatures_from_hashes

    rng = _rng(26)
    offsets = np.array([0, 3, 4, 12, 20, 2100])  # the last document straddles two chunks of 1024
    hashes = rng.integers(0, 2**64, size=offsets[-1], dtype=np.uint64)
    return {"hashes": hashes, "offsets": offsets, "sig": signatures_from_hashes(hashes, offsets, 16, seed=3)}, \
        {"num_perm": 16, "seed": 3, "documents": 5}


GENERATORS = {name: fn for name, fn in globals().items() if name.startswith("ex") and callable(fn)}


def generate(ids=None, out_dir=None):
    """Write the fixtures of these exercises (all that have a generator if empty) -> paths written."""
    from ..fileio import atomic_write

    out_dir = Path(out_dir or testing.FIXTURES)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ids or sorted(GENERATORS)
    unknown = [i for i in names if i not in GENERATORS]
    if unknown:
        raise ValueError(f"no fixture generator for {unknown}; generators exist for {sorted(GENERATORS)}")
    from .. import backend

    paths = []
    for name in names:
        before = backend.get_backend()  # the block exercises record on the NumPy backend: put it back after
        try:
            arrays, config = GENERATORS[name]()
        finally:
            backend.set_backend(before)
        arrays = {k: (np.asarray(a, dtype=np.float64) if np.asarray(a).dtype.kind == "f" else np.asarray(a))
                  for k, a in arrays.items()}
        meta = {"exercise": name, "seed": SEED, "config": config, "generated_by": "llama3np exercises fixtures",
                "generator": f"llama3np.exercises.fixtures.{name}", "numpy": np.__version__}
        arrays["_meta"] = np.array(json.dumps(meta))
        path = out_dir / f"{name}.npz"
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        paths.append(path)
    return paths
