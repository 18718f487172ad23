/* One decode step of a transformer block: one new position per sequence against a KV cache, in one call.
 *
 * A `small` decode step reads ~113 MB of weights, ~4 ms at memory speed; through Python the block makes
 * ~20 calls per layer (norms, three products, two RoPEs, the cache writes, attention, ...) at 1-15 us
 * each, ~0.7 ms of the step in which no weight is read. Here the block is the same kernels called in
 * model.block_forward's order, from C:
 *
 *   xn = rmsnorm(x) ; q, k, v = xn wq^T, xn wk^T, xn wv^T ; q, k = rope(q), rope(k)
 *   cache_k[pos], cache_v[pos] = k, v ; att = attention(q, cache_k[:pos+1], cache_v[:pos+1])
 *   h = x + att wo^T ; hn = rmsnorm(h) ; out = h + (silu(hn w1^T) * hn w3^T) w2^T
 *
 * decode_blocks runs every block of the model this way in one call from Python.
 * Each step calls the very kernel (sgemm, rmsnorm_forward, rope_forward, attention_forward,
 * swiglu_forward) that the op-by-op path calls, on the same rows with the same sizes, and the residual
 * adds are single float additions, so the output and the cache get the same bits as block_forward on
 * the C backend (tests/test_decode_kernels.py checks it), at any thread count.
 * The one liberty: products whose weights lie back to back in memory (model.params keeps every weight
 * in one block, in checkpoint order, so wq wk wv are in a row) are one sgemm over the stacked rows. For
 * 1-3 rows of x sgemm computes each output from its own row of w alone (gemm.c's GEMV), so this
 * changes no bit; alone, `small`'s 256 KB wk and wv read at ~23 GB/s against ~30 for the 1 MB wq (one
 * product of the three: 52 us per layer from memory, three products from Python 57 us).
 */
#include <stdlib.h>
#include <string.h>

#include "llama3np_kernels.h"

/* Below this many rows of x sgemm takes its GEMV path (gemm.c's STREAMS_M), whose every output is one
 * row of w dotted with one row of x whatever the other rows: stacking adjacent weights is exact there. */
#define STACK_MAX_ROWS 3

/* out[:, off_i : off_i + n_i] = x (M, K) @ w_i^T for the `count` weights w_i (n_i, K), out rows ldo apart */
static int products(int M, int K, const float *x, int count, const float *const *w, const int *n, float *out,
                    long ldo) {
    int status = 0;
    long off = 0;
    for (int i = 0; i < count;) {
        /* stack w_i, w_i+1, ... while each starts where the previous ends */
        int rows = n[i], j = i + 1;
        while (M <= STACK_MAX_ROWS && j < count && w[j] == w[j - 1] + (long)n[j - 1] * K) rows += n[j++];
        status |= sgemm(0, 1, M, rows, K, x, K, w[i], K, out + off, ldo, 0);
        off += rows;
        i = j;
    }
    return status;
}

