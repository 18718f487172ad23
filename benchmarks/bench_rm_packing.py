"""Reward-model training on packed rows (Llama 3, 4.1.2: the prompt once, then a group's replies shuffled, one row)
beside the unpacked pairs (two rows per pair), at equal steps, on the story task where the truth is known.

The base: the demo's story model (`tiny`, pre-trained here with posttrain.demo.pretrain, no SFT), or --model.
The data: per training instruction one group of minimal edits, ranked by the exact checker (the story of one seed
with every demand forced > one demand dropped > none forced; demo.minimal_pairs' construction, kept as groups).
Three runs from the same weights, same steps, same learning rate:
    packed            --groups G groups per step, one packed row each (every ordered pair of a row a term)
    unpacked          G pairs per step (the demo's batch: batch_size pairs)
    unpacked, =pairs  as many pairs per step as the packed run sees on average
Printed per run: pairs and token positions per step (computed, padding included; and real tokens), wall time per
step in the training run, held-out pairwise accuracy (pairs scored in separate rows, as the reward model is used)
on held-out minimal edits and on demo.preference_data's held-out pairs (the demo's figure). Then one training step
of each run's first batch (forward, backward, AdamW), the three timed interleaved (_env.best_of_each: same load).

    python benchmarks/bench_rm_packing.py [--threads 1] [--steps 150] [--groups 8] [--pretrain-steps 400] [--small]
    python benchmarks/bench_rm_packing.py --model runs/posttrain/sft     # from the demo's SFT model

Measured (2 Dec 2026; Xeon family 6 model 167, avx512, 1 thread, load average 4-5 on 2 cores from other work;
base `tiny` pre-trained 400 steps, no SFT; 1469 groups of 2.73 minimal edits; lr 3e-4, pooling mean; held out:
237 minimal-edit pairs (standard error ~0.03) and 114 demo pairs):
    run               pairs/step positions/step  s/step   acc minimal / demo, 150 steps   300 steps
    packed (8 rows)         20.1           2964  1.4-1.6          0.608 / 0.588          0.616 / 0.614
    unpacked (8 pairs)       8.0           2659  1.0-1.5          0.658 / 0.596          0.629 / 0.623
    unpacked (20 pairs)     20.0           6809  2.5-3.0          0.705 / 0.614          0.797 / 0.684
  one step interleaved (best of 3-5): packed 1.40-1.44 s, unpacked 8 pairs 1.18-1.29 s, 20 pairs 2.87-2.88 s.
Packing sees 2.5x the pairs of the demo's batch for ~1.1x its time (half the time of the same pairs unpacked),
but here its accuracy is that of the 8-pair run, not of the 20-pair one: its training loss sits at ln 2 for ~100
steps before falling. Minimal edits are near-copies of each other, and in a packed row a later reply attends to an
earlier near-copy: in the 150-step packed model a later reply's reward moves by std 0.26 between its packed row
and a row of its own, against a std of 0.34 for better - worse. Meta's "without a loss in accuracy" does not hold
on this task at this size; it may on replies that differ more.
"""
import _env

ENV_NOTE = _env.clean_blas_env()

import argparse  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from llama3np.posttrain import demo as D  # noqa: E402
from llama3np.posttrain import reward_model as R  # noqa: E402
from llama3np.posttrain import story_task as task  # noqa: E402
from llama3np.posttrain.logprobs import clone_model  # noqa: E402
from llama3np.tokenizer import ChatFormat  # noqa: E402


def minimal_groups(fmt, instructions, seed, max_seq_len):
    """demo.minimal_pairs' data as groups (prompt, [replies best first]), cut to max_seq_len (R.fit_groups)."""
    rng = random.Random(seed)
    groups = []
    for ins in instructions:
        d, s = list(ins.demands), rng.randrange(10**9)
        texts = list(dict.fromkeys(task.write_story(tuple(f), s) for f in (d, rng.sample(d, len(d) - 1), ())))
        ranked = D.rank_by_score([D.reply_ids(fmt.tokenizer, t) for t in texts],
                                 [task.score(ins.demands, t) for t in texts])
        if len(ranked) >= 2:
            groups.append((D.chat_prompt(fmt, ins), ranked))
    return R.fit_groups(groups, max_seq_len)


