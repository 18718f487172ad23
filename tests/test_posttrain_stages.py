"""The stages as run folders: exact resume after a crash, logs with TRL's names, the command line, the
demo's fast mode, and the small pieces (averaging, best-of-N KL, the adaptive KL controller)."""
import io
import json
import math

import numpy as np
import pytest

import llama3np
from llama3np.posttrain import averaging, rejection_sampling as RS
from llama3np.posttrain import sft as sft_mod
from llama3np.posttrain.ppo import AdaptiveKLController


@pytest.fixture(scope="module")
def tok():
    from llama3np.data import stories, train_bpe

    texts, _ = stories.corpus(200, seed=0)
    return train_bpe("\n\n".join(texts), 600)


def small_model(tok, seed=0):
    args = llama3np.ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, hidden_dim=48,
                              max_seq_len=128)
    m = llama3np.Transformer(args, seed=seed)
    m.tokenizer = tok
    return m


def sft_data(tok, n=6):
    from llama3np.posttrain.data import sft_example
    from llama3np.tokenizer import ChatFormat

    fmt = ChatFormat(tok)
    return [sft_example(fmt, [{"role": "user", "content": f"Write story {i}."},
                              {"role": "assistant", "content": "Once upon a time, there was a kind girl named Mia."}])
            for i in range(n)]


def test_sft_resumed_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tok, tmp_path, monkeypatch):
    data = sft_data(tok)
    whole = small_model(tok)
    sft_mod.train_sft(whole, data, tmp_path / "whole", steps=5, batch_size=2, save_every=2)
    crashed = small_model(tok)
    real, calls = sft_mod.sft_loss_and_grads, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # step 4: after the checkpoint of step 2, before the one of step 4
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(sft_mod, "sft_loss_and_grads", dying)
    with pytest.raises(KeyboardInterrupt):
        sft_mod.train_sft(crashed, data, tmp_path / "crashed", steps=5, batch_size=2, save_every=2)
    monkeypatch.setattr(sft_mod, "sft_loss_and_grads", real)
    resumed = small_model(tok, seed=9)  # other weights: everything must come from the checkpoint
    with pytest.raises(ValueError, match="--resume"):
        sft_mod.train_sft(resumed, data, tmp_path / "crashed", steps=5, batch_size=2, save_every=2)
    sft_mod.train_sft(resumed, data, tmp_path / "crashed", steps=5, batch_size=2, save_every=2, resume=True)
    for name in whole.params:
        np.testing.assert_array_equal(whole.params[name], resumed.params[name], err_msg=name)
    logs = [json.loads(line) for line in (tmp_path / "crashed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5], "steps redone after the crash are logged once"
    assert llama3np.load(tmp_path / "crashed").params["norm.weight"].tolist() == whole.params["norm.weight"].tolist()


def test_sft_rate_warms_up_then_decays_to_min_lr_ratio_and_flat_at_ratio_one(tok, tmp_path):
    data = sft_data(tok)
    recs = sft_mod.train_sft(small_model(tok), data, tmp_path / "decay", steps=20, batch_size=2, lr=1e-3,
                             save_every=20, min_lr_ratio=0.1)
    rates = [r["lr"] for r in recs]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)  # 10 warmup steps
    assert all(a > b for a, b in zip(rates[10:], rates[11:])) and rates[-1] == pytest.approx(1e-4)
    flat = sft_mod.train_sft(small_model(tok), data, tmp_path / "flat", steps=20, batch_size=2, lr=1e-3,
                             save_every=20, min_lr_ratio=1.0)
    assert [r["lr"] for r in flat[9:]] == pytest.approx([1e-3] * 11)
    with pytest.raises(ValueError, match="--resume needs the arguments"):  # another schedule is another run
        sft_mod.train_sft(small_model(tok), data, tmp_path / "flat", steps=20, batch_size=2, lr=1e-3,
                          save_every=20, min_lr_ratio=0.1, resume=True)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        sft_mod.train_sft(small_model(tok), data, tmp_path / "bad", steps=2, min_lr_ratio=1.5)


def test_averaging_is_the_weighted_mean_and_rejects_mismatches(tok):
    a, b = small_model(tok, 0), small_model(tok, 1)
    avg = averaging.average_params([a.params, b.params], [3, 1])
    np.testing.assert_allclose(avg["norm.weight"], 0.75 * a.params["norm.weight"] + 0.25 * b.params["norm.weight"])
    with pytest.raises(ValueError, match="other weights"):
        averaging.average_params([a.params, {"x": np.zeros(2)}])


def test_best_of_n_kl_is_under_the_bound_and_exact_for_distinct_scores():
    rng = np.random.default_rng(0)
    s = rng.standard_normal(64)
    for n in (1, 2, 4, 8, 16):
        kl = RS.best_of_n_kl(s, n)
        bound = RS.best_of_n_kl_bound(n)
        assert kl <= bound + 1e-12
    # distinct scores over a pool of K: KL -> log n - (n-1)/n as K grows
    assert RS.best_of_n_kl(np.arange(100000.0), 4) == pytest.approx(math.log(4) - 0.75, abs=1e-3)
    assert RS.best_of_n_kl(np.zeros(10), 8) == 0.0, "all tied: best-of-n is the policy"


def test_winners_are_the_rms_n_best_ended_replies_with_the_loss_on_the_reply_only():
    stop = 9
    prompts = [[1, 2], [3]]
    replies = [[[4, stop], [5, stop], [6]], [[7, stop], [8, stop], [4, 4, stop]]]
    scores = np.array([[0.1, 0.5, 0.9], [0.3, 0.3, -1.0]])
    # prompt 0: the best reply (0.9) never ended, so it is dropped, not replaced by the second best
    assert RS.winners(prompts, replies, scores, stop) == [([3, 7, stop], [0, 1, 1])]  # ties: the earlier sample
    assert RS.winners(prompts, replies, scores, stop, n_best=2) == [
        ([1, 2, 5, stop], [0, 0, 1, 1]), ([3, 7, stop], [0, 1, 1]), ([3, 8, stop], [0, 1, 1])]
    assert len(RS.winners(prompts, replies, scores, stop, n_best=5)) == 5  # every ended reply, none twice
    for bad in (0, 1.5, -1):
        with pytest.raises(ValueError, match="n_best must be a whole number >= 1"):
            RS.winners(prompts, replies, scores, stop, n_best=bad)


def test_score_replies_of_nothing_is_empty_and_mismatched_lists_are_an_error(tok):
    from llama3np.posttrain.reward_model import RewardModel

    rm = RewardModel(small_model(tok), seed=0)
    assert RS.score_replies(rm, [], []).shape == (0, 0)
    assert RS.score_replies(rm, [[1, 2], [3]], [[], []]).shape == (2, 0)  # k = 0
    scores = RS.score_replies(rm, [[1, 2], [3]], [[[4, 5]], [[6]]])
    assert scores.shape == (2, 1) and np.all(np.isfinite(scores))
    with pytest.raises(ValueError, match="one list per prompt: 2 prompts, 1 lists"):
        RS.score_replies(rm, [[1, 2], [3]], [[[4]]])


def test_adaptive_kl_controller_pulls_harder_over_budget():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10)
    assert c.update(12.0) == pytest.approx(0.1 * 1.02)  # error clipped to +0.2, times 1/10
    c2 = AdaptiveKLController(0.1, target=6.0, horizon=10)
    assert c2.update(5.4) == pytest.approx(0.1 * (1 - 0.01))  # 10% under: -0.1, times 1/10


