"""Training step (forward + backward + AdamW) tokens/s: llama3np beside PyTorch eager, same model, same threads.

PyTorch side: transformers' LlamaForCausalLM (float32, eager attention, our weights copied in) and
torch.optim.AdamW; ours: Transformer.loss_and_grads + llama3np.AdamW on the active backend (C kernels
when built). Both run interleaved in one process, best of N, at 1 and 2 threads. Also prints the model
FLOPs utilisation (MFU): the step's matmul FLOPs (6 x params-in-matmuls x tokens + attention) divided by
the time, against the machine's GEMM peak measured here (the best float32 matmul rate of numpy/OpenBLAS
and of our C kernel on a large square product), and beside it the share of the CPU's FMA peak
(kernels.fma_peak: the hardware's ceiling, which no step can beat), with the share that 1.5x PyTorch's
median step would need. Beside the wall-time ratio, the ratio of the fastest CPU
times (all threads): at 1 thread it is what a shared machine's other work disturbs least.

    python benchmarks/bench_train.py [--presets tiny small] [--threads 1 2] [--repeat 3] [--backends c numpy]
                                     [--rounds 3]
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from llama3np import backend, kernels  # noqa: E402
from llama3np.args import preset  # noqa: E402
from llama3np.formats import hf_config_from_args, meta_to_hf_name, permute_rotary  # noqa: E402
from llama3np.model import Transformer  # noqa: E402
from llama3np.optim import AdamW  # noqa: E402

SHAPES = {"tiny": (8, 256), "small": (4, 512)}  # (batch, seq_len) from the issue
TARGET = 1.5  # issue 15's goal: this many times PyTorch eager's speed


def step_flops(args, B, T):
    """Matmul FLOPs of one training step: 6 per weight per token (2 forward + 4 backward) plus attention."""
    hd, C, H, KV, F = args.head_dim, args.dim, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim
    per_layer = C * H * hd * 2 + C * KV * hd * 2 + 3 * C * F
    weights = args.n_layers * per_layer + args.vocab_size * C  # the LM head; the embedding is a lookup
    # attention: QK^T and PV, 2 * T * T * hd each per head, causal half, x3 for forward + backward
    attention = args.n_layers * H * 2 * (2 * T * T * hd) * 0.5 * 3
    return 6 * weights * B * T + attention * B


def gemm_peak(n=1024, repeat=5):
    """The best float32 GFLOP/s of a square n x n matmul with numpy (OpenBLAS) and with our C kernel."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    fns = {"numpy": lambda: a @ b}
    if kernels.available():
        fns["C"] = lambda: kernels.matmul(a, b)
    return {name: 2 * n ** 3 / t / 1e9 for name, t in _env.best_of_each(fns, repeat).items()}


