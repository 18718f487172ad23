/* The C kernels of llama3np: the functions Python calls through cffi (llama3np/kernels.py).
 *
 * All arrays are float32. Matrices are row-major with a leading dimension (the distance in floats
 * between two rows); a "trans" flag says the matrix is stored transposed, so that a NumPy view x.T of
 * a C-contiguous array reaches C without a copy. Python validates every shape, stride and dtype
 * before calling; the C code trusts what it is given.
 *
 * This file is read twice: by the C compiler, and by cffi's cdef parser (build_kernels.py strips the
 * preprocessor lines), so it holds plain declarations only.
 */
#ifndef LLAMA3NP_KERNELS_H
#define LLAMA3NP_KERNELS_H

#include <stdint.h>

/* ---- matrix multiply: C (M, N) = op(A) (M, K) @ op(B) (K, N), op(X) = X or X^T ---------------- */
/* A is (M, K) with row stride lda, or if trans_a it is stored as (K, M) with row stride lda;
 * the same for B. accumulate=0 overwrites C, accumulate=1 adds to it. */
int sgemm(int trans_a, int trans_b, int M, int N, int K,
           const float *A, long lda, const float *B, long ldb,
           float *C, long ldc, int accumulate);

/* Teaching kernels for notebooks/02_kernels: the textbook triple loop, and the same loop blocked for
 * the caches (no packing, no explicit SIMD). Both contiguous, no transposes. */
void naive_sgemm(int M, int N, int K, const float *A, const float *B, float *C);
void blocked_sgemm(int M, int N, int K, const float *A, const float *B, float *C);

/* ---- fused causal grouped-query attention (FlashAttention-style) ------------------------------- */
/* q (B, H, T, hd), k and v (B, KV, S, hd): strides in floats for the first three dims (the last has
 * stride 1). The queries are the last T of the S positions. out (B, H, T, hd) and lse (B, H, T) are
 * contiguous. kv_start: NULL, or (B, T) contiguous, each in [0, S): query i of row b sees only keys
 * j >= kv_start[b * T + i] (capped at the query's own position when causal: document masks). */
int attention_forward(const float *q, const long *q_strides,
                       const float *k, const long *k_strides,
                       const float *v, const long *v_strides,
                       float *out, float *lse,
                       int B, int H, int KV, int T, int S, int hd, int causal, const int *kv_start);

/* dout, out like q; dq (B, H, T, hd), dk and dv (B, KV, S, hd) contiguous, overwritten. */
int attention_backward(const float *dout, const long *dout_strides,
                        const float *q, const long *q_strides,
                        const float *k, const long *k_strides,
                        const float *v, const long *v_strides,
                        const float *out, const long *out_strides,
                        const float *lse, const long *lse_strides,
                        float *dq, float *dk, float *dv,
                        int B, int H, int KV, int T, int S, int hd, int causal, const int *kv_start);

/* ---- run-time configuration -------------------------------------------------------------------- */
/* The instruction set the matmul micro-kernel uses: 0 portable C, 1 AVX2+FMA, 2 AVX-512, 3 NEON (arm64).
 * isa_supported(n): 1 when this build and CPU can run n. select_isa(-1) picks the best the CPU
 * supports; select_isa(n) forces n and returns what was set (it never selects what the CPU cannot
 * run; it returns the best available one instead). */
int isa_supported(int isa);
int select_isa(int isa);
int current_isa(void);
/* The float32 FMA peak of instruction set isa (peak.c): iters steps of independent FMA chains on each of
 * nthreads threads. Returns the floating-point operations done (2 per FMA), 0 when isa has no FMA chains
 * here (the portable kernel, or an instruction set this build or CPU cannot run); *result, the chains'
 * sum, is what keeps the compiler from dropping them. The caller times the call. */
double fma_burst(int isa, long iters, int nthreads, float *result);
/* The GEMM micro-kernel of isa: its tile is gemm_mr(isa) x gemm_nr(isa) floats of C. microkernel_burst
 * (gemm.c) runs it alone, on one thread, iters times: C (mr x nr, row-major) += A (mr x kc) @ B (kc x nr),
 * both row-major, packed once and then in L1. Returns the operations done, 0 for an instruction set this
 * build or CPU cannot run (or kc, iters < 1), -1 when out of memory. The caller times the call. */
int gemm_mr(int isa);
int gemm_nr(int isa);
double microkernel_burst(int isa, int kc, long iters, const float *A, const float *B, float *C);
/* Threads used by sgemm and attention (a pool of pthreads kept between calls; small work uses one). */
void set_num_threads(int n);
int get_num_threads(void);

/* ---- the elementwise ops of a training step (elementwise.c), fused and threaded ---------------- */
/* Every array contiguous unless a stride is given; rows of C (RMSNorm), V (cross-entropy) or hd
 * (RoPE) floats. The same bits at any thread count and on every instruction set. */
