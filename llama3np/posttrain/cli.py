"""Command line of post-training: `llama3np sft | rm | rs | dpo | ppo | average` and `llama3np posttrain demo`.

    llama3np sft --model runs/base --data chats.jsonl --out runs/sft        # {"messages": [...]} per line
    llama3np rm  --model runs/sft --data prefs.jsonl --out runs/rm           # {"prompt","chosen","rejected"}
    llama3np rs  --model runs/sft --reward-model runs/rm --data prompts.jsonl --out runs/rs --k 16 --n-best 2
    llama3np dpo --model runs/sft --data prefs.jsonl --out runs/dpo [--ref runs/sft] [--beta 0.1 --nll-coef 0.2]
    llama3np ppo --model runs/dpo --reward-model runs/rm --data prompts.jsonl --out runs/ppo
    llama3np average --model runs/a --model runs/b --out runs/avg
    llama3np posttrain demo [--fast]

Each `func(args)` returns an exit code and raises ValueError/FileNotFoundError for bad input (the main
CLI prints those as one line). `main(argv)` runs them without the main CLI (tests).
"""
import json
import sys
from pathlib import Path


def load_policy(path):
    """A policy from a folder: a stage run (ours, possibly with extra weights) or anything llama3np.load reads."""
    from .stage import load_stage_model

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}")
    cfg = p / "config.json"
    if p.is_dir() and cfg.exists() and "stage" in json.loads(cfg.read_text()):
        return load_stage_model(p)[0]
    from ..formats import load

    model = load(p)
    if model.tokenizer is None:
        raise ValueError(f"{p}: the model has no tokenizer; post-training needs one for the chat format")
    return model


def _fmt(model):
    from ..tokenizer import ChatFormat

    return ChatFormat(model.tokenizer)


def _prompt_rows(fmt, rows, path, max_seq_len):
    out = []
    for i, row in enumerate(rows, start=1):
        where = f"{path}, row {i}"
        if "prompt" in row:
            prompt = row["prompt"]
            dialog = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        elif "messages" in row:
            dialog = [m for m in row["messages"] if m.get("role") != "assistant"] or row["messages"]
        else:
            raise ValueError(f"{where}: expected a 'prompt' or 'messages' key")
        if not isinstance(dialog, list) or not dialog:
            raise ValueError(f"{where}: the prompt must be a string or a non-empty list of messages")
        ids = fmt.encode_dialog_prompt(dialog)
        if len(ids) >= max_seq_len:
            raise ValueError(f"{where}: the prompt has {len(ids)} tokens, no room to reply within "
                             f"max_seq_len={max_seq_len}")
        out.append(ids)
    return out


def _pairs(fmt, path, max_seq_len):
    from .data import preference_example, read_jsonl

    pairs = []
    for i, row in enumerate(read_jsonl(path), start=1):
        p = preference_example(fmt, row, max_seq_len, where=f"{path}, row {i}")
        pairs.append((p.prompt, p.chosen, p.rejected))
    return pairs


def cmd_sft(a):
    from .data import read_jsonl, sft_example
    from .sft import train_sft

    model = load_policy(a.model)
    fmt = _fmt(model)
    examples = [sft_example(fmt, row.get("messages"), model.args.max_seq_len, where=f"{a.data}, row {i}")
                for i, row in enumerate(read_jsonl(a.data), start=1)]
    recs = train_sft(model, examples, a.out, a.steps, a.batch_size, a.lr, a.seed, a.save_every, a.resume, progress=True,
                     min_lr_ratio=a.min_lr_ratio)
    print(f"sft: {len(examples)} dialogs, {a.steps} steps, last loss {recs[-1]['loss']:.4f}; run folder {a.out}")
    return 0


def cmd_rm(a):
    from .reward_model import RewardModel, train_rm

    model = load_policy(a.model)
    pairs = _pairs(_fmt(model), a.data, model.args.max_seq_len)
    rm = RewardModel(model, seed=a.seed, pooling=a.pooling, logp_weight=a.logp_weight)
    recs = train_rm(rm, pairs, a.out, a.steps, a.batch_size, a.lr, a.seed, a.save_every, a.resume, progress=True)
    print(f"rm: {len(pairs)} pairs, {a.steps} steps, last accuracy {recs[-1]['accuracy']:.3f}; run folder {a.out}")
    return 0