def torch_model(model, torch, transformers):
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_from_args(model.args).items()
                                      if k not in ("architectures", "torch_dtype")})
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).float()
    a = model.args
    state = {}
    for name, w in model.params.items():
        if name.endswith("attention.wq.weight"):
            w = permute_rotary(w, a.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_rotary(w, a.n_kv_heads)
        state[meta_to_hf_name(name)] = torch.from_numpy(np.ascontiguousarray(w))
    hf.load_state_dict(state, strict=True)
    hf.train()
    return hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["c", "numpy"], choices=["c", "numpy"],
                        help="llama3np backends to time beside PyTorch")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each preset this many times (best of --repeat each) and print the median ratio: "
                             "a shared machine's speed drifts between rounds")
    cli = parser.parse_args()
    if cli.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {cli.rounds}")
    import torch
    import transformers

    print(ENV_NOTE)
    print(_env.machine_note())
    print(f"llama3np backend: {backend.get_backend()}" + (f" (micro-kernel {kernels.isa()})" if kernels.available() else ""))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; float32, best of {cli.repeat}")
    for n in cli.threads:
        print(_env.pin_threads(n))
        # the peak is the best of many tries (a busy neighbour only ever makes a try slower)
        peak = gemm_peak(repeat=15)
        best_peak = max(peak.values())
        print("  GEMM peak (1024^3 float32): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items()))
        # the hardware's own ceiling: FMA chains with no memory traffic, for our micro-kernel's instruction set
        fma = kernels.fma_peak(seconds=1.0, threads=n) if kernels.available() else None
        if fma:
            print(f"  FMA peak ({kernels.isa()}, float32): {fma:.1f} GFLOP/s, no step can beat; "
                  f"the best GEMM above reaches {best_peak / fma:.0%} of it")
        for name in cli.presets:
            B, T = SHAPES[name]
            args = preset(name, max_seq_len=max(T, preset(name).max_seq_len))
            model = Transformer(args, seed=0)
            hf = torch_model(model, torch, transformers)
            rng = np.random.default_rng(0)
            rows = rng.integers(0, args.vocab_size, size=(B, T + 1))
            x, y = rows[:, :-1], rows[:, 1:]
            opt = AdamW(model.params, lr=1e-4)
            topt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)

            def ours():
                loss, grads = model.loss_and_grads(x, y)
                opt.step(grads)
                return float(loss)

            def theirs():
                topt.zero_grad(set_to_none=True)
                logits = hf(input_ids=tx).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ty.reshape(-1))
                loss.backward()
                topt.step()
                return loss.item()

            backends = [k for k in cli.backends if k != "c" or kernels.available()] or ["numpy"]
            first = {}
            # same weights, same batch: the losses before any update must agree
            with torch.no_grad():
                logits = hf(input_ids=tx).logits
                first["torch"] = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                   ty.reshape(-1)).item()
            for k in backends:
                backend.set_backend(k)
                first[k] = float(model.loss_and_grads(x, y)[0])
            def on(k):  # ours() on backend k
                return lambda: (backend.set_backend(k), ours())

            cpu = {}  # the fastest CPU time (all threads) of each: steadier than wall time on a shared machine

            def cpu_timed(name, fn):
                def run():
                    t = time.process_time()
                    fn()
                    cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - t)
                return run

            fns = {"torch": theirs, **{k: on(k) for k in backends}}
            fl = step_flops(args, B, T)
            ratios = {k: [] for k in backends}
            steps = {k: [] for k in ["torch"] + backends}  # each round's best step time
            for r in range(cli.rounds):
                cpu.clear()  # each round's own fastest CPU times
                times = _env.best_of_each({k: cpu_timed(k, f) for k, f in fns.items()}, cli.repeat)
                t_theirs, t_ours = times["torch"], {k: times[k] for k in backends}
                for k, t in times.items():
                    steps[k].append(t)
                print(f"  {name} (batch {B}x{T}, {fl / 1e9:.1f} GFLOP/step"
                      + (f", round {r + 1} of {cli.rounds}" if cli.rounds > 1 else "")
                      + f"): PyTorch {B * T / t_theirs:6.0f} tok/s (MFU {fl / t_theirs / 1e9 / best_peak:.0%})")
                for k in backends:
                    ratios[k].append(t_theirs / t_ours[k])
                    print(f"      llama3np[{k}] {B * T / t_ours[k]:6.0f} tok/s = {t_theirs / t_ours[k]:.2f}x PyTorch "
                          f"(MFU {fl / t_ours[k] / 1e9 / best_peak:.0%}); CPU time {cpu[k]:.2f} s vs "
                          f"{cpu['torch']:.2f} s = {cpu['torch'] / cpu[k]:.2f}x"
                          + (" (1 thread: the figure a busy machine disturbs least)" if n == 1 else ""))
            if cli.rounds > 1:
                for k in backends:
                    print(f"      llama3np[{k}] median of {cli.rounds} rounds: {np.median(ratios[k]):.2f}x PyTorch "
                          f"({min(ratios[k]):.2f} - {max(ratios[k]):.2f})")
            if fma:
                # what the target asks of the hardware: TARGET x PyTorch's median step, as a share of the FMA peak
                need = fl / (np.median(steps["torch"]) / TARGET) / 1e9 / fma
                print(f"      at the FMA peak a step takes {fl / fma / 1e9:.3f} s; of that peak PyTorch's median step "
                      f"uses {fl / np.median(steps['torch']) / 1e9 / fma:.0%}, "
                      + ", ".join(f"llama3np[{k}]'s {fl / np.median(steps[k]) / 1e9 / fma:.0%}" for k in backends)
                      + f"; {TARGET}x PyTorch would need {need:.0%}")
            print("      loss before training: " + ", ".join(f"{k} {v:.5f}" for k, v in first.items()))
            backend.set_backend(backends[0])


if __name__ == "__main__":
    main()
