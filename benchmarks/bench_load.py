"""Peak memory of loading a checkpoint: does `llama3np.load` hold the weights only once?

    python benchmarks/bench_load.py              # ~175M parameters: a 350 MB bf16 file, 700 MB float32
    python benchmarks/bench_load.py --small      # ~40M parameters, for a quick look

It writes a llama-shaped random model as a Hugging Face folder in bfloat16 (and, if PyTorch is
installed, as Meta's consolidated.00.pth), then loads it in a fresh process per measurement and reports
the peak resident memory above the process's baseline, divided by the size of the float32 weights.
1.00 would be perfect: the model's own arrays and nothing else. For comparison, transformers'
`from_pretrained(dtype=float32)` loads the same folder (if installed), also in a fresh process.

Peak RSS is the kernel's VmHWM, reset after the imports by writing 5 to /proc/self/clear_refs, so it
counts only the load. Memory-mapped file pages that were read count as resident too; our loader gives
them back (madvise) after copying each tensor.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The child measures one load and prints a JSON line. It pins BLAS threads and, for PyTorch, the
# OpenBLAS variables are removed from its environment (see `child_env`).
CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
kind, folder = sys.argv[1], sys.argv[2]
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(1)
if kind == "transformers":
    import torch, transformers
    torch.set_num_threads(1)
else:
    import llama3np
    from llama3np import formats, tokenizer  # import everything before the baseline


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
reset = True
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
except OSError:
    reset = False
base = status("VmRSS")
t0 = time.perf_counter()
if kind == "transformers":
    v5 = int(transformers.__version__.split(".")[0]) >= 5  # transformers 5 renamed torch_dtype= to dtype=
    kw = {{"dtype" if v5 else "torch_dtype": torch.float32}}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kw)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
else:
    model = llama3np.load(folder)
    nbytes = sum(w.nbytes for w in model.params.values())
seconds = time.perf_counter() - t0
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(base=base, peak=peak, weights=nbytes, seconds=seconds, reset=reset)))
"""


def child_env():
    """The child's environment: OpenBLAS tuning variables removed (they are set on some machines and
    would make numpy/PyTorch pick different kernels), BLAS threads pinned to 1."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def measure(kind, folder):
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), kind, folder], env=child_env(),
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_checkpoints(args, workdir):
    import numpy as np

    import llama3np
    from llama3np.formats import save

    model = llama3np.Transformer(args, seed=0)
    hf = os.path.join(workdir, "hf-bf16")
    save(model, hf, format="hf", dtype="bfloat16")
    folders = {"hf": hf}
    try:
        import torch
    except ImportError:
        return folders, model
    meta = os.path.join(workdir, "meta-bf16")
    os.makedirs(meta)
    sd = {k: torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16) for k, w in model.params.items()}
    torch.save(sd, os.path.join(meta, "consolidated.00.pth"))
    a = args
    with open(os.path.join(meta, "params.json"), "w") as f:
        json.dump(dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                       vocab_size=a.vocab_size, multiple_of=a.multiple_of,
                       ffn_dim_multiplier=a.ffn_dim_multiplier,
                       norm_eps=a.norm_eps, rope_theta=a.rope_theta, use_scaled_rope=a.use_scaled_rope), f)
    folders["meta"] = meta
    return folders, model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="a ~40M-parameter model instead of ~175M")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    opts = p.parse_args()

    import llama3np

    if opts.small:  # Meta's FFN rule: int(2*4*512/3)=1365 -> 1536 with multiple_of 256
        args = llama3np.ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32000,
                                  multiple_of=256, max_seq_len=2048)
    else:  # FFN: int(2*4*1024/3)=2730 -> 2816
        args = llama3np.ModelArgs(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=32000,
                                  multiple_of=256, max_seq_len=2048)
    n = llama3np.n_params(args)
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads / {args.n_kv_heads} kv, "
          f"vocab {args.vocab_size}: {n / 1e6:.1f}M parameters")
    print(f"bf16 file {n * 2 / 2**20:.0f} MiB, float32 weights {n * 4 / 2**20:.0f} MiB")
    print("children: OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from the environment, BLAS threads "
          "pinned to 1 (threadpoolctl, torch.set_num_threads(1))")
    with tempfile.TemporaryDirectory(prefix="bench_load_") as workdir:
        t0 = time.perf_counter()
        folders, _ = write_checkpoints(args, workdir)
        print(f"wrote the checkpoints in {time.perf_counter() - t0:.1f} s\n")
        rows = [("llama3np.load, HF bf16 safetensors", measure("llama3np", folders["hf"]))]
        if "meta" in folders:
            rows.append(("llama3np.load, Meta bf16 .pth", measure("llama3np", folders["meta"])))
        if not opts.no_transformers:
            try:
                import transformers  # noqa: F401
                rows.append(("transformers from_pretrained(float32)", measure("transformers", folders["hf"])))
            except ImportError:
                print("(transformers not installed: no comparison)")
    print(f"{'loader':40s} {'weights':>9s} {'peak extra':>11s} {'extra/weights':>14s} {'time':>7s}")
    for name, r in rows:
        extra = r["peak"] - r["base"]
        print(f"{name:40s} {r['weights'] / 2**20:6.0f} MiB {extra / 2**20:7.0f} MiB "
              f"{extra / r['weights']:14.2f} {r['seconds']:6.1f}s")
        if not r["reset"]:
            print("   (could not reset VmHWM: the peak includes the imports)")
    print("\nextra/weights = (peak RSS during load - RSS before) / float32 weight bytes; 1.00 = the weights "
          "held exactly once.\nllama3np.load builds Transformer(args, init=False) (zeros, mapped by the OS "
          "only when written) and copies each tensor into it in place.")


if __name__ == "__main__":
    main()
