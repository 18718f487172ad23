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
# # 01 — The Llama 3 forward pass, one op at a time
#
# From text to next-token probabilities: the real Llama 3 tokenizer, then every op of the model in the
# order Meta's `llama/model.py` runs them, printing shapes as we go. At the end we check that our
# step-by-step version gives exactly what `Transformer.forward` gives.
#
# The model here has Llama 3's real vocabulary (128,256 tokens) and real architecture (RMSNorm, RoPE with
# theta 500,000 and the 3.1 scaling, grouped-query attention, SwiGLU), but it is tiny and random: the
# probabilities at the end are those of an untrained model. `llama3np.load(folder)` would put real weights
# in the same dict.

# %%
import numpy as np

import llama3np
from llama3np import ops
from llama3np.exercises import check, require

np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. Tokens
# Llama 3's tokenizer is tiktoken BPE with 128,000 learned tokens plus 256 special ones.
# `<|begin_of_text|>` (id 128000) starts every document.

# %%
tokenizer = llama3np.Tokenizer()
prompt = "The capital of France is"
ids = tokenizer.encode(prompt, bos=True, eos=False)
print(ids)
print([tokenizer.decode([i]) for i in ids])
tokens = np.array([ids])  # (B, T) = (1, T)
B, T = tokens.shape

# %%
# Exercises ex13a, ex13b (bpe.merge and bpe.learn_merges): graded from reference fixtures, in any order. In the solved
# package this passes; in the student version it lists what is missing (`--hint 2` in a terminal).
check("ex13a", "ex13b")

# %% [markdown]
# ## 2. A tiny Llama 3
# Same shape rules as the 8B model (`ModelArgs` uses Meta's field names), scaled down: 4 query heads share
# 2 key/value heads (grouped-query attention).

# %%
args = llama3np.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                          hidden_dim=192, max_seq_len=128, use_scaled_rope=True, rope_scale_factor=8.0)
model = llama3np.Transformer(args, seed=0)
p = model.params
for name, w in list(p.items())[:10]:
    print(f"{name:40s} {w.shape}")
print("...", len(p), "arrays,", llama3np.n_params(args), "parameters")

# %% [markdown]
# ## 3. Embedding: one row of `tok_embeddings.weight` per token

# %%
x, _ = ops.embedding_forward(tokens, p["tok_embeddings.weight"])
print("x", x.shape, "# (B, T, dim)")

# %%
# Exercises ex02 (ops.embedding_backward): graded from reference fixtures, in any order. In the solved
# package this passes; in the student version it lists what is missing (`--hint 2` in a terminal).
check("ex02")

# %% [markdown]
# ## 4. RoPE angles
# Each pair of features (2i, 2i+1) of a head is rotated by the angle `position * freq[i]`. Llama 3.1
# stretches the low frequencies (long wavelengths) by `rope_scale_factor` so that a model trained at 8K
# tokens reads 128K.

# %%
freqs = ops.rope_frequencies(args)
cos, sin = ops.rope_cos_sin(freqs, 0, T, np.float32)
print("freqs", freqs.shape, "cos/sin", cos.shape, "# (T, head_dim/2)")

# %%
# Exercises ex06a, ex06b (ops.rope_forward and rope_backward): graded from reference fixtures, in any order. In the solved
# package this passes; in the student version it lists what is missing (`--hint 2` in a terminal).
check("ex06a", "ex06b")

# %% [markdown]
# ## 5. One transformer block, step by step
# `h = x + attention(attention_norm(x))`, then `out = h + feed_forward(ffn_norm(h))`.

# %%
require("ex04a", "ex05a", "ex06a", "ex07")  # the forward ops this section runs (student version)


def block(i, x, verbose=False):
    pre = f"layers.{i}."
    H, KV, hd = args.n_heads, args.n_kv_heads, args.head_dim
    show = print if verbose else (lambda *a: None)
    xn, _ = ops.rmsnorm_forward(x, p[pre + "attention_norm.weight"], args.norm_eps)
    show("attention_norm(x)", xn.shape, "rms per position:", np.sqrt((xn**2).mean(-1)).round(3))
    xq, _ = ops.linear_forward(xn, p[pre + "attention.wq.weight"])
    xk, _ = ops.linear_forward(xn, p[pre + "attention.wk.weight"])
    xv, _ = ops.linear_forward(xn, p[pre + "attention.wv.weight"])
    show("q", xq.shape, "k", xk.shape, "v", xv.shape, "# k and v are smaller: n_kv_heads < n_heads")
    xq, _ = ops.rope_forward(xq.reshape(B, T, H, hd), cos, sin)  # (B, T, H, hd)
    xk, _ = ops.rope_forward(xk.reshape(B, T, KV, hd), cos, sin)  # (B, T, KV, hd)
    q, k = xq.transpose(0, 2, 1, 3), xk.transpose(0, 2, 1, 3)  # (B, H, T, hd), (B, KV, T, hd)
    v = xv.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    att, lse = ops.attention_forward(q, k, v, causal=True)
    show("attention out", att.shape, "# query head h reads kv head h // (H // KV)")
    att_out, _ = ops.linear_forward(att.transpose(0, 2, 1, 3).reshape(B, T, H * hd), p[pre + "attention.wo.weight"])
    h = x + att_out
    hn, _ = ops.rmsnorm_forward(h, p[pre + "ffn_norm.weight"], args.norm_eps)
    a, _ = ops.linear_forward(hn, p[pre + "feed_forward.w1.weight"])
    b, _ = ops.linear_forward(hn, p[pre + "feed_forward.w3.weight"])
    g, _ = ops.swiglu_forward(a, b)
    show("SwiGLU hidden", g.shape, "# (B, T, hidden_dim)")
    ffn_out, _ = ops.linear_forward(g, p[pre + "feed_forward.w2.weight"])
    return h + ffn_out


