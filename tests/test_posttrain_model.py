"""The public post-training functions on a whole model: finite differences in float64, and (with the
[ref] extra) torch autograd on transformers' LlamaForCausalLM holding the same weights."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llama3np
from llama3np.gradcheck import numerical_grad, rel_error
from llama3np.posttrain import dpo_loss_and_grads, sequence_logps
from llama3np.posttrain import losses as L

V = 37


def tiny_model(dtype=np.float64, seed=0, **kw):
    args = llama3np.ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, hidden_dim=24,
                              max_seq_len=32, **kw)
    model = llama3np.Transformer(args, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.params.items():  # norms away from 1 and bigger weights: sharper distributions
        p[...] = p + (0.3 * rng.standard_normal(p.shape) if p.ndim == 1 else 0.1 * rng.standard_normal(p.shape))
    return model


def pair_batch(seed=0, B=2, Tc=7, Tr=5):
    rng = np.random.default_rng(seed)
    chosen, rejected = rng.integers(0, V, (B, Tc)), rng.integers(0, V, (B, Tr))
    cm, rm = np.ones((B, Tc), bool), np.ones((B, Tr), bool)
    cm[:, :3], rm[:, :3] = False, False  # a 3-token prompt, shared
    cm[1, -1] = False  # a padded row
    return chosen, cm, rejected, rm


def sample_indices(p, n, rng):
    return rng.choice(p.size, size=min(n, p.size), replace=False)


def test_sequence_logps_is_the_masked_sum_of_log_softmax():
    model = tiny_model()
    chosen, cm, _, _ = pair_batch()
    logits = model.forward(chosen)
    ls = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [sum(ls[b, t - 1, chosen[b, t]] for t in range(1, chosen.shape[1]) if cm[b, t]) for b in range(2)]
    np.testing.assert_allclose(sequence_logps(model, chosen, cm), want, rtol=1e-12)
    cm0 = cm.copy()
    cm0[:, 0] = True
    assert np.array_equal(sequence_logps(model, chosen, cm0), sequence_logps(model, chosen, cm))


@pytest.mark.parametrize("nll_coef", [0.0, 0.2])
def test_dpo_whole_model_gradients_match_finite_differences(nll_coef):
    model = tiny_model()
    chosen, cm, rejected, rm = pair_batch()
    ref_c = sequence_logps(model, chosen, cm) + np.array([0.3, -0.2])  # a reference that differs a little
    ref_r = sequence_logps(model, rejected, rm) + np.array([-0.1, 0.4])
    f = lambda: dpo_loss_and_grads(model, chosen, cm, rejected, rm, ref_c, ref_r, beta=0.5, nll_coef=nll_coef)[0]
    _, grads, _ = dpo_loss_and_grads(model, chosen, cm, rejected, rm, ref_c, ref_r, beta=0.5, nll_coef=nll_coef)
    assert set(grads) == set(model.params)
    rng = np.random.default_rng(1)
    for name in ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight",
                 "layers.0.attention_norm.weight", "norm.weight", "output.weight"]:
        idx = sample_indices(model.params[name], 12, rng)
        num = numerical_grad(f, model.params[name], indices=idx)
        err = rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx])
        assert err < 1e-6, (name, err)


def test_dpo_at_policy_equal_reference_is_ln2():
    model = tiny_model()
    chosen, cm, rejected, rm = pair_batch()
    ref_c, ref_r = sequence_logps(model, chosen, cm), sequence_logps(model, rejected, rm)
    loss, _, m = dpo_loss_and_grads(model, chosen, cm, rejected, rm, ref_c, ref_r)
    assert loss == pytest.approx(math.log(2), abs=1e-12)
    assert m["rewards/margins"] == pytest.approx(0, abs=1e-12) and m["rewards/accuracies"] == 0


def test_dpo_nll_term_is_the_mean_ce_over_every_chosen_token():
    model = tiny_model()
    chosen, cm, rejected, rm = pair_batch()
    ref_c, ref_r = sequence_logps(model, chosen, cm), sequence_logps(model, rejected, rm)
    l0, _, _ = dpo_loss_and_grads(model, chosen, cm, rejected, rm, ref_c, ref_r, nll_coef=0.0)
    l1, _, m = dpo_loss_and_grads(model, chosen, cm, rejected, rm, ref_c, ref_r, nll_coef=0.2)
    nll = -sequence_logps(model, chosen, cm).sum() / cm[:, 1:].sum()
    assert l1 - l0 == pytest.approx(0.2 * nll, rel=1e-10) and m["nll_loss"] == pytest.approx(nll, rel=1e-12)


def test_dpo_bad_input():
    model = tiny_model()
    chosen, cm, rejected, rm = pair_batch()
    z = np.zeros(2)
    with pytest.raises(ValueError, match="rows"):
        dpo_loss_and_grads(model, chosen, cm, rejected[:1], rm[:1], z, z)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss_and_grads(model, chosen, cm[:, :-1], rejected, rm, z, z)
    with pytest.raises(ValueError, match="vocabulary"):
        dpo_loss_and_grads(model, chosen + V, cm, rejected, rm, z, z)


# ---------------------------------------------------------------------------------------------------
# [ref]: the same gradients from torch autograd on transformers' LlamaForCausalLM


def hf_twin(model, transformers, tmp_path):
    llama3np.save(model, tmp_path / "hf", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    return hf.float().eval()


def hf_grads_by_meta_name(hf, model):
    from llama3np.formats import hf_to_meta_name, unpermute_rotary

    out = {}
    for name, p in hf.named_parameters():
        g = p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
        meta = hf_to_meta_name(name)
        if meta.endswith("attention.wq.weight"):
            g = unpermute_rotary(g, model.args.n_heads)
        elif meta.endswith("attention.wk.weight"):
            g = unpermute_rotary(g, model.args.n_kv_heads)
        out[meta] = g
    return out


def torch_seq_logps(torch, logits, tokens, mask):
    ls = torch.log_softmax(logits[:, :-1], -1)
    lp = torch.gather(ls, 2, tokens[:, 1:, None])[..., 0]
    return (lp * mask[:, 1:]).sum(-1), lp


def assert_grads_close(ours, theirs, tol=1e-3):
    assert set(ours) == set(theirs)
    errs = {k: rel_error(ours[k], theirs[k]) for k in ours}
    bad = {k: e for k, e in errs.items() if e >= tol}
    assert not bad, bad


def test_dpo_gradients_match_torch_autograd_on_transformers(transformers, torch, tmp_path):
    model = tiny_model(np.float32)
    hf = hf_twin(model, transformers, tmp_path)
    chosen, cm, rejected, rm = pair_batch(B=3)
    ref_c = sequence_logps(model, chosen, cm) + np.array([0.3, -0.2, 0.1])
    ref_r = sequence_logps(model, rejected, rm) + np.array([-0.1, 0.4, 0.0])
    loss, grads, _ = dpo_loss_and_grads(model, chosen, cm, rejected, rm, ref_c, ref_r, beta=0.5, nll_coef=0.2)
    t = lambda a, dt=None: torch.from_numpy(np.asarray(a) if dt is None else np.asarray(a, dt))
    pc, lpc = torch_seq_logps(torch, hf(t(chosen)).logits, t(chosen), t(cm, np.float32))
    pr, _ = torch_seq_logps(torch, hf(t(rejected)).logits, t(rejected), t(rm, np.float32))
    z = 0.5 * ((pc - t(ref_c, np.float32)) - (pr - t(ref_r, np.float32)))
    nll = -(lpc * t(cm, np.float32)[:, 1:]).sum() / float(cm[:, 1:].sum())
    hf_loss = -torch.nn.functional.logsigmoid(z).mean() + 0.2 * nll
    hf_loss.backward()
    assert loss == pytest.approx(hf_loss.item(), rel=1e-4)
    assert_grads_close(grads, hf_grads_by_meta_name(hf, model))


# ---------------------------------------------------------------------------------------------------
# reward model, PPO policy and value losses, SFT on the whole model


def rm_batch(seed=0, B=2):
    rng = np.random.default_rng(seed)
    chosen, rejected = rng.integers(0, V, (B, 7)), rng.integers(0, V, (B, 5))
    return chosen, np.array([6, 4]), rejected, np.array([4, 3])


def test_reward_model_gradients_match_finite_differences():
    from llama3np.posttrain.reward_model import SCORE, RewardModel

    rm = RewardModel(tiny_model(), seed=1)
    rm.score *= 20  # rewards of order 1: the loss is not flat
    c, lc, r, lr = rm_batch()
    f = lambda: rm.loss_and_grads(c, lc, r, lr, margin=0.1)[0]
    _, grads, _ = rm.loss_and_grads(c, lc, r, lr, margin=0.1)
    assert set(grads) == set(rm.params)
    assert np.all(grads["output.weight"] == 0), "the LM head is not part of the reward"
    rng = np.random.default_rng(2)
    for name in [SCORE, "tok_embeddings.weight", "layers.1.attention.wk.weight", "layers.0.feed_forward.w1.weight",
                 "norm.weight"]:
        idx = sample_indices(rm.params[name], 10, rng)
        num = numerical_grad(f, rm.params[name], indices=idx)
        assert rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx]) < 1e-6, name


def test_mean_pooled_reward_gradients_match_finite_differences_and_ignore_the_prompt():
    """pooling="mean": the reward is the head's mean over the reply tokens first..last, so the gradient reaches the
    head only through those positions; the same loss and backward as "last", with other pooling weights."""
    from llama3np.posttrain.reward_model import SCORE, RewardModel

    rm = RewardModel(tiny_model(), seed=1, pooling="mean")
    rm.score *= 20
    c, lc, r, lr = rm_batch()
    fc, fr = np.array([3, 2]), np.array([2, 3])
    f = lambda: rm.loss_and_grads(c, lc, r, lr, 0.1, fc, fr)[0]
    _, grads, _ = rm.loss_and_grads(c, lc, r, lr, 0.1, fc, fr)
    rng = np.random.default_rng(3)
    for name in [SCORE, "tok_embeddings.weight", "layers.0.attention.wq.weight", "norm.weight"]:
        idx = sample_indices(rm.params[name], 10, rng)
        num = numerical_grad(f, rm.params[name], indices=idx)
        assert rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx]) < 1e-6, name
    v = rm.values(c)
    np.testing.assert_allclose(rm.rewards(c, lc, first=fc), [v[0, 3:7].mean(), v[1, 2:5].mean()], rtol=1e-12)
    with pytest.raises(ValueError, match="needs `first`"):
        rm.rewards(c, lc)
    with pytest.raises(ValueError, match="pooling must be one of"):
        RewardModel(tiny_model(), pooling="max")


def test_reward_with_the_logp_term_matches_finite_differences_and_its_formula():
    """logp_weight: reward = the pooled head + logp_weight * the reply's mean log-likelihood under the reward
    model's own LM head, one forward. The gradient reaches the LM head (output.weight) and logp_weight itself."""
    from llama3np.posttrain.logprobs import token_logps
    from llama3np.posttrain.reward_model import LOGP, SCORE, RewardModel

    rm = RewardModel(tiny_model(), seed=1, pooling="last", logp_weight=0.7)
    rm.score *= 20
    c, lc, r, lr = rm_batch()
    fc, fr = np.array([3, 2]), np.array([2, 3])
    lp = token_logps(rm.model, c)
    head = rm.values(c)[[0, 1], lc]
    want = head + 0.7 * np.array([lp[0, 3:7].mean(), lp[1, 2:5].mean()])
    np.testing.assert_allclose(rm.rewards(c, lc, first=fc), want, rtol=1e-12)
    f = lambda: rm.loss_and_grads(c, lc, r, lr, 0.1, fc, fr)[0]
    _, grads, _ = rm.loss_and_grads(c, lc, r, lr, 0.1, fc, fr)
    assert set(grads) == set(rm.params) and np.any(grads["output.weight"] != 0)
    rng = np.random.default_rng(4)
    for name in [LOGP, SCORE, "output.weight", "tok_embeddings.weight", "layers.1.attention.wv.weight",
                 "norm.weight"]:
        idx = sample_indices(rm.params[name], 10, rng)
        num = numerical_grad(f, rm.params[name], indices=idx)
        assert rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx]) < 1e-6, name
    with pytest.raises(ValueError, match="logp_weight needs `first`"):
        rm.rewards(c, lc)
    with pytest.raises(ValueError, match="finite"):
        RewardModel(tiny_model(), logp_weight=float("nan"))