def cmd_rs(a):
    import numpy as np

    from .data import read_jsonl, write_jsonl
    from .rejection_sampling import check_n_best, sample_replies, score_replies, winner_indices
    from .reward_model import load_reward_model

    check_n_best(a.n_best)  # before minutes of sampling
    policy = load_policy(a.model)
    rm = load_reward_model(a.reward_model)
    if rm.args.vocab_size != policy.args.vocab_size:
        raise ValueError(f"the reward model's vocabulary ({rm.args.vocab_size}) differs from the policy's "
                         f"({policy.args.vocab_size})")
    fmt = _fmt(policy)
    rows = read_jsonl(a.data)
    prompts = _prompt_rows(fmt, rows, a.data, policy.args.max_seq_len)
    replies, _ = sample_replies(policy, prompts, a.k, a.max_new_tokens, seed=a.seed)
    scores = score_replies(rm, prompts, replies)
    tok = policy.tokenizer
    out = []
    for p, k in winner_indices(replies, scores, tok.eot_id, a.n_best):
        prompt = rows[p].get("prompt")
        dialog = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            [m for m in (prompt or rows[p].get("messages")) if m.get("role") != "assistant"]
        out.append({"messages": dialog + [{"role": "assistant", "content": tok.decode(replies[p][k][:-1])}]})
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(a.out) / "winners.jsonl", out)
    print(f"rs: best {a.n_best} of {a.k} for {len(prompts)} prompts (mean best RM score "
          f"{float(np.max(scores, 1).mean()):.3f}); "
          f"{len(out)} winners in {Path(a.out) / 'winners.jsonl'} (SFT data: llama3np sft --data ...)")
    return 0


def cmd_dpo(a):
    from .dpo import pairs_reference_logps, train_dpo

    model = load_policy(a.model)
    ref = load_policy(a.ref or a.model)
    pairs = _pairs(_fmt(model), a.data, model.args.max_seq_len)
    ref_lp = pairs_reference_logps(ref, pairs, mask_eot=not a.eot_in_mask, policy=model)
    recs = train_dpo(model, pairs, ref_lp, a.out, a.steps, a.batch_size, a.lr, a.beta, a.nll_coef, a.seed,
                     a.save_every, a.resume, progress=True, mask_eot=not a.eot_in_mask,
                     label_smoothing=a.label_smoothing, loss_type=a.loss_type)
    print(f"dpo: {len(pairs)} pairs, {a.steps} steps, rewards/accuracies {recs[-1]['rewards/accuracies']:.3f}, "
          f"rewards/margins {recs[-1]['rewards/margins']:.3f}; run folder {a.out}")
    return 0


def cmd_ppo(a):
    from .data import read_jsonl
    from .ppo import PPOConfig, train_ppo
    from .reward_model import RewardModel, load_reward_model

    policy = load_policy(a.model)
    ref = load_policy(a.ref or a.model)
    rm = load_reward_model(a.reward_model)
    value = load_reward_model(a.value_model or a.reward_model)
    value = RewardModel(value.model, score=value.score)
    for name, m in (("reward model", rm), ("value model", value)):
        if m.args.vocab_size != policy.args.vocab_size:
            raise ValueError(f"the {name}'s vocabulary ({m.args.vocab_size}) differs from the policy's "
                             f"({policy.args.vocab_size})")
    prompts = _prompt_rows(_fmt(policy), read_jsonl(a.data), a.data, policy.args.max_seq_len)
    cfg = PPOConfig(iterations=a.iterations, batch_size=a.batch_size, mini_batch_size=a.mini_batch_size,
                    lr=a.lr, max_new_tokens=a.max_new_tokens, kl_estimator=a.kl_estimator,
                    init_kl_coef=a.kl_coef, target_kl=a.target_kl, seed=a.seed)
    recs = train_ppo(policy, value, ref, rm, prompts, a.out, cfg, resume=a.resume, progress=True,
                     save_every=a.save_every)
    print(f"ppo: {a.iterations} iterations, objective/scores {recs[-1]['objective/scores']:.3f}, "
          f"objective/kl {recs[-1]['objective/kl']:.3f}; run folder {a.out}")
    return 0


def cmd_average(a):
    from ..formats import save
    from .averaging import average_models

    if len(a.model) < 2:
        raise ValueError("give at least two --model folders to average")
    models = [load_policy(m) for m in a.model]
    avg = average_models(models, a.weights)
    save(avg, a.out, format="llama3np")
    print(f"averaged {len(models)} models into {a.out}")
    return 0


