# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 — Evaluation: MMLU, byte for byte, and how much the number moves
#
# Llama 3's announcement measures the models by MMLU 5-shot and warns that such numbers "should be regarded
# seriously, not literally": they move with the prompt and with the scoring rule. Here we write the prompt
# exactly as lm-evaluation-harness does, score it the way the harness does (the log-likelihood of each answer
# letter), make it fast with a KV cache of the k-shot prefix, and then watch the number move under changes
# that should not matter.
#
# Set `LLAMA3NP_NOTEBOOK_FAST=1` for a quick run (the tests do this).

# %%
import os
import tempfile

import numpy as np

import llama3np
from llama3np.eval import mmlu, report, robustness, scoring, story_mmlu
from llama3np.training import TrainConfig, train
from llama3np.exercises import check

FAST = os.environ.get("LLAMA3NP_NOTEBOOK_FAST") == "1"
np.set_printoptions(precision=3, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. One prompt, shown whole
# A question is a dict: the text, four choices, the index of the gold one. Real MMLU questions ship inside
# lm-evaluation-harness (`pip install --no-deps lm-eval`: 281 four-option questions of MMLU's *dev* split,
# inside its chain-of-thought prompts); without it we use questions generated from our story grammar.

# %%
try:
    from llama3np.eval import data

    real, defects = data.read_lm_eval_cot()
    subject = "astronomy"
    shots, question = real[subject][:2], real[subject][2]
    print(f"{sum(map(len, real.values()))} real MMLU dev questions; cleaned: {len(defects)} defects")
except FileNotFoundError:
    generated, dev = story_mmlu.generate_split(3, 2)
    subject, shots, question = "story_remedies", dev["story_remedies"], generated["story_remedies"][0]
prompt = mmlu.format_prompt(subject, shots, question)  # lm-evaluation-harness's default template
print(prompt)

# %% [markdown]
# The answer is never in the prompt: the model is asked for the next token after `Answer:`. hendrycks'
# original script writes the same thing with two differences: the subject keeps a leading space (so
# "about  astronomy" has two spaces) and the questions are not stripped. Small, but a different string:

# %%
original = mmlu.format_prompt(subject, shots, question, style="original")
print(repr(original[:90]))
print(repr(prompt[:90]))
print("identical:", original == prompt)

# %% [markdown]
# ## 2. Scoring: four log-likelihoods
# The harness's rule: score each choice by log P(" A" | prompt) ... log P(" D" | prompt) and predict the
# argmax (ties go to the first letter). With Llama 3's tokenizer " A" is one token, so each score is one
# entry of the next-token distribution. We need a model: a tiny Llama 3 trained for a moment on the stories.

# %%
run_dir = tempfile.mkdtemp()
overrides = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192) if FAST else {}
model = train(TrainConfig(out=run_dir, preset="tiny", steps=20 if FAST else 300, seq_len=128 if FAST else 256,
                          model_overrides=overrides, eval_every=10_000, save_every=10_000, progress=False),
              log=lambda m: None)
tok = model.tokenizer
print(model.args)

# %%
questions, dev = story_mmlu.generate_split(4 if FAST else 40, 2)
q = questions["story_remedies"][0]
p = mmlu.format_prompt("story_remedies", dev["story_remedies"][:1], q)
ctx, conts = scoring.encode_choices(tok, p, mmlu.continuations(q))
print(p[-400:])
print("\ncontinuation tokens:", conts)
shared = scoring.PrefixCache(model, tok.encode(mmlu.format_prefix("story_remedies", dev["story_remedies"][:1]),
                                                bos=True, eos=False), len(ctx) + 4, rows=4)
lps = shared.loglikelihoods(ctx, conts)
print("log P(' A' ...' D' | prompt) =", lps, "-> predicts", "ABCD"[int(np.argmax(lps))], "; gold", "ABCD"[q["answer"]])

# %% [markdown]
# The cache is exact, not an approximation: the keys and values of the shared prefix (BOS, header, shots)
# depend only on those tokens, so computing them once per subject changes nothing. The harness's way, one
# full forward per (prompt, choice), gives the same numbers:

# %%
full = [scoring.loglikelihood_full(model, ctx, c) for c in conts]
print("full recomputation:", np.array(full), " max difference:", np.max(np.abs(np.array(full) - lps)))

# %%
check("ex21")  # exercise: scoring a continuation by log-likelihood

# %% [markdown]
# ## 3. Accuracy on the story-world MMLU
# Five generated subjects whose answers the grammar knows. The lettered format asks for a skill our story
# model never saw (reading "A. ... B. ..." and answering with a letter); the cloze format asks what it
# knows (which continuation the stories use). A random model is the baseline for both.

# %%
random_model = llama3np.Transformer(model.args, seed=1)
for name, m in [("trained", model), ("random", random_model)]:
    for style, k in [("harness", 2), ("cloze", 0)]:
        r = mmlu.evaluate(m, tok, questions, dev, k_shot=k, style=style)
        lo, hi = r["micro_ci95"]
        print(f"{name:8s} {style:8s} {k}-shot: micro {r['micro']:.1%} [{lo:.1%}, {hi:.1%}], macro {r['macro']:.1%}")
print()
print(report.format_table(mmlu.evaluate(model, tok, questions, dev, k_shot=0, style="cloze"), "trained, cloze"))

# %% [markdown]
# ## 4. How much the number moves (Llama 3 paper, section 5.1.2)
# The same questions, scored again with other answer labels, with the choices rotated, and with k-shot
# examples whose answers are all the same letter. For a model that reads the options, none of these should
# matter; the spread says how much they do.

# %%
rep = robustness.robustness_report(model, tok, questions, dev, k_shot=2)
for family, values in rep.items():
    if family != "spread":
        print(f"{family:18s}", ", ".join(f"{k}: {v:.1%}" for k, v in values.items()),
              f"  spread {rep['spread'][family]:.1%}")
fig = robustness.plot_robustness(rep)
fig
