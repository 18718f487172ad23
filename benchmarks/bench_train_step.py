"""A whole training step (loss and all gradients) of the `small` preset: C backend beside NumPy backend.

`small` = dim 512, 8 layers, 8 heads (2 kv heads), FFN 1536, vocab 8192; a batch of 2 x 1024 tokens,
so every linear layer multiplies 2048 rows. Both backends run the same `model.loss_and_grads` in the
same process, interleaved; only `llama3np.set_backend` changes. Their losses must agree. Wall time
and CPU time are both printed: on a shared machine the CPU time of a 1-thread run is the steadier one.

    python benchmarks/bench_train_step.py [--threads 1 2] [--repeat 3] [--batch 2] [--seq 1024]
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from llama3np import backend, kernels  # noqa: E402
from llama3np.args import preset  # noqa: E402
from llama3np.model import Transformer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    cli = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"C kernels not built: {kernels.import_error}")
    args = preset("small")
    model = Transformer(args, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab_size, size=(cli.batch, cli.seq))
    targets = rng.integers(0, args.vocab_size, size=(cli.batch, cli.seq))
    print(ENV_NOTE)
    print(_env.machine_note())
    print(f"training step of `small` (dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads / "
          f"{args.n_kv_heads} kv heads), batch {cli.batch} x {cli.seq} tokens; best of {cli.repeat}; "
          f"micro-kernel {kernels.isa()}")
    losses = {}
    for n in cli.threads:
        print(_env.pin_threads(n))
        wall = {"c": float("inf"), "numpy": float("inf")}
        cpu = dict(wall)
        # interleaved, best of `repeat`: the machine is shared, so the load drifts between runs
        for _ in range(cli.repeat):
            for name in ("c", "numpy"):
                backend.set_backend(name)
                t_wall, t_cpu = time.perf_counter(), time.process_time()
                losses[name] = float(model.loss_and_grads(tokens, targets)[0])
                wall[name] = min(wall[name], time.perf_counter() - t_wall)
                cpu[name] = min(cpu[name], time.process_time() - t_cpu)
        for name in ("c", "numpy"):
            print(f"  {name:6s} {wall[name]:7.2f} s/step wall ({cli.batch * cli.seq / wall[name]:6.0f} tokens/s), "
                  f"{cpu[name]:7.2f} s CPU (all threads)  loss {losses[name]:.6f}")
        print(f"  C backend speed-up: {wall['numpy'] / wall['c']:.2f}x wall, {cpu['numpy'] / cpu['c']:.2f}x CPU time; "
              f"|loss_c - loss_numpy| = {abs(losses['c'] - losses['numpy']):.1e}")

if __name__ == "__main__":
    main()
