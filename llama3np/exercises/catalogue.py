"""The catalogue: every exercise in one list (id, title, where its solution lives, points, notebook
section, three hints, the test file that grades it).

The solutions are the package's own code, marked in the source:

    # BEGIN SOLUTION ex05b            (C: /* BEGIN SOLUTION ex18 */)
    ...the reference implementation...
    # END SOLUTION                    (C: /* END SOLUTION */)

`llama3np exercises make --out DIR` replaces each region by a NotImplementedError stub (the student
version); `llama3np check exNN` grades one exercise with the tests of `tests`, which live in
llama3np/exercises/tests and read reference fixtures from llama3np/exercises/fixtures, so an exercise
never depends on the student's other exercises.
"""
from typing import NamedTuple, Tuple


class Exercise(NamedTuple):
    id: str
    title: str
    files: Tuple[str, ...]  # where the regions are, relative to the repository root
    functions: Tuple[str, ...]  # what the student writes
    points: int
    section: str  # notebook and section where it is introduced
    hints: Tuple[str, str, str]  # hint 1 is shown on a failure; --hint 2 / --hint 3 reveal more
    tests: str  # test file in llama3np/exercises/tests
    c_stub: str = ""  # C only: the statement(s) the stub body runs (it must still compile)


OPS = "llama3np/ops.py"