def step_tokens(data, seed, steps, batch_size, eot_id):
    """-> (pairs, positions, real tokens) per step, averaged: the batches train_rm draws (rm_step_batch)."""
    pairs, pos, real = [], [], []
    for step in range(steps):
        b = R.rm_step_batch(data, seed, step, batch_size, eot_id)
        if eot_id is None:
            tc, lc, tr, lr = b[:4]
            pairs.append(len(lc))
            pos.append(tc.size + tr.size)
            real.append(int((lc + 1).sum() + (lr + 1).sum()))
        else:
            pairs.append(len(R.packed_pairs(b)[0]))
            pos.append(b.tokens.size)
            real.append(int(sum(b.last[b.row == r].max() + 1 for r in range(len(b.tokens)))))
    return np.mean(pairs), np.mean(pos), np.mean(real)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", help="a run folder (with tokenizer) to start from; default: pre-train one here")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--small", action="store_true",
                        help="pre-train dim 64, 2 layers (a quick check) instead of the demo's base (`tiny`)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--groups", type=int, default=8, help="groups per packed step (= pairs per unpacked step)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--pooling", default="mean", choices=R.POOLINGS)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="of the interleaved one-step timing")
    parser.add_argument("--no-train", action="store_true", help="only the interleaved one-step timing")
    parser.add_argument("--out", help="keep the run folders here (default: a temporary directory)")
    cli = parser.parse_args()
    print(ENV_NOTE)
    print(_env.pin_threads(cli.threads))
    from llama3np.formats import load

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(cli.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if cli.model:
            base = load(cli.model)
        else:
            small = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192)
            cfg = D.DemoConfig(pretrain_steps=cli.pretrain_steps, seed=cli.seed,
                               pretrain_overrides=small if cli.small else {})
            base = D.pretrain(out / "pretrain", cfg, log=lambda m: None)
        a = base.args
        how = f"loaded from {cli.model}" if cli.model else f"pre-trained {cli.pretrain_steps} steps"
        print(f"base: dim {a.dim}, {a.n_layers} layers, vocab {a.vocab_size}, max_seq_len {a.max_seq_len} "
              f"({how}, {time.perf_counter() - t0:.0f} s)")
        fmt = ChatFormat(base.tokenizer)
        eot = base.tokenizer.eot_id
        train_ins = task.instructions(cli.n_train, seed=cli.seed * 7 + 1)
        eval_ins = task.instructions(cli.n_eval, seed=cli.seed * 7 + 3)
        groups = minimal_groups(fmt, train_ins, cli.seed + 3, a.max_seq_len)
        eval_minimal = R.group_pairs(minimal_groups(fmt, eval_ins, cli.seed + 4, a.max_seq_len))
        eval_demo, _ = D.preference_data(fmt, eval_ins, cli.seed + 2)
        pairs = R.group_pairs(groups)
        G = cli.groups
        print(f"data: {len(groups)} groups, {np.mean([len(r) for _, r in groups]):.2f} replies per group, "
              f"{len(pairs)} pairs; held out: {len(eval_minimal)} minimal-edit pairs, {len(eval_demo)} demo pairs")
        print(_env.machine_note())
        per_group = len(pairs) / len(groups)
        runs = [("packed", groups, G, True), ("unpacked", pairs, G, False),
                ("unpacked, =pairs", pairs, max(1, round(G * per_group)), False)]
        print(f"{cli.steps} steps, lr {cli.lr}, pooling {cli.pooling}")
        print(f"{'run':18s} {'batch':>5s} {'pairs/step':>10s} {'positions/step':>14s} {'tokens/step':>11s} "
              f"{'s/step':>7s} {'acc minimal':>11s} {'acc demo':>8s} {'train acc':>9s}")
        for name, data, batch, packed in [] if cli.no_train else runs:
            rm = R.RewardModel(clone_model(base), seed=cli.seed, pooling=cli.pooling)
            t = time.perf_counter()
            recs = R.train_rm(rm, data, out / name.replace(", =", "_"), cli.steps, batch, cli.lr, cli.seed,
                              save_every=cli.steps, packed=packed)
            sec = (time.perf_counter() - t) / cli.steps
            n_pairs, pos, real = step_tokens(data, cli.seed, cli.steps, batch, eot if packed else None)
            acc_m, acc_d = R.pair_accuracy(rm, eval_minimal), R.pair_accuracy(rm, eval_demo)
            train_acc = np.mean([r["accuracy"] for r in recs[-20:]])
            print(f"{name:18s} {batch:5d} {n_pairs:10.1f} {pos:14.0f} {real:11.0f} {sec:7.3f} {acc_m:11.3f} "
                  f"{acc_d:8.3f} {train_acc:9.3f}", flush=True)
        steps = {name: one_step(base, cli, data, batch, eot if packed else None) for name, data, batch, packed in runs}
        times = _env.best_of_each(steps, repeat=cli.repeat)
        print(f"one step, interleaved, best of {cli.repeat}: " + ", ".join(
            f"{name} {t:.3f} s" for name, t in times.items()) + f"  ({_env.machine_note()})")


def one_step(base, cli, data, batch_size, eot_id):
    """-> fn(): one train_rm step on the batch of step 0 (loss, backward, AdamW) on a fresh copy of the base."""
    from llama3np.optim import AdamW

    rm = R.RewardModel(clone_model(base), seed=cli.seed, pooling=cli.pooling)
    opt = AdamW(rm.params, lr=1e-9, weight_decay=0.0)
    batch = R.rm_step_batch(data, cli.seed, 0, batch_size, eot_id)
    if eot_id is None:
        return lambda: opt.step(rm.loss_and_grads(*batch)[1])
    return lambda: opt.step(rm.packed_loss_and_grads(batch)[1])


if __name__ == "__main__":
    main()
