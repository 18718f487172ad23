# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 — Post-training: SFT, a reward model, rejection sampling, DPO and PPO, on a task whose truth is known
#
# Llama 3's instruction tuning (paper, section 4) turns a pre-trained model into an assistant in rounds:
# supervised fine-tuning (SFT), a reward model (RM) trained on preference pairs, rejection sampling (the RM
# picks the best of K samples, which become SFT data), and direct preference optimisation (DPO); PPO is the
# RLHF method beside them. Here each one is a loss with a hand-written backward (`llama3np/posttrain/`), run
# on a tiny story model, and measured against an **exact** judge: the instructions ask for features of a
# story, and the grammar that wrote the pre-training stories can parse any reply and say which it has.
#
# Set `LLAMA3NP_NOTEBOOK_FAST=1` for a toy run (the tests do this); the full pipeline takes about 13 minutes on 2 cores (2.2-2.8 of them pre-training).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from llama3np.posttrain import losses as L
from llama3np.posttrain import story_task as task
from llama3np.exercises import check

FAST = os.environ.get("LLAMA3NP_NOTEBOOK_FAST") == "1"
np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. The task and its exact checker
# An instruction names 2 or 3 demands. `write_story(demands, seed)` runs the grammar with those decisions
# forced (SFT data); `check` parses a text with the grammar and says which demands it meets.

# %%
ins = task.instructions(1, seed=4)[0]
print(ins.text, "\n", ins.demands)
story = task.write_story(ins.demands, seed=11)
print("\n" + story)
print("\nmet:", task.check(ins.demands, story), "  a free story:", task.check(ins.demands, task.write_story((), 11)))
print("a story cut after its first sentence meets only what it wrote:",
      task.check(ins.demands, story[:story.index(".") + 1] + " And then nothing."))

# %% [markdown]
# ## 2. The losses, each beside its formula
# **Sequence log-prob** $\log \pi(y|x) = \sum_t m_t \log \mathrm{softmax}(z_{t-1})[y_t]$: the logits at $t-1$
# predict token $t$, so the mask's first column is ignored. **DPO**
# $L = -\log\sigma\big(\beta[(\log\pi_c - \log\pi^{ref}_c) - (\log\pi_r - \log\pi^{ref}_r)]\big)$:
# at $\pi = \pi^{ref}$ the margin is 0, the loss is $\ln 2$ and $\partial L/\partial\Delta = -\beta/2$.

# %%
c, r = np.array([-30.0, -12.0]), np.array([-28.0, -15.0])
loss, cache = L.dpo_forward(c, r, c, r, beta=0.1)
print(f"DPO at policy = reference: {loss:.6f} (ln 2 = {np.log(2):.6f}); dL/dDelta per pair = "
      f"{L.dpo_backward(1.0, cache)[0] * 2}")

# %% [markdown]
# **PPO's clipped surrogate** $\max(-A\rho, -A\,\mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon))$, $\rho = \pi/\pi_{old}$:
# once the ratio has moved $\epsilon$ in the direction the advantage favours, the loss goes flat and the
# gradient is zero, so one batch cannot push the policy far.

# %%
ratios = np.linspace(0.5, 1.5, 201)
fig, ax = plt.subplots(1, 2, figsize=(8, 2.8))
for A in (1.0, -1.0):
    lp = np.log(ratios)
    per_token = [L.ppo_policy_loss_forward(np.array([[x]]), np.zeros((1, 1)), np.array([[A]]), np.ones((1, 1)))[0]
                 for x in lp]
    ax[0].plot(ratios, per_token, label=f"A = {A:+.0f}")
ax[0].set_xlabel("ratio pi / pi_old")
ax[0].set_title("PPO policy loss (clip 0.2)")
ax[0].legend()
# k1 and k3: two unbiased estimates of KL(pi || ref) from samples of pi; k3 is never negative
rng = np.random.default_rng(0)
logpi = np.log(rng.dirichlet(np.ones(30)))
logref = np.log(rng.dirichlet(np.ones(30)))
exact = np.sum(np.exp(logpi) * (logpi - logref))
x = rng.choice(30, size=4000, p=np.exp(logpi))
for est in ("k1", "k3"):
    k, _ = L.kl_forward(logpi[x], logref[x], est)
    ax[1].hist(k, bins=60, alpha=0.5, label=f"{est}: mean {k.mean():.3f}")
ax[1].axvline(exact, color="k", lw=1)
ax[1].set_title(f"per-sample KL estimates (exact {exact:.3f})")
ax[1].legend()
fig.tight_layout()

# %% [markdown]
# **GAE** $A_t = \sum_l (\gamma\lambda)^l \delta_{t+l}$, $\delta_t = r_t + \gamma V_{t+1} - V_t$: the
# backwards loop and the vectorised form agree; $\lambda = 1$ gives returns minus values, $\lambda = 0$ the TD errors.

# %%
rew, val = rng.standard_normal((2, 6)), rng.standard_normal((2, 6))
mask = np.ones((2, 6), bool)
print("loop == vectorised:", np.allclose(L.gae_loop(rew, val, mask, 1.0, 0.95)[0], L.gae(rew, val, mask, 1.0, 0.95)[0],
                                          atol=1e-12))
