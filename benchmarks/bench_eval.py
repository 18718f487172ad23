"""MMLU questions per second: llama3np.eval beside lm-evaluation-harness's way of scoring, same checkpoint.

Three ways to get the same four log-likelihoods per question, on the same model and the same prompts:
- ours: `mmlu.evaluate` - the k-shot prefix's KV cache computed once per subject, then per question only
  its own tokens (and the letters as one batch when they are several tokens);
- harness, per choice: what the issue describes - transformers' LlamaForCausalLM (float32, eager),
  one full forward over prompt + choice for every (prompt, choice) pair, all logits computed;
- harness, logits cache: lm-evaluation-harness's HFLM default (`logits_cache=True`, requests grouped by
  context): when every choice is one token, ONE full forward per prompt serves all four.
All in one process, threads pinned (BLAS, our kernels, torch), each timed once over the whole set,
interleaved; the log-likelihoods are compared too.

    python benchmarks/bench_eval.py [--preset tiny] [--threads 2] [--subjects 4] [--shots 5] [--data lm-eval-cot]
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from llama3np import backend, kernels  # noqa: E402
from llama3np.args import preset  # noqa: E402
from llama3np.eval import mmlu, scoring, story_mmlu  # noqa: E402
from llama3np.model import Transformer  # noqa: E402
from llama3np.tokenizer import Tokenizer  # noqa: E402


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_set(name, n_subjects, shots):
    """(questions, dev, leave_one_out): the real CoT dev questions if lm-eval is installed, else stories."""
    if name == "lm-eval-cot":
        try:
            from llama3np.eval import data

            q, _ = data.read_lm_eval_cot()
            q = dict(list(q.items())[:n_subjects])
            return q, q, True, f"{sum(map(len, q.values()))} real MMLU dev questions (lm-eval CoT set), " \
                               f"{n_subjects} subjects, leave-one-out {shots}-shot"
        except FileNotFoundError as e:
            print(f"({e}; using the story set)")
    q, dev = story_mmlu.generate_split(8, shots, subjects=story_mmlu.SUBJECTS[:n_subjects])
    return q, dev, False, f"{sum(map(len, q.values()))} story-world questions, {shots}-shot"


def prompts(tok, questions, dev, shots, leave_one_out):
    out = []
    for subject, items in questions.items():
        for q in items:
            prompt = mmlu.format_prompt(subject, mmlu.select_shots(dev[subject], q, shots, leave_one_out), q)
            out.append(scoring.encode_choices(tok, prompt, mmlu.continuations(q)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--data", default="lm-eval-cot", choices=("lm-eval-cot", "stories"))
    cli = parser.parse_args()
    import torch
    import transformers
    from bench_train import torch_model

    print(ENV_NOTE)
    print(f"CPU: {cpu_model()}; llama3np backend: {backend.get_backend()}"
          + (f" (micro-kernel {kernels.isa()})" if kernels.available() else ""))
    print(_env.pin_threads(cli.threads))
    tok = Tokenizer.get_instance()
    args = preset(cli.preset, vocab_size=tok.n_words, max_seq_len=4096)
    model = Transformer(args, seed=0)
    model.params["output.weight"] *= 20  # not a flat distribution: the comparison of log-likelihoods means something
    hf = torch_model(model, torch, transformers).eval()
    questions, dev, loo, what = load_set(cli.data, cli.subjects, cli.shots)
    encoded = prompts(tok, questions, dev, cli.shots, loo)
    n = len(encoded)
    mean_len = np.mean([len(c) for c, _ in encoded])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; preset {cli.preset} with Llama 3's "
          f"vocabulary ({tok.n_words}), float32; {what}; prompts {mean_len:.0f} tokens on average")

    results = {}

    def ours():
        results["ours"] = np.array([it["logprobs"] for it in
                                    mmlu.evaluate(model, tok, questions, dev, cli.shots, leave_one_out=loo)["items"]])

    def harness(per_choice):
        def run():
            rows = []
            with torch.no_grad():
                for ctx, conts in encoded:
                    if not per_choice and all(len(c) == 1 for c in conts):
                        lp = torch.log_softmax(hf(torch.tensor([ctx])).logits[0, -1].double(), -1)
                        rows.append([float(lp[c[0]]) for c in conts])
                        continue
                    row = []
                    for c in conts:
                        logits = hf(torch.tensor([ctx + c[:-1]])).logits[0, len(ctx) - 1:].double()
                        lp = torch.log_softmax(logits, -1)
                        row.append(float(sum(lp[j, t] for j, t in enumerate(c))))
                    rows.append(row)
            results["per choice" if per_choice else "logits cache"] = np.array(rows)
        return run

    fns = {"ours": ours, "harness, per choice": harness(True), "harness, logits cache": harness(False)}
    times = {}
    for name, fn in fns.items():  # once each, in turn, after a short settle (see _env.best_of_each)
        time.sleep(0.3)
        t = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t
    ref = results["per choice"]
    for name in ("ours", "logits cache"):
        err = np.max(np.abs(results[name] - ref)) / np.max(np.abs(ref))
        print(f"  max relative difference of the log-likelihoods, {name} vs per choice: {err:.1e}")
    for name, t in times.items():
        print(f"  {name:22s} {n / t:8.2f} questions/s  ({t:.1f} s for {n})")
    print(f"  ours / harness per choice   = {times['harness, per choice'] / times['ours']:.2f}x  (goal >= 3x)")
    print(f"  ours / harness logits cache = {times['harness, logits cache'] / times['ours']:.2f}x")


if __name__ == "__main__":
    main()
