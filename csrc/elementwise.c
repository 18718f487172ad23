/* The elementwise work of a training step, fused and on the thread pool: RMSNorm, SwiGLU, RoPE,
 * cross-entropy over the vocabulary and the AdamW update. In NumPy each of these is several passes over
 * memory on one core (SwiGLU's backward alone is seven); here each is one or two passes, split over
 * the threads.
 *
 * Same bits at any thread count: a value never depends on which thread computed it, and the one sum
 * across rows (RMSNorm's weight gradient) is taken over fixed blocks of RMS_BLOCK rows, added in block
 * order. The loops themselves are in elementwise_body.h, compiled once per instruction set.
 *
 * Multiply-add fusion is off in this file (the pragmas below): with it, the compiler may fuse a * b + c
 * in one loop and not in another, or in the vector body and not in its scalar tail, and the bits would
 * depend on the vector width. Without it the results are the same on every ISA, the element-only ops
 * (RoPE, SwiGLU's backward, AdamW) give NumPy's bits exactly, and the others differ from NumPy only by
 * their exp and the order of their sums.
 */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "llama3np_kernels.h"
#include "parallel.h"
#include "exp_neg.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LLAMA3NP_NO_SIMD)
#define EW_X86 1
#endif

typedef struct {
    float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size;
} adamw_coef;

/* the loops of elementwise_body.h, one table per instruction set */
typedef struct {
    void (*rmsnorm_forward_rows)(const float *x, const float *w, float eps, long C, long r0, long r1, float *y,
                                 float *xhat, float *rstd);
    void (*rmsnorm_backward_rows)(const float *dout, const float *xhat, const float *rstd, const float *w, long C,
                                  long r0, long r1, float *dx, float *dw_part, float *dxhat);
    void (*swiglu_forward_range)(const float *a, const float *b, long i0, long i1, float *out, float *sig,
                                 float *silu);
    void (*swiglu_backward_range)(const float *dout, const float *a, const float *b, const float *sig,
                                  const float *silu, long i0, long i1, float *da, float *db);
    void (*rope_row)(const float *x, const float *cs, const float *sn, long half, float *out);
    void (*cross_entropy_forward_rows)(const float *logits, const int64_t *targets, long V, long r0, long r1,
                                       float *lse, float *nll);
    void (*cross_entropy_backward_rows)(const float *logits, const int64_t *targets, const float *lse,
                                        const float *scale, long V, long r0, long r1, float *dlogits);
    void (*adamw_range)(float *p, const float *g, float *m, float *v, const adamw_coef *k, long i0, long i1);
} ew_ops_t;

#define EW_SUFFIX portable
#define EW_TARGET
#include "elementwise_body.h"
#if EW_X86
#define EW_SUFFIX avx2
#define EW_TARGET __attribute__((target("avx2")))
#include "elementwise_body.h"
#define EW_SUFFIX avx512
#define EW_TARGET __attribute__((target("avx512f")))
#include "elementwise_body.h"
#endif

static const ew_ops_t *ew_ops(void) {
#if EW_X86
    int isa = current_isa();
    if (isa == 1) return &EW_OPS_avx2;
    if (isa == 2) return &EW_OPS_avx512;
#endif
    return &EW_OPS_portable; /* and NEON: the arm64 baseline vectorizes with NEON */
}

/* ---------------------------------------------------------------------------------------------- */
/* Splitting [0, n) over the threads. Each thread takes a contiguous run of whole grains (a grain is */
/* a row, a block of rows or 64 elements); how the runs fall never changes a value.                 */

typedef void (*range_fn)(const void *ctx, const ew_ops_t *ops, long begin, long end);

typedef struct {
    range_fn fn;
    const void *ctx;
    const ew_ops_t *ops;
    long n, grain;
} range_job;