def test_cli_sft_and_bad_data(tok, tmp_path, capsys):
    from llama3np.formats import save
    from llama3np.posttrain.cli import main

    save(small_model(tok), tmp_path / "base", format="llama3np")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Once upon a time."}]})
                              for _ in range(3)) + "\n")
    assert main(["sft", "--model", str(tmp_path / "base"), "--data", str(data), "--out", str(tmp_path / "s"),
                 "--steps", "2", "--batch-size", "2"]) == 0
    assert (tmp_path / "s" / "log.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    assert main(["dpo", "--model", str(tmp_path / "s"), "--data", str(bad), "--out", str(tmp_path / "d")]) == 2
    assert "row 1: chosen and rejected are the same text" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_fast_mode_runs_every_stage(tmp_path):
    from llama3np.posttrain.demo import DEMO_DPO_BETA, FAST, run_demo

    import copy
    cfg = copy.deepcopy(FAST)
    table, figures = run_demo(tmp_path / "demo", cfg=cfg, stream=io.StringIO())
    assert [row[0] for row in table] == ["pre-trained", "SFT", "rejection sampling", "DPO", "PPO"]
    log = [json.loads(line) for line in (tmp_path / "demo" / "ppo" / "log.jsonl").read_text().splitlines()]
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/clipfrac_avg", "val/ratio"):
        assert key in log[0]
    dpo = json.loads((tmp_path / "demo" / "dpo" / "log.jsonl").read_text().splitlines()[0])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert key in dpo
    assert dpo["rewards/margins"] == 0 and dpo["loss"] == pytest.approx(math.log(2) + cfg.dpo_nll * dpo["nll_loss"])
    # the demo's sigmoid DPO runs at its own beta, not Llama 3's 0.1 (DEMO_DPO_BETA: 0.1 kept pushing ordered pairs)
    assert DEMO_DPO_BETA["sigmoid"] != 0.1
    assert json.loads((tmp_path / "demo" / "dpo" / "config.json").read_text())["beta"] == DEMO_DPO_BETA["sigmoid"]
    assert (tmp_path / "demo" / "score_vs_kl.png").exists()


def test_cli_rm_rs_dpo_ppo_average_end_to_end(tok, tmp_path, monkeypatch, capsys):
    """Every command on a toy model and toy data: each writes its run folder and reads the previous ones."""
    from llama3np.cli import main as main_cli
    from llama3np.formats import save
    from llama3np.posttrain.cli import main
    from llama3np.posttrain.stage import load_stage_model

    save(small_model(tok), tmp_path / "base", format="llama3np")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Write story {i}.", "chosen": "Once upon a time, a girl.",
                                         "rejected": "The end."}) + "\n" for i in range(4)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write story {i}."}) + "\n" for i in range(3)))
    base, d = str(tmp_path / "base"), str(tmp_path)
    assert main(["rm", "--model", base, "--data", str(prefs), "--out", d + "/rm", "--steps", "2", "--batch-size", "2",
                 "--pooling", "mean", "--logp-weight", "1"]) == 0
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["logp_weight"] == 1.0
    assert main(["rs", "--model", base, "--reward-model", d + "/rm", "--data", str(prompts), "--out", d + "/rs",
                 "--k", "2", "--max-new-tokens", "6"]) == 0
    assert (tmp_path / "rs" / "winners.jsonl").exists()
    # --n-best 2: the RM's two best replies to each prompt that ended, best first (sampling and scoring fixed here,
    # so the answer is known); a bad --n-best is refused before any sampling
    with monkeypatch.context() as mp:
        ids = [tok.encode(t, bos=False, eos=False) for t in ("Once", "upon", "a time", "girl", "boy", "dog")]
        eot = tok.eot_id
        fixed = [[ids[0] + [eot], ids[1], ids[2] + [eot]], [ids[3] + [eot], ids[4] + [eot], ids[5] + [eot]],
                 [ids[0], ids[1], ids[2]]]
        mp.setattr(RS, "sample_replies", lambda *args, **kw: (fixed, None))
        mp.setattr(RS, "score_replies", lambda *args, **kw: np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [1, 1, 1]]))
        assert main(["rs", "--model", base, "--reward-model", d + "/rm", "--data", str(prompts), "--out",
                     d + "/rs2", "--k", "3", "--n-best", "2"]) == 0
        got = [json.loads(x)["messages"] for x in (tmp_path / "rs2" / "winners.jsonl").read_text().splitlines()]
        # prompt 0: its best (0.9) never ended and is dropped; prompt 2: nothing ended
        assert got == [[{"role": "user", "content": f"Write story {p}."},
                        {"role": "assistant", "content": tok.decode(ids[i])}] for p, i in ((0, 2), (1, 3), (1, 4))]
        capsys.readouterr()
        assert main(["rs", "--model", base, "--reward-model", d + "/rm", "--data", str(prompts), "--out",
                     d + "/rs3", "--n-best", "0"]) == 2
        assert "n_best must be a whole number >= 1, got 0" in capsys.readouterr().err
        assert not (tmp_path / "rs3").exists()
    assert main(["dpo", "--model", base, "--data", str(prefs), "--out", d + "/dpo", "--steps", "2",
                 "--batch-size", "2"]) == 0
    assert main(["ppo", "--model", d + "/dpo", "--reward-model", d + "/rm", "--data", str(prompts), "--out",
                 d + "/ppo", "--iterations", "1", "--batch-size", "2", "--mini-batch-size", "2",
                 "--max-new-tokens", "6"]) == 0
    rec = json.loads((tmp_path / "ppo" / "log.jsonl").read_text().splitlines()[0])
    assert rec["val/ratio_first"] == pytest.approx(1.0, abs=1e-5)  # the first minibatch: pi = pi_old
    # what generate / chat / eval load from a PPO run (policy + value/...) or an RM run (+ score.*): the transformer
    for stage, prefix in (("ppo", ""), ("ppo", "value/"), ("rm", "")):
        want, ckpt = load_stage_model(tmp_path / stage, prefix)
        assert any(k.startswith(("value/", "score.")) for k in ckpt), "the checkpoint holds extra weights"
        if prefix == "":
            got = llama3np.load(tmp_path / stage)
            assert set(got.params) == set(want.params)
            assert all(np.array_equal(got.params[k], want.params[k]) for k in want.params)
    assert main_cli(["generate", "--model", d + "/ppo", "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    assert main(["average", "--model", base, "--model", d + "/dpo", "--out", d + "/avg"]) == 0
    avg = llama3np.load(tmp_path / "avg")
    b, p = llama3np.load(tmp_path / "base"), llama3np.load(tmp_path / "dpo")
    np.testing.assert_allclose(avg.params["norm.weight"], (b.params["norm.weight"] + p.params["norm.weight"]) / 2,
                               rtol=1e-6)


def test_ppo_resumed_after_a_skipped_value_step_and_a_crash_ends_like_an_uninterrupted_run(tok, tmp_path,
                                                                                            monkeypatch):
    """A non-finite value gradient skips the value optimizer's step only, so the policy's and the value model's
    step counts differ; a resumed run must restore both (AdamW's bias correction reads them), or its value
    model drifts from the uninterrupted run's."""
    from llama3np.posttrain import ppo as P
    from llama3np.posttrain.reward_model import RewardModel
    from llama3np.tokenizer import ChatFormat

    fmt = ChatFormat(tok)
    prompts = [fmt.encode_dialog_prompt([{"role": "user", "content": f"Write story {i}."}]) for i in range(4)]
    cfg = P.PPOConfig(iterations=3, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4)
    real = P.value_loss_and_grads

    def run(out, nan_at=None, crash_at=None, resume=False):
        calls = []

        def value_grads(*a, **k):
            calls.append(1)
            if len(calls) == crash_at:
                raise KeyboardInterrupt("killed")
            loss, g, st = real(*a, **k)
            return loss, ({n: x * np.nan for n, x in g.items()} if len(calls) == nan_at else g), st

        monkeypatch.setattr(P, "value_loss_and_grads", value_grads)
        policy, value = small_model(tok), RewardModel(small_model(tok, seed=2), seed=2)
        P.train_ppo(policy, value, small_model(tok), RewardModel(small_model(tok, seed=1), seed=1), prompts,
                    out, cfg, resume=resume, save_every=1)
        return policy, value

    whole_policy, whole_value = run(tmp_path / "whole", nan_at=1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", nan_at=1, crash_at=3)  # killed in iteration 3, after the checkpoint of 2
    policy, value = run(tmp_path / "crashed", resume=True)
    for name in whole_value.params:
        np.testing.assert_array_equal(whole_value.params[name], value.params[name], err_msg=name)
    for name in whole_policy.params:
        np.testing.assert_array_equal(whole_policy.params[name], policy.params[name], err_msg=name)


def test_demo_refuses_an_annotator_error_rate_outside_0_1_before_any_training(tmp_path, capsys):
    from llama3np.posttrain.cli import main

    assert main(["posttrain", "demo", "--fast", "--annotator-errors", "1.5", "--out", str(tmp_path / "d")]) == 2
    assert "error rate) must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "d" / "pretrain").exists()


def test_rs_training_data_is_the_winners_then_sft_mix_times_as_many_sft_examples(tmp_path, capsys):
    from llama3np.posttrain.cli import main
    from llama3np.posttrain.demo import rs_training_data

    won, sft = [([1, 2], [0, 1]), ([3, 4], [0, 1])], [([i, 9], [0, 1]) for i in range(10, 20)]
    assert rs_training_data(won, sft, 0, seed=0) == won  # the winners alone
    one = rs_training_data(won, sft, 1, seed=0)
    assert one[:2] == won and len(one) == 4 and all(x in sft for x in one[2:]) and one[2] != one[3]
    assert one == rs_training_data(won, sft, 1.0, seed=0), "a seeded draw"
    assert len(rs_training_data(won, sft, 2.5, seed=0)) == 2 + 5
    assert len(rs_training_data(won, sft, 100, seed=0)) == 2 + 10, "at most every SFT example, once"
    for bad in (-0.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="rs_sft_mix .* must be a number >= 0"):
            rs_training_data(won, sft, bad, seed=0)
    assert main(["posttrain", "demo", "--fast", "--rs-sft-mix", "-1", "--out", str(tmp_path / "d")]) == 2
    assert "rs_sft_mix (SFT examples per winner) must be a number >= 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "d" / "pretrain").exists()


def _demo_configs(monkeypatch, tmp_path, *flag_lists):
    """The DemoConfig `llama3np posttrain demo` builds for each list of flags (run_demo stubbed: nothing trains)."""
    from llama3np.posttrain import demo
    from llama3np.posttrain.cli import main

    seen = []
    with monkeypatch.context() as mp:
        mp.setattr(demo, "run_demo", lambda out, model=None, cfg=None, progress=False: seen.append(cfg))
        for flags in flag_lists:
            assert main(["posttrain", "demo", *flags, "--out", str(tmp_path / "d")]) == 0, flags
    return seen


def test_demo_seed_reaches_the_config_and_a_negative_one_is_refused_before_any_training(tmp_path, monkeypatch,
                                                                                         capsys):
    from llama3np.posttrain import demo
    from llama3np.posttrain.cli import main

    seen = _demo_configs(monkeypatch, tmp_path, ["--seed", "1"], ["--fast"])
    assert seen[0].seed == 1 and seen[0].n_train == demo.DemoConfig().n_train, "--seed on the default settings"
    assert seen[1].seed == demo.FAST.seed == 0
    assert main(["posttrain", "demo", "--fast", "--seed", "-1", "--out", str(tmp_path / "d")]) == 2
    assert "the demo's seed must be a whole number >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "d" / "pretrain").exists()


def test_demo_rs_round_flags_reach_the_config_and_bad_ones_are_refused_before_any_training(tmp_path, monkeypatch,
                                                                                          capsys):
    from llama3np.posttrain import demo
    from llama3np.posttrain.cli import main

    seen = _demo_configs(monkeypatch, tmp_path, ["--rs-prompts", "256", "--rs-steps", "120", "--rs-lr", "3e-4"], [])
    assert (seen[0].rs_prompts, seen[0].rs_sft_steps, seen[0].rs_lr) == (256, 120, 3e-4)
    default = demo.DemoConfig()
    assert (seen[1].rs_prompts, seen[1].rs_sft_steps, seen[1].rs_lr) == (default.rs_prompts, default.rs_sft_steps,
                                                                         default.rs_lr)
    n_train = demo.FAST.n_train
    for flags, message in ((["--rs-prompts", "0"], "rs_prompts (rejection sampling's prompts) must be a whole number"
                             " >= 1, got 0"),
                           (["--rs-prompts", str(n_train)], f"rs_prompts ({n_train}) + rm_prompts "
                                                            f"({demo.FAST.rm_prompts}) must be at most the {n_train}"),
                           (["--rs-steps", "0"], "rs_sft_steps (rejection sampling's SFT steps) must be a whole "
                                                 "number >= 1, got 0"),
                           (["--rs-lr", "0"], "rs_lr (rejection sampling's learning rate) must be a number > 0, "
                                              "got 0.0"),
                           (["--rs-lr", "nan"], "must be a number > 0, got nan")):
        assert main(["posttrain", "demo", "--fast", *flags, "--out", str(tmp_path / "d")]) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert not (tmp_path / "d" / "pretrain").exists()


def test_demo_refuses_a_dpo_beta_that_is_not_positive_before_any_training(tmp_path, capsys):
    from llama3np.posttrain.cli import main

    assert main(["posttrain", "demo", "--fast", "--dpo-beta", "0", "--out", str(tmp_path / "d")]) == 2
    assert "DPO's beta must be > 0, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "d" / "pretrain").exists()


@pytest.mark.slow
def test_demo_dpo_stage_can_use_the_ipo_loss(tmp_path):
    """--dpo-loss ipo: every DPO run of the demo (and its ablations) takes the squared loss; at the first step
    (policy = reference, Delta = 0) it is (1 / (2 beta))^2 plus the NLL term. A loss it does not know is refused
    before any training."""
    import copy

    from llama3np.posttrain.demo import DEMO_DPO_BETA, FAST, run_demo

    cfg = copy.deepcopy(FAST)
    cfg.dpo_loss_type = "hinge"
    with pytest.raises(ValueError, match="loss_type must be one of .*'hinge'"):
        run_demo(tmp_path / "bad", cfg=cfg, stream=io.StringIO())
    assert not (tmp_path / "bad" / "pretrain").exists()
    cfg.dpo_loss_type = "ipo"
    run_demo(tmp_path / "demo", cfg=cfg, stream=io.StringIO())
    for run in ("dpo", "dpo_no_nll", "dpo_eot_in_mask"):
        first = json.loads((tmp_path / "demo" / run / "log.jsonl").read_text().splitlines()[0])
        config = json.loads((tmp_path / "demo" / run / "config.json").read_text())
        beta = DEMO_DPO_BETA["ipo"]  # IPO's beta: its margin 1 / (2 beta)
        assert config["loss_type"] == "ipo" and config["beta"] == beta
        nll = 0.0 if run == "dpo_no_nll" else cfg.dpo_nll
        assert first["loss"] == pytest.approx((1 / (2 * beta)) ** 2 + nll * first["nll_loss"])