/* RMSNorm: y = xhat * weight, xhat = x * rstd, rstd (N,) = 1 / sqrt(mean(x^2) + eps) */
int rmsnorm_forward(const float *x, const float *weight, float eps, long N, long C, float *y, float *xhat,
                    float *rstd);
/* dx (N, C) and dweight (C,) (both overwritten) from dout, and the forward's xhat and rstd */
int rmsnorm_backward(const float *dout, const float *xhat, const float *rstd, const float *weight, long N, long C,
                     float *dx, float *dweight);
/* SwiGLU's gate over n elements: out = silu(a) * b, and sig = sigmoid(a), silu = a * sig for the backward */
void swiglu_forward(const float *a, const float *b, long n, float *out, float *sig, float *silu);
void swiglu_backward(const float *dout, const float *a, const float *b, const float *sig, const float *silu, long n,
                     float *da, float *db);
/* RoPE: x (B, T, n, hd) with strides in floats for its first three dims, cos and sin (T, hd/2), out
 * (B, T, n, hd) contiguous; the backward is the forward with -sin */
void rope_forward(const float *x, const long *x_strides, const float *cos, const float *sin, long B, long T, long n,
                  long hd, float *out);
/* cross-entropy rows: logits (N, V), targets (N,) in [0, V) -> lse (N,), nll (N,) = lse - logits[target];
 * backward: dlogits (N, V) = (softmax(logits) - onehot(target)) * scale[row] */
void cross_entropy_forward(const float *logits, const int64_t *targets, long N, long V, float *lse, float *nll);
void cross_entropy_backward(const float *logits, const int64_t *targets, const float *lse, const float *scale,
                            long N, long V, float *dlogits);
/* the two above in one pass, dlogits written over the logits */
void cross_entropy_fused(float *logits, const int64_t *targets, const float *scale, long N, long V, float *lse,
                         float *nll);
/* embedding backward: dweight (V, C), zeroed by the caller, += dout[i] (C floats) at row tokens[i], i < N in order */
void embedding_backward(const float *dout, const int64_t *tokens, long N, long C, float *dweight);
/* AdamW over n floats in place (p, m, v), the coefficients as optim.AdamW rounds them to float32;
 * decay = 1 - lr * weight_decay, or 1 for a weight that is not decayed */
void adamw_update(float *p, const float *g, float *m, float *v, long n, float decay, float beta1,
                  float one_minus_beta1, float beta2, float one_minus_beta2, float sqrt_bc2, float eps,
                  float step_size);

/* ---- one decode step of a transformer block (decode.c) ---------------------------------------- */
/* model.block_forward for one new position of B sequences against a KV cache, in one call: the same
 * kernels in the same order, the same bits. x and out (B, dim); the weights row-major as model.params
 * holds them: wq (H*hd, dim), wk and wv (KV*hd, dim), wo (dim, H*hd), w1 and w3 (hidden, dim), w2
 * (dim, hidden), the norms (dim,). cache_k and cache_v (>= B, KV, L, hd) contiguous: this step's key
 * and value are written at position pos < L and the query attends to positions 0..pos. cos and sin
 * (hd/2,): the angles of position pos. kv_start NULL or (B,), as attention_forward's. Returns -1 when
 * out of memory. */
int block_decode(const float *x, float *out, int B, int dim, int H, int KV, int hd, int hidden, const float *wq,
                 const float *wk, const float *wv, const float *wo, const float *w1, const float *w2,
                 const float *w3, const float *attention_norm, const float *ffn_norm, float eps, float *cache_k,
                 float *cache_v, int L, int pos, const float *cos, const float *sin, const int *kv_start);
/* n_layers blocks in a row (block i + 1 reads block i's output): weights holds the 9 pointers of each
 * layer in block_decode's order (wq, wk, wv, wo, w1, w2, w3, attention_norm, ffn_norm), caches its
 * cache_k and cache_v. */
int decode_blocks(const float *x, float *out, int n_layers, const float *const *weights, float *const *caches, int B,
                  int dim, int H, int KV, int hd, int hidden, float eps, int L, int pos, const float *cos,
                  const float *sin, const int *kv_start);
/* decode_blocks, then the model's final RMSNorm (norm, (dim,)) and LM head (w_out, (V, dim)):
 * logits (B, V) of the new position, in one call per decode step */
int decode_logits(const float *x, float *logits, int n_layers, const float *const *weights, float *const *caches,
                  int B, int dim, int H, int KV, int hd, int hidden, float eps, int L, int pos, const float *cos,
                  const float *sin, const int *kv_start, const float *norm, const float *w_out, int V);

#endif
