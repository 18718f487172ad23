"""The public post-training functions on a whole model: finite differences in float64, and (with the
[ref] extra) torch autograd on transformers' LlamaForCausalLM holding the same weights."""
import math

import numpy as np
import pytest

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