print("lambda=1: A = returns - V:", np.allclose(L.gae(rew, val, mask, 1.0, 1.0)[0],
                                               np.cumsum(rew[:, ::-1], 1)[:, ::-1] - val))

# %%
check("ex19", "ex20")  # exercises: the DPO loss and its gradient, GAE

# %% [markdown]
# ## 3. The whole pipeline
# Pre-train (or load) a story model on stories and text in which reading back pays (the grammar names
# everything once, so single stories never reward it, and an instruction needs exactly that): synopses
# ("A story about a girl named Lily who meets a fox.", then the story) and series of stories that share
# features, each document attending only to itself (Llama 3's document mask; without the mask and the
# synopses the 400-step model never learnt to use a summary). SFT on instructions of 2-5 demands with forced stories (the rate decaying to a tenth); a reward model from the SFT model
# (Bradley-Terry over edited > chosen > rejected, wrong-value and slip edits, and the SFT model's own samples ranked by the checker; its
# reward is the head's mean over the reply's tokens, where a demand met or missed shows, plus the reply's mean
# log-likelihood under the RM's own LM head, which sees a name other than the one asked for); rejection sampling (the RM's best 2 of K = 16 replies to each prompt, then SFT on the winners alone; `rs_sft_mix` mixes demonstrations in, as Llama 3 mixes its SFT data); DPO (beta 1, where Llama 3's 0.1 kept pushing the pairs it already ordered; the NLL term on chosen replies at 5 in TRL's
# per-token normalisation, formatting tokens masked; pairs built-in and from the policy's samples); PPO (value model from the RM, KL
# penalty, GAE, clipping, adaptive KL). After each stage: the ground-truth score of sampled replies to
# held-out instructions, and the KL from the SFT model.

# %%
if __name__ == "__main__":  # the stages spawn nothing, but keep the heavy run importable-safe
    import copy
    import tempfile

    from llama3np.posttrain.demo import FAST as FAST_CFG, DemoConfig, run_demo

    out = tempfile.mkdtemp(prefix="posttrain-")
    table, figures = run_demo(out, cfg=copy.deepcopy(FAST_CFG) if FAST else DemoConfig())

# %% [markdown]
# ## 4. The reward / KL picture
# Left: best-of-N by the reward model, the true score of the pick against N, and the measured
# KL(best-of-N || policy) under its bound log N - (N-1)/N. Right: score against KL from the SFT model for
# every stage.

# %%
if __name__ == "__main__":
    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    bon = figures["best_of_n"]
    ns = sorted(int(n) for n in bon)
    ax[0].plot(ns, [bon[n]["true_score"] for n in ns], "o-", label="true score of the RM's pick")
    ax0b = ax[0].twinx()
    ax0b.plot(ns, [bon[n]["kl"] for n in ns], "s--", color="C1", label="KL(best-of-N || policy)")
    ax0b.plot(ns, [bon[n]["kl_bound"] for n in ns], ":", color="C1", label="log N - (N-1)/N")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("N")
    ax[0].legend(loc="upper left", fontsize=7)
    ax0b.legend(loc="lower right", fontsize=7)
    for stage, score, kl, *_ in table:
        if np.isfinite(kl):  # the pre-trained model comes before the SFT model: no KL from it
            ax[1].scatter([kl], [score], label=stage)
    ppo = [r for r in figures["ppo_log"] if r.get("objective/true_score") is not None]
    ax[1].set_xlabel("KL(stage || SFT) per reply")
    ax[1].set_ylabel("ground-truth score")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    print("PPO iterations (true score of the rollout, objective/kl):",
          [(r["step"], round(r["objective/true_score"], 3), round(r["objective/kl"], 2)) for r in ppo])

# %% [markdown]
# ## 5. Try it: demonstrations with mistakes
# Here every demonstration meets every demand, and the stages after SFT have little to add: SFT already
# imitates a perfect annotator. Human demonstrations have mistakes. `DemoConfig(sft_wrong_fraction=0.3)`
# (`llama3np posttrain demo --annotator-errors 0.3`) writes 30% of them with one demanded value wrong. Measured
# on 256 held-out instructions (the demo's seed 0): SFT 0.65, RS 0.68, DPO 0.67, PPO 0.69 (at 0.6: 0.59, 0.62,
# 0.64, 0.65), each stage a little above the last where the reward model's picks beat the demonstrations. That
# depends on the model: at `seed=1` (another pre-trained model) SFT 0.62, RS 0.62, DPO 0.61, PPO 0.61. A larger RS
# round (`rs_prompts=256, rs_sft_steps=120, rs_lr=3e-4`) raised the score at both seeds, but as many more SFT steps
# at that rate did as much at seed 0: the README has the table. Two
# things to look for in `figures["by_kind"]`: at 0.3 the names fall from 0.90 to 0.30 although only ~9% of the
# demonstrated names are wrong (a copied value is learnt slowly, and counter-examples slow it more); at 0.1 SFT
# still reaches 0.84 (0.90 with perfect demonstrations), and the stages after it move within the noise.