def cmd_demo(a):
    import copy

    from .demo import FAST, DemoConfig, run_demo

    cfg = copy.deepcopy(FAST) if a.fast else DemoConfig()
    if a.demand_kinds:
        cfg.demand_kinds = tuple(k.strip() for k in a.demand_kinds.split(","))  # run_demo checks them first
    if a.annotator_errors is not None:
        cfg.sft_wrong_fraction = a.annotator_errors
    for name in ("rs_sft_mix", "rs_prompts", "rs_sft_steps", "rs_lr", "seed", "dpo_beta"):  # DemoConfig's names
        if getattr(a, name) is not None:  # given: run_demo checks it before any training
            setattr(cfg, name, getattr(a, name))
    cfg.dpo_loss_type = a.dpo_loss
    run_demo(a.out, model=a.model, cfg=cfg, progress=not a.fast)
    return 0


def add_subcommands(subparsers):
    def common(p, data_help, lr):
        p.add_argument("--model", required=True, help="the starting model: a run folder or a checkpoint folder")
        p.add_argument("--data", required=True, help=data_help)
        p.add_argument("--out", required=True, help="the run folder to write")
        p.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
        p.add_argument("--batch-size", type=int, default=8, help="rows (or pairs) per step (default: %(default)s)")
        p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
        p.add_argument("--save-every", type=int, default=50, help="a checkpoint every N steps (default: %(default)s)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")

    p = subparsers.add_parser("sft", help="supervised fine-tuning on chats ({'messages': [...]} JSONL)")
    common(p, "JSONL, one {'messages': [...]} per line; the loss is on assistant turns", 3e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine decay of the rate to this fraction of --lr at the last step; 1: flat (default: %(default)s)")
    p.set_defaults(func=cmd_sft)
    p = subparsers.add_parser("rm", help="train a reward model on preference pairs")
    common(p, "JSONL, one {'prompt', 'chosen', 'rejected'} per line", 3e-4)
    p.add_argument("--pooling", choices=["last", "mean"], default="last",
                   help="the reward: the head at the reply's last token (Llama 3's) or its mean over the reply "
                        "(default: %(default)s)")
    p.add_argument("--logp-weight", type=float, default=None,
                   help="add this times the reply's mean log-likelihood under the model's own LM head to the "
                        "reward (trained with it; default: no such term)")
    p.set_defaults(func=cmd_rm)
    p = subparsers.add_parser("dpo", help="direct preference optimisation")
    common(p, "JSONL, one {'prompt', 'chosen', 'rejected'} per line", 1e-4)
    p.add_argument("--ref", help="the reference model (default: --model)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta, the strength of the KL leash (default: %(default)s, Llama 3's)")
    p.add_argument("--nll-coef", type=float, default=0.2, help="Llama 3's NLL term on the chosen replies (default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="> 0: cDPO (default: %(default)s)")
    p.add_argument("--loss-type", choices=["sigmoid", "ipo"], default="sigmoid", help="DPO's sigmoid loss or IPO's squared one (default: %(default)s)")
    p.add_argument("--eot-in-mask", action="store_true", help="count <|eot_id|> in the log-probs (ablation)")
    p.set_defaults(func=cmd_dpo)

    p = subparsers.add_parser("rs", help="rejection sampling: best of K replies by a reward model -> SFT data")
    p.add_argument("--model", required=True, help="the policy to start from: a run folder or a checkpoint folder")
    p.add_argument("--reward-model", required=True, help="a run folder of `llama3np rm`")
    p.add_argument("--data", required=True, help="JSONL of {'prompt': ...} (or {'messages': [...]})")
    p.add_argument("--out", required=True, help="the run folder to write")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (default: %(default)s)")
    p.add_argument("--n-best", type=int, default=1,
                   help="winners a prompt: the reward model's n best replies that ended (default: %(default)s, "
                        "Llama 3's; the demo keeps 2 of 16)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="longest reply (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=cmd_rs)

    p = subparsers.add_parser("ppo", help="PPO against a reward model with a KL penalty to a reference")
    p.add_argument("--model", required=True, help="the policy to start from: a run folder or a checkpoint folder")
    p.add_argument("--reward-model", required=True, help="a run folder of `llama3np rm`")
    p.add_argument("--value-model", help="a reward model run to start the value model from (default: --reward-model)")
    p.add_argument("--ref", help="the KL reference (default: --model)")
    p.add_argument("--data", required=True, help="JSONL of {'prompt': ...}")
    p.add_argument("--out", required=True, help="the run folder to write")
    p.add_argument("--iterations", type=int, default=20, help="PPO iterations: rollouts then updates (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rollouts per iteration (default: %(default)s)")
    p.add_argument("--mini-batch-size", type=int, default=8, help="rollouts per update (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest reply (default: %(default)s)")
    p.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1", help="the per-token KL estimate of the penalty (default: %(default)s)")
    p.add_argument("--kl-coef", type=float, default=0.05, help="the starting KL coefficient, then adapted (default: %(default)s)")
    p.add_argument("--target-kl", type=float, default=6.0, help="the adaptive controller's KL target, nats per reply (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=5, help="a checkpoint every N iterations (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.set_defaults(func=cmd_ppo)

    p = subparsers.add_parser("average", help="average the weights of models fine-tuned from one start")
    p.add_argument("--model", action="append", required=True, help="repeat for each model")
    p.add_argument("--weights", type=float, nargs="*", help="one weight per model (default equal)")
    p.add_argument("--out", required=True, help="the run folder to write")
    p.set_defaults(func=cmd_average)

    from .demo import DemoConfig
    from .losses import DPO_LOSS_TYPES
    from .story_task import DEMAND_KINDS

    default = DemoConfig()  # the flags below stay None unless given, so that --fast keeps its own settings

    p = subparsers.add_parser("posttrain", help="post-training demos")
    sub = p.add_subparsers(dest="posttrain_command", required=True)
    d = sub.add_parser("demo", help="SFT -> RM -> RS -> DPO -> PPO on a tiny story model, with the ground truth")
    d.add_argument("--out", default="runs/posttrain", help="the folder of the stages' runs (default: %(default)s)")
    d.add_argument("--model", help="a pre-trained story model (default: pre-train one first, 400 steps on stories "
                                   "and series of stories, ~5-7 min on 2 cores)")
    d.add_argument("--fast", action="store_true", help="a tiny run of a minute (for tests)")
    d.add_argument("--demand-kinds", help="comma-separated demand kinds the instructions draw from, e.g. "
                                          f"home,hobby,ending (default: all of {', '.join(DEMAND_KINDS)})")
    d.add_argument("--annotator-errors", type=float, metavar="FRACTION",
                   help="the fraction of SFT demonstrations written with one demanded value wrong, as human "
                        "demonstrations have mistakes (default: 0, every demonstration perfect)")
    d.add_argument("--rs-sft-mix", type=float, metavar="RATIO",
                   help="SFT examples mixed into rejection sampling's fine-tuning per winner, as Llama 3 mixes "
                        f"(default: {default.rs_sft_mix:g}, the winners alone)")
    d.add_argument("--rs-prompts", type=int, metavar="N",
                   help=f"rejection sampling's prompts, {default.rs_k} replies each (default: {default.rs_prompts}; "
                        "256 with --rs-steps 120 --rs-lr 3e-4 is the larger round the README measures, ~2.5 more "
                        "minutes)")
    d.add_argument("--rs-steps", type=int, metavar="N", dest="rs_sft_steps",
                   help=f"SFT steps on rejection sampling's winners (default: {default.rs_sft_steps})")
    d.add_argument("--rs-lr", type=float, metavar="LR",
                   help=f"the learning rate of those steps, decaying as SFT's (default: {default.rs_lr:g})")
    d.add_argument("--seed", type=int,
                   help="the seed of every stage, pre-training and the instructions included: another seed is another "
                        f"pre-trained model and another run of everything after it (default: {default.seed})")
    d.add_argument("--dpo-loss", choices=DPO_LOSS_TYPES, default="sigmoid",
                   help="DPO's loss: sigmoid (DPO, Llama 3's) or ipo (squared, to a fixed margin) "
                        "(default: %(default)s)")
    d.add_argument("--dpo-beta", type=float, metavar="BETA",
                   help="DPO's beta in the demo (default: 1.0 with the sigmoid loss, where it measured 0.90 held-out "
                        "accuracy against 0.81 at Llama 3's 0.1; 0.1 with ipo)")
    d.set_defaults(func=cmd_demo)


def main(argv=None) -> int:
    """`llama3np sft|rm|rs|dpo|ppo|average|posttrain ...` from Python (tests) or `python -m`: the one
    command line, llama3np.cli.main; argv starts with the sub-command."""
    from ..cli import main as llama3np_main

    return llama3np_main(argv)


if __name__ == "__main__":
    sys.exit(main())
