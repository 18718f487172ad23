"""Greedy decoding with the KV cache, tokens/s: llama3np.generate beside transformers' generate, same model.

Both decode the same prompt greedily with a KV cache (ours: one `model.forward` per new token; theirs:
LlamaForCausalLM.generate, do_sample=False, eager attention, our weights copied in), in one process,
interleaved, best of N, at 1 and 2 threads. Prints the ratio and how many of the generated ids agree
(greedy decoding of the same float32 model: they agree until two logits are within rounding).

Then the bandwidth: a decode step reads every weight once (the LM head included, one row of the
embedding table), so tokens/s x bytes of weights is the rate at which our decode reads them; it is
printed beside one thread's read bandwidth (np.max over --bandwidth-mb of memory, more than the L3 by
default, timed in the same interleaved rounds as the decodes) and as a percentage of it. On a CPU whose L3
holds the weights the percentage can exceed 100% (the weights then come from L3, not memory): the L3 size
is printed too.

    python benchmarks/bench_decode.py [--presets tiny small] [--threads 1 2] [--new 128] [--prompt-len 16]
    LLAMA3NP_BENCH_ISA=avx2 python benchmarks/bench_decode.py    # as on an AVX2 CPU (see _env.py)
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench_train import torch_model  # noqa: E402
from llama3np import backend, kernels  # noqa: E402
from llama3np.args import preset  # noqa: E402
from llama3np.generation import generate  # noqa: E402
from llama3np.model import Transformer  # noqa: E402


def weight_bytes(model):
    """Bytes a decode step reads: every weight once, but only one row of the embedding table (unless
    the LM head is the embedding table itself)."""
    p = model.params
    total = sum(x.nbytes for name, x in p.items() if name != "tok_embeddings.weight")
    emb = p["tok_embeddings.weight"]
    return total + (emb.nbytes if "output.weight" not in p else emb.nbytes // emb.shape[0])


class BandwidthProbe:
    """One thread's read bandwidth: `read()` reads `mb` MB (np.max of float32 ones: a vectorized pass that only
    reads) `passes` times, keeping the fastest pass since `reset()`. read() is timed among the decode runs
    (best_of_each), so that the bandwidth and the decode it is compared with are measured at the same time:
    measured once up front, on this 2-core machine whose other core's work shares the memory, one-thread
    bandwidth read anywhere from 21 to 34 GB/s. Several passes a call, because a pass takes ~20 ms where a
    decode run takes ~1 s: with one pass a call (3 in all) a slow moment could spoil every pass, as in one run
    that printed 11.6 GB/s beside a decode reading 21.8 GB/s."""

    def __init__(self, mb, passes=5):
        self.x = np.ones(mb * 2**20 // 4, dtype=np.float32)
        self.passes = passes
        self.reset()

    def reset(self):
        self.fastest = float("inf")

    def read(self):
        for _ in range(self.passes):
            t = time.perf_counter()
            float(self.x.max())
            self.fastest = min(self.fastest, time.perf_counter() - t)

    def gb_per_s(self):
        return self.x.nbytes / self.fastest / 1e9


def l3_bytes():
    """The L3 cache size in bytes (Linux sysfs), or 0 when unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{index}/level") as f:
                if f.read().strip() != "3":
                    continue
            with open(f"{base}/{index}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--bandwidth-mb", type=int, default=0,
                        help="memory read to measure the bandwidth (default: 4x the L3, at least 512 MB)")
    cli = parser.parse_args()
    import torch
    import transformers

    print(ENV_NOTE)
    print(_env.machine_note())
    print(f"llama3np backend: {backend.get_backend()}" + (f" (micro-kernel {kernels.isa()})" if kernels.available() else ""))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; greedy, float32, batch 1, "
          f"prompt {cli.prompt_len} tokens, {cli.new} new tokens, best of {cli.repeat}")
    l3 = l3_bytes()
    mb = cli.bandwidth_mb or max(512, 4 * l3 // 2**20)
    probe = BandwidthProbe(mb)
    print(f"one thread's read bandwidth: np.max over {mb} MB (L3 {l3 / 2**20:.0f} MB), the fastest of "
          f"{probe.passes} passes in each of the rounds of the decode runs")
    for n in cli.threads:
        print(_env.pin_threads(n))
        for name_ in cli.presets:
            args = preset(name_)
            model = Transformer(args, seed=0)
            # scale the LM head so greedy choices are not near-ties of a random model
            model.params["output.weight"] *= 20
            hf = torch_model(model, torch, transformers).eval()
            hf.generation_config.eos_token_id = None
            hf.generation_config.pad_token_id = 0
            prompt = np.random.default_rng(0).integers(0, args.vocab_size, size=cli.prompt_len).tolist()
            tp = torch.tensor([prompt])

            def ours():
                return generate(model, prompt, cli.new, temperature=0)

            def theirs():
                with torch.no_grad():
                    out = hf.generate(tp, max_new_tokens=cli.new, min_new_tokens=cli.new, do_sample=False,
                                      use_cache=True, temperature=None, top_p=None, top_k=None)
                return out[0, len(prompt):].tolist()

            backends = ["c", "numpy"] if kernels.available() else ["numpy"]
            ref = theirs()
            agree = {}
            for name in backends:
                backend.set_backend(name)
                a = ours()
                agree[name] = next((i for i, (x, y) in enumerate(zip(a, ref)) if x != y), min(len(a), len(ref)))
            def on(k):  # ours() on backend k
                return lambda: (backend.set_backend(k), ours())

            probe.reset()
            times = _env.best_of_each({"transformers": theirs, **{k: on(k) for k in backends}, "bandwidth": probe.read},
                                      cli.repeat, warmup=0)
            bandwidth = probe.gb_per_s()
            t_theirs, t_ours = times["transformers"], {k: times[k] for k in backends}
            line = f"  {name_}: transformers {cli.new / t_theirs:7.1f} tok/s"
            for name in backends:
                line += (f"; llama3np[{name}] {cli.new / t_ours[name]:7.1f} tok/s = {t_theirs / t_ours[name]:.2f}x "
                         f"({agree[name]}/{cli.new} greedy ids identical)")
            print(line + "  (target >= 2x)")
            wb = weight_bytes(model)
            if "c" in t_ours:
                rate = wb * cli.new / t_ours["c"] / 1e9
                fits = " (they fit in the L3)" if wb < l3 else ""
                print(f"    weights read per token {wb / 1e6:.0f} MB{fits}: llama3np[c] reads {rate:.1f} GB/s = "
                      f"{100 * rate / bandwidth:.0f}% of one thread's read bandwidth measured beside it, "
                      f"{bandwidth:.1f} GB/s (target >= 80%)")
            backend.set_backend(backends[0])


if __name__ == "__main__":
    main()