def ppo_batch(model, seed=0):
    from llama3np.posttrain.logprobs import token_logps

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (3, 8))
    mask = np.zeros((3, 8), bool)
    mask[:, 3:] = True
    mask[2, 6:] = False
    old = token_logps(model, tokens) + rng.standard_normal((3, 8)) * 0.4  # ratios on both sides of the clip
    adv = rng.standard_normal((3, 8))
    return tokens, mask, old, adv


def test_ppo_policy_gradients_match_finite_differences():
    from llama3np.posttrain.ppo import policy_loss_and_grads

    model = tiny_model()
    tokens, mask, old, adv = ppo_batch(model)
    f = lambda: policy_loss_and_grads(model, tokens, old, adv, mask, 0.2)[0]
    _, grads, stats = policy_loss_and_grads(model, tokens, old, adv, mask, 0.2)
    assert 0 < stats["policy/clipfrac_avg"] < 1
    rng = np.random.default_rng(3)
    for name in ["tok_embeddings.weight", "layers.0.attention.wv.weight", "output.weight", "norm.weight"]:
        idx = sample_indices(model.params[name], 10, rng)
        num = numerical_grad(f, model.params[name], indices=idx)
        assert rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx]) < 1e-6, name


def test_ppo_value_gradients_match_finite_differences():
    from llama3np.posttrain.ppo import value_loss_and_grads
    from llama3np.posttrain.reward_model import SCORE, RewardModel

    vm = RewardModel(tiny_model(), seed=2)
    vm.score *= 20
    tokens, mask, _, _ = ppo_batch(vm.model)
    rng = np.random.default_rng(4)
    old_v, ret = rng.standard_normal((3, 8)) * 0.3, rng.standard_normal((3, 8))
    f = lambda: value_loss_and_grads(vm, tokens, old_v, ret, mask, 0.2)[0]
    _, grads, _ = value_loss_and_grads(vm, tokens, old_v, ret, mask, 0.2)
    for name in [SCORE, "layers.1.feed_forward.w3.weight", "tok_embeddings.weight"]:
        idx = sample_indices(vm.params[name], 10, rng)
        num = numerical_grad(f, vm.params[name], indices=idx)
        assert rel_error(grads[name].reshape(-1)[idx], num.reshape(-1)[idx]) < 1e-6, name