EXERCISES = (
    Exercise(
        "ex01", "Gradient checking by central differences", ("llama3np/gradcheck.py",), ("numerical_grad",), 5,
        "03_training: 3. Training",
        ("Perturb one entry at a time: (f(x + h e_i) - f(x - h e_i)) / 2h, and put the entry back afterwards.",
         "x is changed in place through the flat view `flat = x.reshape(-1)`; f() reads x itself, so call f() "
         "after each perturbation. Only the entries in `indices` are computed when it is given.",
         "Save old = flat[i]; set flat[i] = old + h, fp = f(); flat[i] = old - h, fm = f(); flat[i] = old; "
         "gflat[i] = (fp - fm) / (2 h)."),
        "test_ex01_gradcheck.py"),
    Exercise(
        "ex02", "Embedding backward", (OPS,), ("embedding_backward",), 5, "01_forward: 3. Embedding",
        ("The forward copies row tokens[b, t] of the table: its backward adds dout[b, t] into that row.",
         "A token that appears twice must receive the SUM of both gradients; `dweight[tokens] += dout` "
         "silently keeps only one of them (fancy-index assignment does not accumulate).",
         "np.add.at(dweight, tokens.reshape(-1), dout.reshape(-1, C)) scatters with accumulation."),
        "test_ex02_embedding.py"),
    Exercise(
        "ex03", "Linear backward (both halves)", (OPS,), ("linear_backward_input", "linear_backward_weight"), 5,
        "01_forward: 5. One transformer block, step by step",
        ("y = x @ W.T with W (out, in): dx has x's shape and dW has W's shape; check the shapes first.",
         "Flatten the leading axes: dout2 (N, out), x2 (N, in). Then dx2 = dout2 @ W and dW = dout2.T @ x2.",
         "Reshape dx back to x.shape. Use the `matmul` argument for the products (the C backend passes its own)."),
        "test_ex03_linear.py"),
    Exercise(
        "ex04a", "RMSNorm forward", (OPS,), ("rmsnorm_forward",), 5,
        "01_forward: 5. One transformer block, step by step",
        ("y = x / sqrt(mean(x^2) + eps) * weight, the mean over the LAST axis only; no mean subtraction.",
         "Keep rstd = 1 / sqrt(mean(x^2) + eps) with keepdims=True (shape (B, T, 1)) so it broadcasts, and "
         "return the cache (xhat, rstd, weight) that rmsnorm_backward unpacks.",
         "eps goes INSIDE the square root, added to the mean of squares (Meta's RMSNorm)."),
        "test_ex04a_rmsnorm_forward.py"),
    Exercise(
        "ex04b", "RMSNorm backward", (OPS,), ("rmsnorm_backward",), 10,
        "01_forward: 5. One transformer block, step by step",
        ("dweight sums dout * xhat over every axis but the last; dx has a second term because rstd depends on "
         "every x of the row.",
         "With dxhat = dout * weight: dx = rstd * (dxhat - xhat * mean(dxhat * xhat, last axis)).",
         "Derive it from xhat_i = x_i * rstd and d rstd / d x_j = -x_j rstd^3 / C; the mean over the last axis "
         "must use keepdims=True."),
        "test_ex04b_rmsnorm_backward.py"),
    Exercise(
        "ex05a", "Causal attention forward (softmax with the max subtracted)", (OPS,), ("attention_forward",), 10,
        "01_forward: 6. What attention looks at",
        ("Scores q k^T / sqrt(hd), future keys set to -inf, softmax over the keys, times v. Also return lse, "
         "the log of each softmax row's normaliser.",
         "Subtract each row's max before exp (exp(1000) overflows); lse = max + log(sum(exp(scores - max))). "
         "_attention_scores already scales and masks and views q as (B, KV, G, T, hd).",
         "out = (p / denom) @ v[:, :, None] then reshape (B, KV, G, T, hd) -> (B, H, T, hd); lse (B, H, T)."),
        "test_ex05a_attention_forward.py"),
    Exercise(
        "ex05b", "Causal grouped-query attention backward", (OPS,), ("attention_backward",), 15,
        "01_forward: 6. What attention looks at",
        ("Recompute p = exp(scores - lse); then dv = p^T dout, dp = dout v^T, ds = softmax backward of dp, "
         "dq = ds k / sqrt(hd), dk = ds^T q / sqrt(hd).",
         "Softmax backward: ds = p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j equals (dout * out).sum(-1) per "
         "row: no (T, S) reduction needed.",
         "Grouped-query attention: G = H // KV query heads read the same kv head, so dk and dv SUM over the G "
         "axis (axis 2 of the (B, KV, G, ...) view), like Meta's repeat_kv in reverse."),
        "test_ex05b_attention_backward.py"),
    Exercise(
        "ex06a", "RoPE forward (Meta's interleaved pairs)", (OPS,), ("rope_forward",), 5,
        "01_forward: 4. RoPE angles",
        ("Rotate each ADJACENT pair (x[2i], x[2i+1]) by angle pos * freq_i: Meta's convention. Hugging Face's "
         "checkpoints permute wq/wk and rotate the half-split pairs (x[i], x[i + hd/2]) instead.",
         "x0, x1 = x[..., 0::2], x[..., 1::2]; cos/sin are (T, hd/2): broadcast them over the head axis as "
         "cos[:, None, :].",
         "out[..., 0::2] = x0 cos - x1 sin; out[..., 1::2] = x0 sin + x1 cos; return (out, (cos, sin))."),
        "test_ex06a_rope_forward.py"),
    Exercise(
        "ex06b", "RoPE backward", (OPS,), ("rope_backward",), 5, "01_forward: 4. RoPE angles",
        ("RoPE is a rotation, a linear map whose Jacobian is the rotation matrix itself.",
         "The inverse of a rotation is its transpose: rotation by the negative angle.",
         "Call rope_forward on dout with sin negated (cos stays) and return only the array."),
        "test_ex06b_rope_backward.py"),
    Exercise(
        "ex07", "SwiGLU forward and backward", (OPS,), ("swiglu_forward", "swiglu_backward"), 10,
        "01_forward: 5. One transformer block, step by step",
        ("silu(a) * b with silu(a) = a * sigmoid(a); the cache must keep what the backward needs.",
         "d silu / da = sigmoid(a) + a sigmoid(a) (1 - sigmoid(a)); db = dout * silu(a).",
         "Cache (a, b, sig, silu); da = dout * b * sig * (1 + a (1 - sig))."),
        "test_ex07_swiglu.py"),
    Exercise(
        "ex08", "Cross-entropy backward", (OPS,), ("cross_entropy_backward",), 5,
        "01_forward: 7. Final norm, output layer, softmax",
        ("d loss / d logits = softmax(logits) - onehot(target), per position, times the loss's weights.",
         "softmax = exp(logits - lse[..., None]) with the cached log-sum-exp; subtract 1 at the target with "
         "np.put_along_axis.",
         "Scale by dloss * weights / count (the mean over unmasked positions); masked positions get 0."),
        "test_ex08_cross_entropy.py"),
    Exercise(
        "ex09", "Transformer block backward", ("llama3np/model.py",), ("block_backward",), 15,
        "03_training: 3. Training",
        ("Read block_forward bottom-up and call each op's backward in that reverse order; the residual "
         "connections add dout to the gradient of the branch input.",
         "Where one input feeds several ops (xn -> wq, wk, wv; hn -> w1, w3) the gradients ADD. Transpose "
         "(B, H, T, hd) back to (B, T, H, hd) before rope_backward.",
         "Weight gradients go through linear(dy, cache, name) (which accumulates into grads) and "
         "accumulate(grads, name, g) for the norms; return dx + dh."),
        "test_ex09_block_backward.py"),
    Exercise(
        "ex10", "AdamW step", ("llama3np/optim.py",), ("AdamW.step",), 10, "03_training: 3. Training",
        ("Per parameter: decoupled weight decay (matrices only), then the moments m and v, then the "
         "bias-corrected update, all in place on the arrays.",
         "m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2; p -= lr / (1 - beta1^t) * m / "
         "(sqrt(v) / sqrt(1 - beta2^t) + eps). Increment t BEFORE computing the corrections.",
         "Weight decay is p *= 1 - lr * weight_decay, applied before the Adam update and only when p.ndim >= 2."),
        "test_ex10_adamw.py"),
    Exercise(
        "ex11", "Cosine learning-rate schedule with warmup", ("llama3np/optim.py",), ("get_lr",), 5,
        "03_training: 3. Training",
        ("Linear warmup for warmup_steps steps (step 0 gets max_lr / warmup_steps), then a half cosine down "
         "to min_lr_ratio * max_lr at step total_steps - 1, then flat.",
         "progress = (step - warmup_steps) / (total_steps - 1 - warmup_steps), clipped to 1; "
         "lr = min_lr + 0.5 (max_lr - min_lr)(1 + cos(pi progress)).",
         "If total_steps - 1 - warmup_steps <= 0 there is nothing to decay: return max_lr after the warmup."),
        "test_ex11_schedule.py"),
    Exercise(
        "ex12", "Gradient clipping by the global norm", ("llama3np/optim.py",), ("clip_grad_norm", "scale_to_max_norm"), 5,
        "03_training: 3. Training",
        ("One global norm over every gradient entry, one scale factor for all arrays, applied in place; "
         "return the norm BEFORE clipping.",
         "Only scale when norm > max_norm (and max_norm is a positive number); scale = max_norm / (norm + 1e-6).",
         "A non-finite norm (inf, nan) leaves the gradients untouched, so the caller can skip the step."),
        "test_ex12_clip.py"),
    Exercise(
        "ex13a", "BPE encoding: apply one merge", ("llama3np/bpe.py",), ("merge",), 5, "01_forward: 1. Tokens",
        ("Scan left to right; where ids[i], ids[i+1] equals the pair, emit new_id and skip both.",
         "Overlaps: [a, a, a] with pair (a, a) gives [aa, a], not [a, aa]: after a match jump by 2.",
         "Return a new list; do not modify `ids`."),
        "test_ex13a_bpe_merge.py"),
    Exercise(
        "ex13b", "BPE training: learn the merges", ("llama3np/bpe.py",), ("learn_merges",), 10,
        "01_forward: 1. Tokens",
        ("Repeat n_merges times: count every adjacent pair over all chunks (weighted by the chunk's count), "
         "merge the most frequent pair into a new token everywhere.",
         "Ties: the smallest (left id, right id) pair wins. A new token's bytes are vocab[left] + vocab[right]; "
         "if those bytes already exist, reuse that id and do not count a new merge.",
         "Raise OutOfPairs(message, max_vocab_size=MIN_VOCAB_SIZE + learned) when no pair is left. Counting "
         "from scratch every round is fine for the tests; the incremental version is faster."),
        "test_ex13b_bpe_train.py"),
    Exercise(
        "ex14", "KV-cache decode step", ("llama3np/model.py",), ("block_forward",), 10,
        "01_forward: 8. The same thing in one call",
        ("Write this step's keys and values into the cache at positions start_pos .. start_pos + T - 1, then "
         "attend over all S = start_pos + T cached positions.",
         "cache.cache_k[i] has shape (batch, KV, max_seq_len, hd): index it [:B, :, start_pos:S].",
         "Then k, v = cache.cache_k[i][:B, :, :S], cache.cache_v[i][:B, :, :S]."),
        "test_ex14_kv_cache.py"),
    Exercise(
        "ex15", "Top-p (nucleus) sampling", ("llama3np/generation.py",), ("sample_next",), 10,
        "01_forward: 8. The same thing in one call",
        ("Sort the probabilities in decreasing order, keep the smallest prefix whose sum reaches top_p, "
         "renormalise, draw one token.",
         "Keep a token if the tokens BEFORE it sum to at most top_p (cum - p <= top_p): the token that crosses "
         "top_p is kept. _likeliest_first(probs[b], top_p) gives the order.",
         "Draw with ONE rng.random() per row (inverse CDF: np.searchsorted(cum, u * cum[-1], side='right')) so "
         "that a seed gives the reference's tokens."),
        "test_ex15_top_p.py"),
    Exercise(
        "ex16a", "Ring reduce-scatter", ("llama3np/parallel/comm.py",), ("ProcessGroup._reduce_scatter",), 10,
        "04_data_parallel: 2. The ring in real processes",
        ("N - 1 steps; at each step every rank sends one chunk to rank r + 1 and reduces the chunk it receives "
         "from rank r - 1 into its own copy.",
         "At step s rank r sends chunk (r - s - 1) mod N and receives chunk (r - s - 2) mod N; after N - 1 "
         "steps chunk r is complete on rank r.",
         "self.send(chunks[i], nxt, name) then chunks[j] = reduce(chunks[j], self.recv(prv, name)); sends "
         "never block, so send before you receive."),
        "test_ex16a_reduce_scatter.py"),
    Exercise(
        "ex16b", "Ring all-gather", ("llama3np/parallel/comm.py",), ("ProcessGroup._all_gather",), 5,
        "04_data_parallel: 2. The ring in real processes",
        ("N - 1 steps passing chunks around the ring: each rank forwards the chunk it received last step.",
         "At step s rank r sends chunk (r - s) mod N to r + 1 and receives chunk (r - s - 1) mod N from r - 1.",
         "Start with your own chunk (s = 0 sends chunk r); return the list of chunks."),
        "test_ex16b_all_gather.py"),
    Exercise(
        "ex17", "The 1F1B pipeline schedule as data", ("llama3np/parallel/schedule.py",), ("one_f_one_b",), 10,
        "05_pipeline_parallel: 2. On a logical clock",
        ("Stage s runs min(p - s - 1, m) warm-up forwards, then alternates one forward and one backward, then "
         "drains the remaining backwards.",
         "Use _forward(s, p, j) and _backward(s, p, j): they add the recv/send actions around F and B.",
         "Steady state: for i in range(m - warmup): forward of warmup + i, then backward of i. Cool-down: "
         "backwards m - warmup .. m - 1."),
        "test_ex17_one_f_one_b.py"),
    Exercise(
        "ex18", "A matmul kernel in C (cffi)", ("csrc/gemm.c",), ("naive_sgemm",), 10, "02_kernels: 2. Step by step",
        ("C[i, j] = sum_p A[i, p] B[p, j], all row-major: A is M x K, B is K x N, C is M x N.",
         "Row-major index of (i, j) in an M x N matrix: i * N + j. Accumulate in a local float, store once.",
         "Rebuild after every edit: python csrc/build_kernels.py (or pip install -e .), then llama3np check ex18."),
        "test_ex18_c_matmul.py",
        c_stub="for (long i = 0; i < (long)M * N; i++) C[i] = 0.0f / 0.0f; /* NaN: not implemented */\n"
               "(void)K; (void)A; (void)B;"),
    Exercise(
        "ex19", "DPO loss and its gradient", ("llama3np/posttrain/losses.py",), ("dpo_forward", "dpo_backward"), 10,
        "09_post_training: 2. The losses, each beside its formula",
        ("Delta = (pi_c - ref_c) - (pi_r - ref_r); sigmoid loss -(1 - ls) log sigmoid(beta Delta) - ls log "
         "sigmoid(-beta Delta), averaged over the batch.",
         "d/dz [-log sigmoid(z)] = -sigmoid(-z); with z = beta Delta multiply by beta; IPO: (Delta - 1/(2 beta))^2.",
         "dpolicy_rejected = -dpolicy_chosen; divide by the batch size (the mean) and multiply by dloss."),
        "test_ex19_dpo.py"),
    Exercise(
        "ex20", "Generalized advantage estimation (GAE)", ("llama3np/posttrain/losses.py",), ("gae_loop",), 5,
        "09_post_training: 2. The losses, each beside its formula",
        ("delta_t = r_t + gamma V_{t+1} - V_t, and A_t = delta_t + gamma lambda A_{t+1}, backwards in time.",
         "V past the last response token is 0 (the episode ended): multiply the next value by the mask.",
         "returns = (advantages + values) * mask."),
        "test_ex20_gae.py"),
    Exercise(
        "ex21", "MMLU scoring by log-likelihood", ("llama3np/eval/scoring.py",), ("loglikelihood_full",), 5,
        "10_evaluation: 2. Scoring: four log-likelihoods",
        ("log P(continuation | context) = sum over the continuation's tokens of the log-softmax of the logit that "
         "predicts each of them, from ONE forward over context + continuation (minus its last token).",
         "The logits at position t predict token t + 1: the continuation's first token is predicted at "
         "position len(context) - 1. Use log_softmax (float64, max subtracted).",
         "forward_logits(model, np.array([tokens[:-1]])) -> (1, T - 1, V); lp = log_softmax(logits[0, n_ctx - 1:]); "
         "sum lp[j, continuation[j]]. The MMLU answer is the argmax over ' A', ' B', ' C', ' D'."),
        "test_ex21_mmlu_scoring.py"),
    Exercise(
        "ex22", "Property tests of your own, graded against mutants", ("llama3np/exercises/student_properties.py",),
        ("test_softmax_properties", "test_rmsnorm_properties", "test_rope_properties"), 15,
        "01_forward: 5. One transformer block, step by step",
        ("Write hypothesis tests of properties every correct implementation has; the grader runs them against "
         "the correct code (they must pass) and against buggy mutants (each one they fail is caught).",
         "Softmax: rows sum to 1, invariant to adding a constant per row, larger logit -> larger probability, "
         "no overflow at 1000. RMSNorm: output rms = 1 for weight 1, scale invariance for large x, small x "
         "stays finite. RoPE: norms preserved, q.k depends only on the position difference.",
         "Mutants: a flipped sign, the wrong axis, a missing eps, a missing max subtraction, an off-by-one "
         "position, the half-split (HF) pairing. Compare against a slow formula written from the definition."),
        "test_ex22_properties.py"),
    Exercise(
        "ex23", "MinHash signatures", ("llama3np/data/curation/minhash.py",), ("signatures_from_hashes",), 5,
        "08_data_curation: 4. MinHash, measured",
        ("A document's signature holds, for each of num_perm hash functions, the MINIMUM of that function over "
         "the document's shingle hashes.",
         "Hash function i is mix64(shingle ^ seeds[i]) with seeds = hash_seeds(num_perm, seed); document i owns "
         "hashes[offsets[i]:offsets[i + 1]].",
         "For each document: mix64(hashes[a:b, None] ^ seeds[None, :]).min(axis=0) inside "
         "np.errstate(over='ignore'); the chunked version only saves memory."),
        "test_ex23_minhash.py"),
)

BY_ID = {e.id: e for e in EXERCISES}


def get(exercise_id):
    """The Exercise with this id; ValueError naming the known ids otherwise."""
    if exercise_id not in BY_ID:
        raise ValueError(f"unknown exercise {exercise_id!r}; the exercises are {', '.join(BY_ID)}")
    return BY_ID[exercise_id]
