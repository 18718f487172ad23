"""The reward model on packed rows (Llama 3, 4.1.2): the prompt once, then a group's replies in a seeded random
order. Finite differences in float64 on the whole model, what causal attention lets a packed row share with
separate rows, the shuffle, bad input, and train_rm(packed=True) resumed after a crash."""
import json

import numpy as np
import pytest
from test_posttrain_model import V, sample_indices, tiny_model
from test_posttrain_stages import small_model, tok  # noqa: F401  (tok is a module fixture)

from llama3np.gradcheck import numerical_grad, rel_error
from llama3np.posttrain import reward_model as R

EOT = V - 1  # the tiny model has no tokenizer: any id can play <|eot_id|>


def group(rng, n_prompt, reply_lens):
    """A random prompt and replies of the given lengths, each ending with EOT (ids < EOT elsewhere)."""
    prompt = rng.integers(0, EOT, n_prompt).tolist()
    return prompt, [rng.integers(0, EOT, n - 1).tolist() + [EOT] for n in reply_lens]


def groups(seed=0):
    rng = np.random.default_rng(seed)
    return [group(rng, 4, [5, 3, 4]), group(rng, 3, [4, 2])]  # ragged: the second row is padded


@pytest.mark.parametrize("pooling,logp_weight", [("last", None), ("mean", None), ("mean", 0.7)])
def test_packed_reward_model_gradients_match_finite_differences(pooling, logp_weight):
    """Every ordered pair of a row is a Bradley-Terry term on rewards read per reply; one backward through the
    packed rows gives the gradient of their mean (float64, central differences, relative error < 1e-6)."""
    rm = R.RewardModel(tiny_model(), seed=1, pooling=pooling, logp_weight=logp_weight)
    rm.score *= 20  # rewards of order 1: the loss is not flat
    batch = R.packed_rows(groups(), np.random.default_rng(5), EOT, rm.args.max_seq_len)
    f = lambda: rm.packed_loss_and_grads(batch, margin=0.1)[0]
    _, grads, m = rm.packed_loss_and_grads(batch, margin=0.1)
    assert set(grads) == set(rm.params)
    if logp_weight is None:
        assert np.all(grads["output.weight"] == 0), "the LM head is not part of the reward"
    assert len(R.packed_pairs(batch)[0]) == 3 + 1, "K replies give K(K-1)/2 pairs"
    assert set(m) == {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"}
    rng = np.random.default_rng(2)
    names = [R.SCORE, "tok_embeddings.weight", "layers.1.attention.wk.weight", "layers.0.feed_forward.w1.weight",
             "norm.weight"] + ([] if logp_weight is None else [R.LOGP, "output.weight"])
    for name in names:
        idx = sample_indices(rm.params[name], 10, rng)
        num = numerical_grad(f, rm.params[name], indices=idx)
        assert rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx]) < 1e-6, name


@pytest.mark.parametrize("pooling,logp_weight", [("last", None), ("mean", None), ("mean", 0.7)])
def test_the_first_reply_of_a_packed_row_is_scored_as_in_its_own_row(pooling, logp_weight):
    """Causal attention: the first reply of a packed row sees only the prompt, so its reward equals the one of
    the row prompt + reply alone, to float64 rounding (measured ~1e-17 on rewards of order 1: not bitwise, as the
    two forwards multiply matrices of other shapes, whose BLAS rounding differs). A later reply sees the earlier
    ones too (Meta's approximation), so its reward differs."""
    rm = R.RewardModel(tiny_model(), seed=1, pooling=pooling, logp_weight=logp_weight)
    rm.score *= 20  # rewards of order 1
    gs = groups()
    batch = R.packed_rows(gs, np.random.default_rng(5), EOT)
    packed = rm.packed_rewards(batch)
    prompts = [gs[b][0] for b in batch.row]
    replies = [gs[b][1][k] for b, k in zip(batch.row, batch.rank)]
    tokens, last = R.rows(prompts, replies)
    alone = rm.rewards(tokens, last, first=R.reply_first(prompts))
    is_first = batch.first == np.array([len(p) for p in prompts])
    assert is_first.sum() == len(gs)
    np.testing.assert_allclose(packed[is_first], alone[is_first], rtol=1e-12, atol=1e-14)
    assert np.all(np.abs(packed[~is_first] - alone[~is_first]) > 1e-6), "later replies see the earlier ones"


def test_packed_rows_shuffle_the_replies_by_the_seed_and_keep_their_ranks():
    """The same rng seed gives the same order; over seeds every order of 3 replies appears; each reply's tokens
    sit at first..last of its row, ending with <|eot_id|>, and `rank` says which reply of the group it is."""
    gs = groups()
    orders = set()
    for seed in range(40):
        a = R.packed_rows(gs, np.random.default_rng(seed), EOT)
        b = R.packed_rows(gs, np.random.default_rng(seed), EOT)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        for j in range(len(a.row)):
            prompt, replies = gs[a.row[j]]
            assert a.tokens[a.row[j], a.first[j]:a.last[j] + 1].tolist() == replies[a.rank[j]]
            assert a.tokens[a.row[j], :len(prompt)].tolist() == prompt
        orders.add(tuple(a.rank[a.row == 0]))
    assert len(orders) == 6
    better, worse = R.packed_pairs(a)
    assert np.all(a.row[better] == a.row[worse]) and np.all(a.rank[better] < a.rank[worse])
    assert len(R.group_pairs(gs)) == 3 + 1


