"""A DPO step and a PPO policy update, ours (NumPy + C kernels, hand-written backward) beside PyTorch
(transformers' LlamaForCausalLM + torch autograd + torch.optim.AdamW) on the same weights, same batch.

DPO step: the concatenated forward of B chosen + B rejected rows, the DPO loss with the NLL term, the
backward, one AdamW step. PPO update: the forward of B rollout rows, the clipped surrogate, the backward,
one AdamW step (the rollout itself is sampling, timed by bench_decode). Tokens/s count every row's tokens.
Both sides run interleaved in one process (llama3np.timing.best_of_each), threads pinned.

    python benchmarks/bench_posttrain.py [--threads 2] [--batch 4] [--seq 256] [--repeat 3]
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

import llama3np  # noqa: E402
from llama3np.optim import AdamW  # noqa: E402
from llama3np.posttrain import dpo_loss_and_grads  # noqa: E402
from llama3np.posttrain.ppo import policy_loss_and_grads  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="pairs (DPO) / rollouts (PPO)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    cli = parser.parse_args()
    import torch
    import transformers

    args = llama3np.preset("tiny", vocab_size=4096)
    model = llama3np.Transformer(args, seed=0)
    with tempfile.TemporaryDirectory() as d:
        llama3np.save(model, d, format="hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").float()
    hf.train()
    print(ENV_NOTE)
    print(_env.machine_note())
    print(_env.pin_threads(cli.threads))
    B, T = cli.batch, cli.seq
    rng = np.random.default_rng(0)
    chosen, rejected = rng.integers(0, args.vocab_size, (B, T)), rng.integers(0, args.vocab_size, (B, T))
    mask = np.ones((B, T), bool)
    mask[:, :T // 4] = False  # a prompt of a quarter of the row
    ref_c, ref_r = rng.standard_normal(B) - 8 * T, rng.standard_normal(B) - 8 * T
    opt = AdamW(model.params, lr=1e-6, weight_decay=0.0)
    topt = torch.optim.AdamW(hf.parameters(), lr=1e-6, weight_decay=0.0)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    tm = t(mask.astype(np.float32))

    def ours_dpo():
        _, grads, _ = dpo_loss_and_grads(model, chosen, mask, rejected, mask, ref_c, ref_r, 0.1, 0.2)
        opt.step(grads)

    def torch_seq(logits, tokens):
        lp = torch.gather(torch.log_softmax(logits[:, :-1], -1), 2, tokens[:, 1:, None])[..., 0]
        return lp

    def torch_dpo():
        topt.zero_grad()
        logits = hf(torch.cat([t(chosen), t(rejected)])).logits
        lp = torch_seq(logits, torch.cat([t(chosen), t(rejected)])) * torch.cat([tm, tm])[:, 1:]
        pc, pr = lp[:B].sum(1), lp[B:].sum(1)
        z = 0.1 * ((pc - t(ref_c).float()) - (pr - t(ref_r).float()))
        loss = -torch.nn.functional.logsigmoid(z).mean() + 0.2 * (-lp[:B].sum() / tm[:, 1:].sum())
        loss.backward()
        topt.step()

    old = rng.standard_normal((B, T)) * 0.1 - 7.0
    adv = rng.standard_normal((B, T))

    def ours_ppo():
        _, grads, _ = policy_loss_and_grads(model, chosen, old, adv, mask, 0.2)
        opt.step(grads)

    def torch_ppo():
        topt.zero_grad()
        lp = torch_seq(hf(t(chosen)).logits, t(chosen))
        ratio = torch.exp(lp - t(old[:, 1:]).float())
        a = t(adv[:, 1:]).float()
        pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 0.8, 1.2))
        loss = (pg * tm[:, 1:]).sum() / tm[:, 1:].sum()
        loss.backward()
        topt.step()

    print(f"`tiny` (dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}); {B} x {T} tokens per side")
    for name, ours, theirs, n_tokens in (("DPO step", ours_dpo, torch_dpo, 2 * B * T),
                                         ("PPO update", ours_ppo, torch_ppo, B * T)):
        times = _env.best_of_each({"ours": ours, "torch": theirs}, repeat=cli.repeat)
        print(f"  {name:10s} ours {n_tokens / times['ours']:8.0f} tokens/s ({times['ours']:.3f} s)   "
              f"PyTorch {n_tokens / times['torch']:8.0f} tokens/s ({times['torch']:.3f} s)   "
              f"ratio {times['torch'] / times['ours']:.2f}x")


if __name__ == "__main__":
    main()