int block_decode(const float *x, float *out, int B, int dim, int H, int KV, int hd, int hidden, const float *wq,
                 const float *wk, const float *wv, const float *wo, const float *w1, const float *w2,
                 const float *w3, const float *attention_norm, const float *ffn_norm, float eps, float *cache_k,
                 float *cache_v, int L, int pos, const float *cos, const float *sin, const int *kv_start) {
    const long q_n = (long)H * hd, kv_n = (long)KV * hd, qkv_n = q_n + 2 * kv_n, rot_n = q_n + kv_n;
    /* the step's activations, all small: (B, ...) each */
    long floats = B * (2L * dim + 1 + qkv_n + rot_n + q_n + H + 2L * dim + 5L * hidden) + 64;
    float *buf = (float *)malloc((size_t)floats * sizeof(float));
    if (!buf) return -1;
    float *xn = buf, *xhat = xn + (long)B * dim, *rstd = xhat + (long)B * dim;
    float *qkv = rstd + B, *rot = qkv + B * qkv_n, *att = rot + B * rot_n, *lse = att + B * q_n;
    float *att_out = lse + (long)B * H, *ffn_out = att_out + (long)B * dim;
    float *ab = ffn_out + (long)B * dim, *gate = ab + 2L * B * hidden, *sig = gate + (long)B * hidden;
    float *silu = sig + hidden;
    int status = 0;

    /* attention: q, k, v side by side in each row of qkv (B, qkv_n) */
    status |= rmsnorm_forward(x, attention_norm, eps, B, dim, xn, xhat, rstd);
    const float *w_qkv[3] = {wq, wk, wv};
    const int n_qkv[3] = {(int)q_n, (int)kv_n, (int)kv_n};
    status |= products(B, dim, xn, 3, w_qkv, n_qkv, qkv, qkv_n);
    /* RoPE on the H query heads and the KV key heads at once: rot (B, 1, H + KV, hd) */
    const long qkv_strides[3] = {qkv_n, qkv_n, hd};
    rope_forward(qkv, qkv_strides, cos, sin, B, 1, H + KV, hd, rot);
    /* this step's key and value into the caches (B', KV, L, hd) at position pos */
    for (int b = 0; b < B; b++)
        for (int g = 0; g < KV; g++) {
            long at = (((long)b * KV + g) * L + pos) * hd;
            memcpy(cache_k + at, rot + b * rot_n + q_n + (long)g * hd, (size_t)hd * sizeof(float));
            memcpy(cache_v + at, qkv + b * qkv_n + q_n + kv_n + (long)g * hd, (size_t)hd * sizeof(float));
        }
    /* the query (B, H, 1, hd) against positions 0..pos of the cache */
    const long q_strides[3] = {rot_n, hd, 0};
    const long kv_strides[3] = {(long)KV * L * hd, (long)L * hd, hd};
    status |= attention_forward(rot, q_strides, cache_k, kv_strides, cache_v, kv_strides, att, lse, B, H, KV, 1,
                                pos + 1, hd, 1, kv_start);
    status |= sgemm(0, 1, B, dim, (int)q_n, att, q_n, wo, q_n, att_out, dim, 0);
    for (long c = 0; c < (long)B * dim; c++) out[c] = x[c] + att_out[c]; /* h, the residual stream */

    /* feed-forward: a = hn w1^T and b = hn w3^T side by side in each row of ab (B, 2 hidden) */
    status |= rmsnorm_forward(out, ffn_norm, eps, B, dim, xn, xhat, rstd);
    const float *w_13[2] = {w1, w3};
    const int n_13[2] = {hidden, hidden};
    status |= products(B, dim, xn, 2, w_13, n_13, ab, 2L * hidden);
    for (int b = 0; b < B; b++)
        swiglu_forward(ab + 2L * b * hidden, ab + (2L * b + 1) * hidden, hidden, gate + (long)b * hidden, sig, silu);
    status |= sgemm(0, 1, B, dim, hidden, gate, hidden, w2, hidden, ffn_out, dim, 0);
    for (long c = 0; c < (long)B * dim; c++) out[c] += ffn_out[c];

    free(buf);
    return status ? -1 : 0;
}

/* Every block of the model, one after the other: the output of block i is the input of block i + 1
 * (two scratch rows of activations, so that no block writes the x it reads). weights holds 9 pointers
 * per layer in block_decode's order (wq, wk, wv, wo, w1, w2, w3, attention_norm, ffn_norm), caches 2 per
 * layer (cache_k, cache_v). One call per decode step instead of one per layer: the Python between the
 * layers ran while no weight was read (and, with 113 MB streaming through the caches, ran from memory). */
int decode_blocks(const float *x, float *out, int n_layers, const float *const *weights, float *const *caches, int B,
                  int dim, int H, int KV, int hd, int hidden, float eps, int L, int pos, const float *cos,
                  const float *sin, const int *kv_start) {
    float *tmp = n_layers > 1 ? (float *)malloc(2 * (size_t)B * dim * sizeof(float)) : NULL;
    if (n_layers > 1 && !tmp) return -1;
    int status = 0;
    const float *cur = x;
    for (int i = 0; i < n_layers; i++) {
        float *dst = i == n_layers - 1 ? out : tmp + (long)(i % 2) * B * dim;
        const float *const *w = weights + 9L * i;
        status |= block_decode(cur, dst, B, dim, H, KV, hd, hidden, w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
                               w[8], eps, caches[2L * i], caches[2L * i + 1], L, pos, cos, sin, kv_start);
        cur = dst;
    }
    free(tmp);
    return status ? -1 : 0;
}

/* The whole step: the blocks, then model.forward's last two calls, rmsnorm_forward and the LM head's sgemm
 * (linear_dense's), on the same rows: the same bits as the blocks here and the rest from Python, without
 * the two Python calls (~50 us, a tenth of a `tiny` step). */
int decode_logits(const float *x, float *logits, int n_layers, const float *const *weights, float *const *caches,
                  int B, int dim, int H, int KV, int hd, int hidden, float eps, int L, int pos, const float *cos,
                  const float *sin, const int *kv_start, const float *norm, const float *w_out, int V) {
    float *buf = (float *)malloc(((size_t)3 * B * dim + B) * sizeof(float));
    if (!buf) return -1;
    float *h = buf, *hn = h + (long)B * dim, *xhat = hn + (long)B * dim, *rstd = xhat + (long)B * dim;
    int status = decode_blocks(x, h, n_layers, weights, caches, B, dim, H, KV, hd, hidden, eps, L, pos, cos, sin,
                               kv_start);
    if (!status) status = rmsnorm_forward(h, norm, eps, B, dim, hn, xhat, rstd);
    if (!status) status = sgemm(0, 1, B, V, dim, hn, dim, w_out, dim, logits, V, 0);
    free(buf);
    return status ? -1 : 0;
}