def test_packed_rows_bad_input():
    rng = np.random.default_rng(0)
    (prompt, replies), _ = groups()
    with pytest.raises(ValueError, match=">= 2 distinct replies"):
        R.packed_rows([(prompt, replies[:1])], rng, EOT)
    with pytest.raises(ValueError, match=">= 2 distinct replies"):
        R.packed_rows([(prompt, [replies[0], replies[0]])], rng, EOT)
    with pytest.raises(ValueError, match="reply 1 does not end with <|eot_id|>"):
        R.packed_rows([(prompt, [replies[0], replies[1][:-1]])], rng, EOT)
    with pytest.raises(ValueError, match="longer than max_seq_len=12"):
        R.packed_rows([(prompt, replies)], rng, EOT, max_seq_len=12)
    with pytest.raises(ValueError, match="the prompt is empty"):
        R.packed_rows([([], replies)], rng, EOT)
    with pytest.raises(ValueError, match="no groups"):
        R.packed_rows([], rng, EOT)
    # fit_groups: the longest best-first prefix that fits (4 + 5 + 3 = 12), a group of < 2 left is dropped
    assert R.fit_groups([(prompt, replies)], 12) == [(prompt, replies[:2])]
    assert R.fit_groups([(prompt, replies)], 11) == []


def story_groups(tok, n=6):
    from llama3np.tokenizer import ChatFormat

    fmt = ChatFormat(tok)
    texts = ["Once upon a time, there was a kind girl named Mia.", "Once upon a time, there was a dog.",
             "The end."]
    return [(fmt.encode_dialog_prompt([{"role": "user", "content": f"Write story {i}."}]),
             [tok.encode(t, bos=False, eos=False) + [tok.eot_id] for t in texts[:2 + i % 2]]) for i in range(n)]


@pytest.mark.parametrize("logp_weight", [None, 0.5])
def test_packed_rm_training_resumed_after_a_crash_ends_like_an_uninterrupted_run(tok, tmp_path, monkeypatch,
                                                                                logp_weight):
    data = story_groups(tok)
    eval_pairs = R.group_pairs(data[:2])
    pooling = "last" if logp_weight is None else "mean"
    rm = lambda seed, lw=logp_weight: R.RewardModel(small_model(tok, seed=seed), seed=seed, pooling=pooling,
                                                   logp_weight=lw)
    whole = rm(1)
    recs = R.train_rm(whole, data, tmp_path / "whole", steps=5, batch_size=2, save_every=2, packed=True,
                      eval_pairs=eval_pairs)
    assert {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"} <= set(recs[0])
    real, calls = R.RewardModel.packed_loss_and_grads, []

    def dying(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:  # step 4: after the checkpoint of step 2, before the one of step 4
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(R.RewardModel, "packed_loss_and_grads", dying)
    with pytest.raises(KeyboardInterrupt):
        R.train_rm(rm(1), data, tmp_path / "crashed", steps=5, batch_size=2,
                   save_every=2, packed=True, eval_pairs=eval_pairs)
    monkeypatch.setattr(R.RewardModel, "packed_loss_and_grads", real)
    resumed = rm(9)  # other weights (logp_weight is a setting: it must match): all must come from the checkpoint
    with pytest.raises(ValueError, match="--resume needs the arguments"):
        R.train_rm(resumed, data, tmp_path / "crashed", steps=5, batch_size=2, save_every=2, resume=True,
                   eval_pairs=eval_pairs)  # packed=False: another run
    R.train_rm(resumed, data, tmp_path / "crashed", steps=5, batch_size=2, save_every=2, resume=True, packed=True,
               eval_pairs=eval_pairs)
    for name in whole.params:
        np.testing.assert_array_equal(whole.params[name], resumed.params[name], err_msg=name)
    logs = [json.loads(line) for line in (tmp_path / "crashed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5]
    loaded = R.load_reward_model(tmp_path / "crashed")
    assert loaded.score.tolist() == whole.score.tolist() and loaded.pooling == pooling
    if logp_weight is None:
        assert loaded.logp_weight is None and R.LOGP not in loaded.params
    else:
        assert loaded.logp_weight.tolist() == whole.logp_weight.tolist() != [logp_weight], "trained, and saved"


def test_train_rm_packed_rejects_bad_groups_before_training(tok, tmp_path):
    data = story_groups(tok)
    bad = data + [(data[0][0], [data[0][1][0][:-1], data[0][1][1]])]
    with pytest.raises(ValueError, match="group 6: reply 0 does not end with <|eot_id|>"):
        R.train_rm(R.RewardModel(small_model(tok)), bad, tmp_path / "rm", steps=1, packed=True)
    assert not (tmp_path / "rm").exists()