def test_sft_prompt_tokens_get_zero_gradient_through_the_loss():
    """Only the embedding rows of tokens read somewhere get gradient; a prompt-only token id is read but
    never predicted, so the LM head's row for it gets only the softmax's push-down, and changing the
    prompt's *targets* (what the prompt positions would predict) changes nothing."""
    from llama3np.posttrain.sft import sft_loss_and_grads

    model = tiny_model()
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, V, (2, 9))
    mask = np.zeros((2, 9), bool)
    mask[:, 5:] = True
    loss, g = sft_loss_and_grads(model, tokens, mask)
    logits = model.forward(tokens)
    dl = L.sft_cross_entropy_backward(1.0, L.sft_cross_entropy_forward(logits, tokens, mask)[1])
    assert np.all(dl[:, :4] == 0), "positions 0..3 predict prompt tokens 1..4: no gradient at their logits"
    tokens2 = tokens.copy()
    tokens2[:, 1:5] = (tokens2[:, 1:5] + 1) % V  # other prompt tokens... change the conditioning, so
    loss2, _ = sft_loss_and_grads(model, tokens2, mask)  # the loss changes only through the reply's context
    f = lambda: sft_loss_and_grads(model, tokens, mask)[0]
    idx = sample_indices(model.params["layers.0.attention.wq.weight"], 10, rng)
    num = numerical_grad(f, model.params["layers.0.attention.wq.weight"], indices=idx)
    assert rel_error(g["layers.0.attention.wq.weight"].reshape(-1)[idx], num.reshape(-1)[idx]) < 1e-6


