"""Our MMLU log-likelihoods against transformers' LlamaForCausalLM scored the harness's way.

The same checkpoint (a random llama3np model written with save(format="hf")) is read by transformers; for
every item the harness's computation is done on their side: one full forward per (prompt, choice), the
log-softmax of the logits at the continuation's positions, summed. Ours comes from `mmlu.evaluate`, with
the shared k-shot prefix cache and the batched continuations. float32 on both sides: relative error
max|ours - theirs| / max|theirs| < 1e-4 (float32 rounding of two different summation orders, ~1e-6 seen).
"""
import numpy as np
import pytest

import llama3np
from llama3np.eval import mmlu, scoring, story_mmlu
from test_eval import TOK


def harness_loglikelihoods(hf, torch, ctx, conts):
    out = []
    for cont in conts:
        tokens = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = hf(tokens).logits[0, :-1].double()  # position t predicts t + 1
        lp = torch.log_softmax(logits, dim=-1)[len(ctx) - 1:]
        out.append(float(sum(lp[j, t] for j, t in enumerate(cont))))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("labels", [mmlu.LETTERS, ("1", "2", "3", "4")], ids=["letters", "digits"])
def test_four_log_likelihoods_of_every_item_match_transformers(transformers, torch, tmp_path, labels):
    args = llama3np.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TOK.n_words, hidden_dim=64,
                              max_seq_len=2048)
    model = llama3np.Transformer(args, seed=3)
    model.params["output.weight"] *= 30  # a peakier distribution than random init: differences show
    llama3np.save(model, tmp_path, format="hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()

    questions, dev = story_mmlu.generate_split(2, 1, seed=7, subjects=("pronouns", "past_tense"))
    ours = mmlu.evaluate(model, TOK, questions, dev, k_shot=1, labels=labels)
    theirs = []
    for subject, items in questions.items():
        for q in items:
            prompt = mmlu.format_prompt(subject, mmlu.select_shots(dev[subject], q, 1), q, labels=labels)
            ctx, conts = scoring.encode_choices(TOK, prompt, mmlu.continuations(q, labels=labels))
            theirs.append(harness_loglikelihoods(hf, torch, ctx, conts))
    a = np.array([it["logprobs"] for it in ours["items"]])
    b = np.array(theirs)
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    print(f"\nMMLU log-likelihoods vs transformers ({labels[0]}..): relative error {err:.2e}")
    assert err < 1e-4
    assert [it["pred"] for it in ours["items"]] == [int(np.argmax(r)) for r in b]