static void range_thread(void *arg, int tid, int nthreads, barrier_t *barrier) {
    (void)barrier;
    const range_job *j = (const range_job *)arg;
    long grains = (j->n + j->grain - 1) / j->grain;
    long g0 = grains * tid / nthreads, g1 = grains * (tid + 1) / nthreads;
    long begin = g0 * j->grain, end = g1 * j->grain < j->n ? g1 * j->grain : j->n;
    if (begin < end) j->fn(j->ctx, j->ops, begin, end);
}

/* Run fn over [0, n) in grains; `floats` is the memory the whole call touches: below ~64K floats per */
/* thread, waking a thread costs more than it saves (a decode step's rows run on one).              */
static void parallel_for(range_fn fn, const void *ctx, long n, long grain, double floats) {
    int nthreads = get_num_threads();
    while (nthreads > 1 && floats < 65536.0 * nthreads) nthreads--;
    if (nthreads > n / grain) nthreads = (int)(n / grain) > 1 ? (int)(n / grain) : 1;
    range_job j = {fn, ctx, ew_ops(), n, grain};
    parallel_run(nthreads, range_thread, &j);
}

/* ---------------------------------------------------------------------------------------------- */
/* RMSNorm                                                                                          */

typedef struct {
    const float *x, *w, *dout, *xhat, *rstd_in;
    float *y, *xhat_out, *rstd, *dx, *dw_parts;
    long N, C;
    float eps;
    int failed;
} rms_ctx;

#define RMS_BLOCK 32 /* rows per partial sum of the weight gradient (fixed: the sum's order) */

static void rmsnorm_forward_range(const void *p, const ew_ops_t *ops, long r0, long r1) {
    const rms_ctx *a = (const rms_ctx *)p;
    ops->rmsnorm_forward_rows(a->x, a->w, a->eps, a->C, r0, r1, a->y, a->xhat_out, a->rstd);
}

int rmsnorm_forward(const float *x, const float *weight, float eps, long N, long C, float *y, float *xhat,
                    float *rstd) {
    rms_ctx a = {.x = x, .w = weight, .y = y, .xhat_out = xhat, .rstd = rstd, .N = N, .C = C, .eps = eps};
    parallel_for(rmsnorm_forward_range, &a, N, 1, 3.0 * N * C);
    return 0;
}

/* one block of RMS_BLOCK rows at a time, each into its own partial row of dw_parts */
static void rmsnorm_backward_range(const void *p, const ew_ops_t *ops, long b0, long b1) {
    rms_ctx *a = (rms_ctx *)p;
    float *dxhat = (float *)malloc((size_t)a->C * sizeof(float));
    if (!dxhat) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (long blk = b0; blk < b1; blk++) {
        long r0 = blk * RMS_BLOCK, r1 = r0 + RMS_BLOCK < a->N ? r0 + RMS_BLOCK : a->N;
        ops->rmsnorm_backward_rows(a->dout, a->xhat, a->rstd_in, a->w, a->C, r0, r1, a->dx,
                                   a->dw_parts + blk * a->C, dxhat);
    }
    free(dxhat);
}