@pytest.mark.parametrize("logp_weight", [None, 0.7])
def test_reward_model_gradients_match_torch_autograd(transformers, torch, tmp_path, logp_weight):
    from llama3np.posttrain.reward_model import LOGP, SCORE, RewardModel

    rm = RewardModel(tiny_model(np.float32), seed=1, logp_weight=logp_weight)
    rm.score *= 20
    hf = hf_twin(rm.model, transformers, tmp_path)
    c, lc, r, lr = rm_batch()
    first = np.array([2, 3])
    loss, grads, _ = rm.loss_and_grads(c, lc, r, lr, 0.0, first, first)
    score = torch.tensor(rm.score, requires_grad=True)
    lw = torch.tensor(0.0 if logp_weight is None else logp_weight, dtype=torch.float64, requires_grad=True)

    def reward(tokens, last):
        out = hf(torch.from_numpy(tokens), output_hidden_states=True)
        h = out.hidden_states[-1]  # after the final norm
        rew = (h @ score[0])[torch.arange(2), torch.from_numpy(last)].double()
        if logp_weight is None:
            return rew
        lp = torch.log_softmax(out.logits[:, :-1].double(), -1).gather(-1, torch.from_numpy(tokens[:, 1:, None]))[..., 0]
        m = [(lp[b, first[b] - 1:last[b]]).mean() for b in range(2)]  # logp of tokens first..last
        return rew + lw * torch.stack(m)

    hf_loss = -torch.nn.functional.logsigmoid(reward(c, lc) - reward(r, lr)).mean()
    hf_loss.backward()
    assert loss == pytest.approx(hf_loss.item(), rel=1e-4)
    theirs = hf_grads_by_meta_name(hf, rm.model)
    theirs[SCORE] = score.grad.numpy()
    if logp_weight is not None:
        theirs[LOGP] = lw.grad.numpy().reshape(1)
    else:
        assert np.all(grads["output.weight"] == 0)
    assert_grads_close(grads, theirs)