h = x
for i in range(args.n_layers):
    h = block(i, h, verbose=(i == 0))
print("after", args.n_layers, "blocks:", h.shape)

# %%
# Exercises ex03, ex04a, ex04b, ex07, ex22 (linear, RMSNorm and SwiGLU backward; your own property tests): graded from reference fixtures, in any order. In the solved
# package this passes; in the student version it lists what is missing (`--hint 2` in a terminal).
check("ex03", "ex04a", "ex04b", "ex07", "ex22")

# %% [markdown]
# ## 6. What attention looks at
# The causal mask lets position t see positions 0..t only. Here are layer 0's attention weights of head 0
# (recomputed from the scores; the op itself keeps only the log-sum-exp).

# %%
import matplotlib.pyplot as plt

xn, _ = ops.rmsnorm_forward(x, p["layers.0.attention_norm.weight"], args.norm_eps)
hd = args.head_dim
q = ops.rope_forward(ops.linear_forward(xn, p["layers.0.attention.wq.weight"])[0].reshape(B, T, -1, hd), cos, sin)[0]
k = ops.rope_forward(ops.linear_forward(xn, p["layers.0.attention.wk.weight"])[0].reshape(B, T, -1, hd), cos, sin)[0]
scores = q[0, :, 0] @ k[0, :, 0].T / np.sqrt(hd)  # head 0 reads kv head 0: (T, T)
scores[np.triu_indices(T, 1)] = -np.inf
weights = np.exp(scores - scores.max(-1, keepdims=True))
weights /= weights.sum(-1, keepdims=True)
labels = [tokenizer.decode([i]) for i in ids]
plt.imshow(weights, cmap="Blues")
plt.xticks(range(T), labels, rotation=60)
plt.yticks(range(T), labels)
plt.title("layer 0, head 0: who attends to whom")
plt.colorbar()
plt.show()

# %%
# Exercises ex05a, ex05b (causal grouped-query attention forward and backward): graded from reference fixtures, in any order. In the solved
# package this passes; in the student version it lists what is missing (`--hint 2` in a terminal).
check("ex05a", "ex05b")

# %% [markdown]
# ## 7. Final norm, output layer, softmax
# Logits are kept in float32; softmax subtracts the row maximum so that `exp` never overflows.

# %%
hn, _ = ops.rmsnorm_forward(h, p["norm.weight"], args.norm_eps)
logits, _ = ops.linear_forward(hn, p["output.weight"])
print("logits", logits.shape, "# (B, T, vocab_size)")
last = logits[0, -1]
probs = np.exp(last - last.max())
probs /= probs.sum()
top = np.argsort(-probs)[:5]
for t in top:
    print(f"{probs[t]:.6f}  {tokenizer.decode([int(t)])!r}")
print("uniform would be", 1 / args.vocab_size)

# %%
# Exercises ex08 (ops.cross_entropy_backward): graded from reference fixtures, in any order. In the solved
# package this passes; in the student version it lists what is missing (`--hint 2` in a terminal).
check("ex08")

# %% [markdown]
# ## 8. The same thing in one call
# `Transformer.forward` composes exactly these ops. On the NumPy backend the logits agree to the last
# bit; with the C kernels (the default when they are built) the sums run in another order, so they agree
# to float32 round-off.

# %%
print("backend:", llama3np.get_backend())
full = model.forward(tokens)
np.testing.assert_allclose(full, logits, rtol=1e-4, atol=1e-5)
print("model.forward(tokens) matches our step-by-step logits; max difference", np.abs(full - logits).max())

# %%
# Exercises ex14, ex15 (the KV-cache decode step and top-p sampling): graded from reference fixtures, in any order. In the solved
# package this passes; in the student version it lists what is missing (`--hint 2` in a terminal).
check("ex14", "ex15")
