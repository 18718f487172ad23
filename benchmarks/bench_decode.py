"""Greedy decoding with the KV cache, tokens/s: llama3np.generate beside transformers' generate, same model.

Both decode the same prompt greedily with a KV cache (ours: one `model.forward` per new token; theirs:
LlamaForCausalLM.generate, do_sample=False, eager attention, our weights copied in), in one process,
interleaved, best of N, at 1 and 2 threads. Prints the ratio and how many of the generated ids agree
(greedy decoding of the same float32 model: they agree until two logits are within rounding).

    python benchmarks/bench_decode.py [--presets tiny small] [--threads 1 2] [--new 128] [--prompt-len 16]
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from bench_train import torch_model  # noqa: E402
from llama3np import backend, kernels  # noqa: E402
from llama3np.args import preset  # noqa: E402
from llama3np.generation import generate  # noqa: E402
from llama3np.model import Transformer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    cli = parser.parse_args()
    import torch
    import transformers

    print(ENV_NOTE)
    print(_env.machine_note())
    print(f"llama3np backend: {backend.get_backend()}" + (f" (micro-kernel {kernels.isa()})" if kernels.available() else ""))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; greedy, float32, batch 1, "
          f"prompt {cli.prompt_len} tokens, {cli.new} new tokens, best of {cli.repeat}")
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

            times = _env.best_of_each({"transformers": theirs, **{k: on(k) for k in backends}}, cli.repeat, warmup=0)
            t_theirs, t_ours = times["transformers"], {k: times[k] for k in backends}
            line = f"  {name_}: transformers {cli.new / t_theirs:7.1f} tok/s"
            for name in backends:
                line += (f"; llama3np[{name}] {cli.new / t_ours[name]:7.1f} tok/s = {t_theirs / t_ours[name]:.2f}x "
                         f"({agree[name]}/{cli.new} greedy ids identical)")
            print(line + "  (target >= 2x)")
            backend.set_backend(backends[0])


if __name__ == "__main__":
    main()