def test_ppo_policy_gradients_match_torch_autograd(transformers, torch, tmp_path):
    from llama3np.posttrain.ppo import policy_loss_and_grads

    model = tiny_model(np.float32)
    hf = hf_twin(model, transformers, tmp_path)
    tokens, mask, old, adv = ppo_batch(model)
    loss, grads, _ = policy_loss_and_grads(model, tokens, old, adv, mask, 0.2)
    logits = hf(torch.from_numpy(tokens)).logits
    lp = torch.gather(torch.log_softmax(logits[:, :-1], -1), 2, torch.from_numpy(tokens)[:, 1:, None])[..., 0]
    m = torch.from_numpy(mask[:, 1:].astype(np.float32))
    ratio = torch.exp(lp - torch.from_numpy(old[:, 1:].astype(np.float32)))
    a = torch.from_numpy(adv[:, 1:].astype(np.float32))
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 0.8, 1.2))
    hf_loss = (pg * m).sum() / m.sum()
    hf_loss.backward()
    assert loss == pytest.approx(hf_loss.item(), rel=1e-4)
    assert_grads_close(grads, hf_grads_by_meta_name(hf, model))


def test_packed_dialogs_do_not_leak_into_each_other():
    """Two dialogs packed in one row with doc_ids: changing every token of the first leaves the second's
    token log-probs bitwise unchanged, and the packed SFT loss equals the two dialogs' losses side by side."""
    from llama3np.posttrain import losses as L
    from llama3np.posttrain.sft import sft_loss_and_grads

    model = tiny_model()
    rng = np.random.default_rng(6)
    a, b = rng.integers(0, V, 9), rng.integers(0, V, 7)
    row = np.concatenate([a, b])[None]
    doc_ids = np.array([[0] * 9 + [1] * 7])
    lp = L.token_logps_forward(model.forward(row, doc_ids=doc_ids, keep=False), row)[0]
    row2 = row.copy()
    row2[0, :9] = (row2[0, :9] + 5) % V
    lp2 = L.token_logps_forward(model.forward(row2, doc_ids=doc_ids, keep=False), row2)[0]
    assert np.array_equal(lp[0, 10:], lp2[0, 10:]), "the second dialog reads nothing of the first"
    mask = np.ones_like(row, dtype=bool)
    mask[0, 9] = False  # the first token of the second dialog: predicted from the first dialog's last logit
    with pytest.raises(ValueError, match="first token"):
        sft_loss_and_grads(model, row, np.ones_like(mask), doc_ids)
    loss, _ = sft_loss_and_grads(model, row, mask, doc_ids)
    la = L.token_logps_forward(model.forward(a[None], keep=False), a[None])[0][0, 1:]
    lb = L.token_logps_forward(model.forward(b[None], keep=False), b[None])[0][0, 1:]
    # RoPE positions are absolute, so b's numbers agree up to rounding (relative positions are the same)
    assert loss == pytest.approx(-(la.sum() + lb.sum()) / (len(la) + len(lb)), rel=1e-10)