int rmsnorm_backward(const float *dout, const float *xhat, const float *rstd, const float *weight, long N, long C,
                     float *dx, float *dweight) {
    long blocks = (N + RMS_BLOCK - 1) / RMS_BLOCK;
    float *parts = (float *)calloc((size_t)(blocks > 0 ? blocks : 1) * C, sizeof(float));
    if (!parts) return -1;
    rms_ctx a = {.dout = dout, .xhat = xhat, .rstd_in = rstd, .w = weight, .dx = dx, .dw_parts = parts, .N = N,
                 .C = C};
    parallel_for(rmsnorm_backward_range, &a, blocks, 1, 3.0 * N * C);
    /* the blocks' partial sums, added in block order */
    for (long c = 0; c < C; c++) dweight[c] = 0.0f;
    for (long blk = 0; blk < blocks; blk++)
        for (long c = 0; c < C; c++) dweight[c] += parts[blk * C + c];
    free(parts);
    return a.failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* SwiGLU                                                                                           */

typedef struct {
    const float *a, *b, *dout, *sig_in, *silu_in;
    float *out, *sig, *silu, *da, *db;
} swiglu_ctx;

#define ELEMENT_GRAIN 64 /* elements per grain: a thread's run starts on a cache line */

static void swiglu_forward_range(const void *p, const ew_ops_t *ops, long i0, long i1) {
    const swiglu_ctx *s = (const swiglu_ctx *)p;
    ops->swiglu_forward_range(s->a, s->b, i0, i1, s->out, s->sig, s->silu);
}

void swiglu_forward(const float *a, const float *b, long n, float *out, float *sig, float *silu) {
    swiglu_ctx s = {.a = a, .b = b, .out = out, .sig = sig, .silu = silu};
    parallel_for(swiglu_forward_range, &s, n, ELEMENT_GRAIN, 5.0 * n);
}

static void swiglu_backward_range(const void *p, const ew_ops_t *ops, long i0, long i1) {
    const swiglu_ctx *s = (const swiglu_ctx *)p;
    ops->swiglu_backward_range(s->dout, s->a, s->b, s->sig_in, s->silu_in, i0, i1, s->da, s->db);
}

void swiglu_backward(const float *dout, const float *a, const float *b, const float *sig, const float *silu, long n,
                     float *da, float *db) {
    swiglu_ctx s = {.dout = dout, .a = a, .b = b, .sig_in = sig, .silu_in = silu, .da = da, .db = db};
    parallel_for(swiglu_backward_range, &s, n, ELEMENT_GRAIN, 7.0 * n);
}

/* ---------------------------------------------------------------------------------------------- */
/* RoPE: x (B, T, n, hd) read through strides (its last dimension contiguous), out contiguous       */

typedef struct {
    const float *x, *cs, *sn;
    const long *xs;
    float *out;
    long T, n, hd;
} rope_ctx;

static void rope_range(const void *p, const ew_ops_t *ops, long r0, long r1) {
    const rope_ctx *a = (const rope_ctx *)p;
    long half = a->hd / 2;
    for (long r = r0; r < r1; r++) { /* r = (b * T + t) * n + head */
        long head = r % a->n, t = (r / a->n) % a->T, b = r / (a->n * a->T);
        const float *xr = a->x + b * a->xs[0] + t * a->xs[1] + head * a->xs[2];
        ops->rope_row(xr, a->cs + t * half, a->sn + t * half, half, a->out + r * a->hd);
    }
}

void rope_forward(const float *x, const long *x_strides, const float *cos, const float *sin, long B, long T, long n,
                  long hd, float *out) {
    rope_ctx a = {.x = x, .cs = cos, .sn = sin, .xs = x_strides, .out = out, .T = T, .n = n, .hd = hd};
    parallel_for(rope_range, &a, B * T * n, 1, 2.0 * B * T * n * hd);
}

/* ---------------------------------------------------------------------------------------------- */
/* Cross-entropy over the vocabulary: logits (N, V) contiguous, targets (N,) in [0, V)              */

typedef struct {
    const float *logits, *lse_in, *scale;
    const int64_t *targets;
    float *lse, *nll, *dlogits;
    long V;
} ce_ctx;

static void ce_forward_range(const void *p, const ew_ops_t *ops, long r0, long r1) {
    const ce_ctx *a = (const ce_ctx *)p;
    ops->cross_entropy_forward_rows(a->logits, a->targets, a->V, r0, r1, a->lse, a->nll);
}

void cross_entropy_forward(const float *logits, const int64_t *targets, long N, long V, float *lse, float *nll) {
    ce_ctx a = {.logits = logits, .targets = targets, .lse = lse, .nll = nll, .V = V};
    parallel_for(ce_forward_range, &a, N, 1, 2.0 * N * V);
}

static void ce_backward_range(const void *p, const ew_ops_t *ops, long r0, long r1) {
    const ce_ctx *a = (const ce_ctx *)p;
    ops->cross_entropy_backward_rows(a->logits, a->targets, a->lse_in, a->scale, a->V, r0, r1, a->dlogits);
}

void cross_entropy_backward(const float *logits, const int64_t *targets, const float *lse, const float *scale,
                            long N, long V, float *dlogits) {
    ce_ctx a = {.logits = logits, .targets = targets, .lse_in = lse, .scale = scale, .dlogits = dlogits, .V = V};
    parallel_for(ce_backward_range, &a, N, 1, 2.0 * N * V);
}

/* Both, a row at a time, dlogits written over the logits: each row is read from memory once and is
 * still in L1/L2 for the backward's pass (apart, the backward reads all the logits again: 67 MB for
 * `small`'s batch), and no second logits-sized array is allocated. The same row functions: the same bits. */
static void ce_fused_range(const void *p, const ew_ops_t *ops, long r0, long r1) {
    const ce_ctx *a = (const ce_ctx *)p;
    for (long r = r0; r < r1; r++) {
        ops->cross_entropy_forward_rows(a->dlogits, a->targets, a->V, r, r + 1, a->lse, a->nll);
        ops->cross_entropy_backward_rows(a->dlogits, a->targets, a->lse, a->scale, a->V, r, r + 1, a->dlogits);
    }
}

void cross_entropy_fused(float *logits, const int64_t *targets, const float *scale, long N, long V, float *lse,
                         float *nll) {
    ce_ctx a = {.targets = targets, .scale = scale, .lse = lse, .nll = nll, .dlogits = logits, .V = V};
    parallel_for(ce_fused_range, &a, N, 1, 2.0 * N * V);
}

/* ---------------------------------------------------------------------------------------------- */
/* Embedding backward: dweight[tokens[i]] += dout[i] for i in order, the scatter-add of np.add.at in */
/* its order, so its bits (NumPy's add.at is ~15x slower: one generic indexed loop per element).    */
/* Threads take runs of columns: every element still adds its tokens' rows in order.                */

typedef struct {
    const float *dout;
    const int64_t *tokens;
    float *dweight;
    long N, C;
} emb_ctx;

static void embedding_backward_range(const void *p, const ew_ops_t *ops, long c0, long c1) {
    (void)ops;
    const emb_ctx *a = (const emb_ctx *)p;
    for (long i = 0; i < a->N; i++) {
        float *row = a->dweight + a->tokens[i] * a->C;
        const float *d = a->dout + i * a->C;
        for (long c = c0; c < c1; c++) row[c] += d[c];
    }
}

void embedding_backward(const float *dout, const int64_t *tokens, long N, long C, float *dweight) {
    emb_ctx a = {.dout = dout, .tokens = tokens, .dweight = dweight, .N = N, .C = C};
    parallel_for(embedding_backward_range, &a, C, 16, 2.0 * N * C); /* 16 columns: a cache line */
}

/* ---------------------------------------------------------------------------------------------- */
/* AdamW: p, g, m, v contiguous, n floats each; the coefficients are already rounded to float32      */

typedef struct {
    float *p, *m, *v;
    const float *g;
    adamw_coef k;
} adamw_ctx;

static void adamw_range(const void *p, const ew_ops_t *ops, long i0, long i1) {
    const adamw_ctx *a = (const adamw_ctx *)p;
    ops->adamw_range(a->p, a->g, a->m, a->v, &a->k, i0, i1);
}

void adamw_update(float *p, const float *g, float *m, float *v, long n, float decay, float beta1,
                  float one_minus_beta1, float beta2, float one_minus_beta2, float sqrt_bc2, float eps,
                  float step_size) {
    adamw_ctx a = {p, m, v, g, {decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size}};
    parallel_for(adamw_range, &a, n, ELEMENT_GRAIN, 4.0 * n);
}