@settings(max_examples=12)
@given(lengths=st.lists(st.integers(4, 14), min_size=1, max_size=7), batch_size=st.integers(1, 4),
       seed=st.integers(0, 3))
def test_rewards_in_batches_of_similar_length_are_each_rows_own_reward_in_input_order(lengths, batch_size, seed):
    """rewards() sorts the rows by length and cuts each batch after its longest row: every reward must still be
    the one of its row scored alone, in the order given, whatever follows a row's last token (here random tokens,
    not padding: a causal model's values at `last` cannot see them). float64: equal to rounding (the batches'
    products have other shapes)."""
    from llama3np.posttrain.reward_model import RewardModel

    rm = RewardModel(tiny_model(), seed=1, pooling="mean", logp_weight=0.7)
    rm.score *= 20
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (len(lengths), 16))
    last = np.array(lengths) - 1
    first = np.full(len(lengths), 3)
    alone = [rm.rewards(tokens[b:b + 1, :last[b] + 1], last[b:b + 1], first=first[b:b + 1])[0]
             for b in range(len(lengths))]
    np.testing.assert_allclose(rm.rewards(tokens, last, batch_size, first), alone, rtol=1e-12, atol=1e-14)


@settings(max_examples=10)
@given(rows=st.integers(1, 7), chunk=st.integers(1, 4), seed=st.integers(0, 3))
def test_scoring_in_chunks_of_rows_changes_no_row(rows, chunk, seed):
    """sequence_logps and token_logps run SCORING_ROWS rows at a time: the same numbers (to float64 rounding)
    as one forward over the whole batch, for any batch and chunk size, the last chunk partial."""
    from llama3np.posttrain import logprobs

    model = tiny_model()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (rows, 9))
    mask = rng.random((rows, 9)) < 0.7
    whole_seq = L.sequence_logps_forward(model.forward(tokens, keep=False), tokens, mask)[0]
    whole_tok = L.token_logps_forward(model.forward(tokens, keep=False), tokens)[0]
    saved = logprobs.SCORING_ROWS
    try:
        logprobs.SCORING_ROWS = chunk
        np.testing.assert_allclose(sequence_logps(model, tokens, mask), whole_seq, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(logprobs.token_logps(model, tokens), whole_tok, rtol=1e-12, atol=1e-13)
    finally:
        logprobs.SCORING_ROWS = saved
