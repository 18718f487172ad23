/* A stress test of the kernels' thread pool (csrc/parallel.c), built by tests/sanitize.sh with
 * ThreadSanitizer: any data race between the caller and the pool's workers is reported and fails the
 * run. (TSan cannot be preloaded into Python, so this drives the C functions directly.)
 *
 * It covers what the pool must survive: many calls in a row (workers spinning or asleep between
 * them), teams of changing size, two caller threads at once (one gets the pool, the other threads of
 * its own), the fused attention (whose threads meet at a barrier), and a forked child. Then every
 * micro-kernel this CPU runs (tests/portability.sh runs it on arm64 under qemu: NEON there) is checked:
 * matmul against the triple loop, and attention (with and without document masks) against the
 * portable kernel's, which the Python tests check against the NumPy reference. The elementwise kernels
 * run at 1-3 threads and must give the same bits, and so must the decode GEMVs, whose helper threads
 * may be dropped when they start late (parallel_run_helpers). The FMA peak's chains must do the work
 * they count (fma_runs), and so must the micro-kernel timed alone (micro_runs: on arm64, NEON's).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "llama3np_kernels.h"

enum { M = 150, N = 130, K = 140 };

/* C = op(A) @ op(B) with the pool, for the four transposes, checked against the triple loop on
 * explicitly transposed copies; returns the largest error */
static double check_matmul(unsigned seed) {
    float *a = malloc(sizeof(float) * M * K), *b = malloc(sizeof(float) * K * N);
    float *at = malloc(sizeof(float) * M * K), *bt = malloc(sizeof(float) * K * N);
    float *c = malloc(sizeof(float) * M * N), *ref = malloc(sizeof(float) * M * N);
    for (int i = 0; i < M * K; i++) a[i] = (float)((seed * 7 + i * 13) % 17) / 17.0f - 0.5f;
    for (int i = 0; i < K * N; i++) b[i] = (float)((seed * 3 + i * 11) % 19) / 19.0f - 0.5f;
    for (int i = 0; i < M; i++)
        for (int p = 0; p < K; p++) at[p * M + i] = a[i * K + p];
    for (int p = 0; p < K; p++)
        for (int j = 0; j < N; j++) bt[j * K + p] = b[p * N + j];
    naive_sgemm(M, N, K, a, b, ref);
    double err = 0;
    for (int t = 0; t < 4; t++) {
        int ta = t & 1, tb = t >> 1;
        sgemm(ta, tb, M, N, K, ta ? at : a, ta ? M : K, tb ? bt : b, tb ? K : N, c, N, 0);
        for (int i = 0; i < M * N; i++) err = fmax(err, fabs(c[i] - ref[i]));
    }
    free(a), free(b), free(at), free(bt), free(c), free(ref);
    return err;
}

#ifdef PLANT_RACE
static int planted; /* written by both callers without synchronization: TSan must say so */
#endif

static void *caller(void *p) {
    double *worst = p;
#ifdef PLANT_RACE
    planted++;
#endif
    for (unsigned s = 0; s < 20; s++) *worst = fmax(*worst, check_matmul(s));
    return NULL;
}

/* one forward (+ backward) of a small GQA attention on fixed inputs; out receives the forward output
 * (H * T * HD floats) when not NULL */
static int attention_once(const int *kv_start, float *out_copy) {
    enum { H = 4, KV = 2, T = 70, HD = 16 };
    long q_strides[3] = {H * T * HD, T * HD, HD}, kv_strides[3] = {KV * T * HD, T * HD, HD};
    float *q = malloc(sizeof(float) * H * T * HD), *k = malloc(sizeof(float) * KV * T * HD);
    float *v = malloc(sizeof(float) * KV * T * HD), *lse = malloc(sizeof(float) * H * T);
    for (int i = 0; i < H * T * HD; i++) q[i] = (float)((i * 7) % 23) / 23.0f - 0.5f;
    for (int i = 0; i < KV * T * HD; i++) k[i] = (float)((i * 5) % 19) / 19.0f - 0.5f;
    for (int i = 0; i < KV * T * HD; i++) v[i] = (float)((i * 3) % 17) / 17.0f - 0.5f;
    int rc = attention_forward(q, q_strides, k, kv_strides, v, kv_strides, out_copy, lse, 1, H, KV, T, T, HD, 1,
                               kv_start);
    free(q), free(k), free(v), free(lse);
    return rc;
}

/* every ISA this CPU runs, against the triple loop (matmul) and the portable kernel (attention) */
static double check_every_isa(void) {
    enum { OUT = 4 * 70 * 16 };
    int docs[70];
    for (int i = 0; i < 70; i++) docs[i] = i < 33 ? 0 : 33;
    float ref[2][OUT], got[OUT];
    int saved = current_isa();
    select_isa(0);
    if (attention_once(NULL, ref[0]) || attention_once(docs, ref[1])) return 1e9;
    double worst = 0;
    for (int isa = 0; isa < 4; isa++) {
        if (!isa_supported(isa)) continue;
        select_isa(isa);
        for (unsigned s = 0; s < 3; s++) worst = fmax(worst, check_matmul(s));
        for (int m = 0; m < 2; m++) {
            if (attention_once(m ? docs : NULL, got)) return 1e9;
            for (int i = 0; i < OUT; i++) worst = fmax(worst, fabs(got[i] - ref[m][i]));
        }
        printf("threads_stress: micro-kernel %d checked\n", isa);
    }
    select_isa(saved);
    return worst;
}

static int attention_runs(void) {
    enum { H = 4, KV = 2, T = 70, HD = 16 };
    long q_strides[3] = {H * T * HD, T * HD, HD}, kv_strides[3] = {KV * T * HD, T * HD, HD};
    long lse_strides[3] = {H * T, T, 1};
    float *q = calloc(H * T * HD, sizeof(float)), *k = calloc(KV * T * HD, sizeof(float));
    float *v = calloc(KV * T * HD, sizeof(float)), *out = calloc(H * T * HD, sizeof(float));
    float *lse = calloc(H * T, sizeof(float)), *dq = calloc(H * T * HD, sizeof(float));
    float *dk = calloc(KV * T * HD, sizeof(float)), *dv = calloc(KV * T * HD, sizeof(float));
    for (int i = 0; i < H * T * HD; i++) q[i] = (float)(i % 7) / 7.0f;
    for (int i = 0; i < KV * T * HD; i++) k[i] = v[i] = (float)(i % 5) / 5.0f;
    int kv_start[T]; /* odd runs: three documents packed in the row (positions 0, 20 and 45 start one) */
    for (int i = 0; i < T; i++) kv_start[i] = i < 20 ? 0 : (i < 45 ? 20 : 45);
    int rc = 0;
    for (int r = 0; r < 6; r++) {
        const int *starts = r % 2 ? kv_start : NULL;
        rc |= attention_forward(q, q_strides, k, kv_strides, v, kv_strides, out, lse, 1, H, KV, T, T, HD, 1, starts);
        rc |= attention_backward(out, q_strides, q, q_strides, k, kv_strides, v, kv_strides, out, q_strides,
                                 lse, lse_strides, dq, dk, dv, 1, H, KV, T, T, HD, 1, starts);
    }
    free(q), free(k), free(v), free(out), free(lse), free(dq), free(dk), free(dv);
    return rc;
}

/* Every elementwise kernel (csrc/elementwise.c) at 1, 2 and 3 threads on inputs big enough to split:
 * the pool's workers write disjoint parts of the outputs, and the results must be the same bits. */
static int elementwise_runs(void) {
    enum { R = 300, C = 256, V = 1200, RV = 150, NE = R * C };
    float *x = malloc(NE * sizeof(float)), *w = malloc(C * sizeof(float)), *logits = malloc(RV * V * sizeof(float));
    size_t total = 8 * (size_t)NE + R + C + 3 * (size_t)RV * V + 2 * (size_t)RV;
    float *ref = NULL, *res = malloc(total * sizeof(float));
    int64_t targets[RV];
    long xs[3] = {64 * 4 * 16, 4 * 16, 16}; /* (B=NE/4096, T=64, n=4, hd=16) */
    for (int i = 0; i < NE; i++) x[i] = sinf(0.37f * (float)i) * 3.0f;
    for (int c = 0; c < C; c++) w[c] = 1.0f + 0.01f * (float)c;
    for (int i = 0; i < RV * V; i++) logits[i] = cosf(0.11f * (float)i) * 4.0f;
    for (int r = 0; r < RV; r++) targets[r] = (r * 37) % V;
    int bad = 0;
    for (int n = 1; n <= 3; n++) {
        set_num_threads(n);
        float *o = res; /* outputs laid one after the other */
        float *y = o, *xhat = o + NE, *rstd = o + 2 * NE, *dx = rstd + R, *dw = dx + NE;
        rmsnorm_forward(x, w, 1e-5f, R, C, y, xhat, rstd);
        rmsnorm_backward(x, xhat, rstd, w, R, C, dx, dw);
        float *sw = dw + C; /* out, sig, silu, da, db: NE each, then RoPE (after dx and dw: all compared) */
        swiglu_forward(x, w, 1, sw, sw + 1, sw + 2); /* a lone element, then the whole array */
        swiglu_forward(x, y, NE, sw, sw + NE, sw + 2 * NE);
        swiglu_backward(y, x, y, sw + NE, sw + 2 * NE, NE, sw + 3 * NE, sw + 4 * NE);
        float *ce = sw + 5 * NE, *lse = ce + 3 * (size_t)RV * V, *nll = lse + RV;
        rope_forward(x, xs, logits, logits + 512, NE / 4096, 64, 4, 16, ce); /* cos, sin (64, 8) */
        cross_entropy_forward(logits, targets, RV, V, lse, nll);
        cross_entropy_backward(logits, targets, lse, rstd, RV, V, ce + RV * V);
        adamw_update(x, y, xhat, rstd, R, 0.999f, 0.9f, 0.1f, 0.95f, 0.05f, 0.5f, 1e-8f, 1e-3f);
        if (!ref) {
            ref = malloc(total * sizeof(float));
            memcpy(ref, res, total * sizeof(float));
        } else if (memcmp(ref, res, total * sizeof(float)) != 0) {
            fprintf(stderr, "elementwise kernels differ at %d threads\n", n);
            bad = 1;
        }
        for (int i = 0; i < R; i++) x[i] = sinf(0.37f * (float)i) * 3.0f; /* undo the AdamW update */
    }
    free(x), free(w), free(logits), free(ref), free(res);
    return bad;
}

/* Decode-sized products (1-3 rows of A, B stored transposed) at 1, 2 and 3 threads, many calls in a row:
 * helpers that start late are dropped (parallel_run_helpers) and the next call must still run right.
 * Every call must give the bits of the one-thread call. */
static int gemv_runs(void) {
    enum { GM = 3, GN = 2000, GK = 300 };
    float *a = malloc(sizeof(float) * GM * GK), *b = malloc(sizeof(float) * GN * GK);
    float *ref = malloc(sizeof(float) * GM * GN), *c = malloc(sizeof(float) * GM * GN);
    for (int i = 0; i < GM * GK; i++) a[i] = sinf(0.3f * (float)i);
    for (int i = 0; i < GN * GK; i++) b[i] = cosf(0.7f * (float)i);
    int bad = 0;
    for (int m = 1; m <= GM; m++) {
        set_num_threads(1);
        sgemm(0, 1, m, GN, GK, a, GK, b, GK, ref, GN, 0);
        for (int n = 2; n <= 3; n++) {
            set_num_threads(n);
            for (int r = 0; r < 200; r++) {
                sgemm(0, 1, m, GN, GK, a, GK, b, GK, c, GN, 0);
                if (memcmp(ref, c, sizeof(float) * m * GN) != 0) {
                    fprintf(stderr, "GEMV of %d rows differs at %d threads\n", m, n);
                    bad = 1;
                    break;
                }
            }
        }
    }
    free(a), free(b), free(ref), free(c);
    return bad;
}

/* The FMA peak's chains (csrc/peak.c) on every instruction set this CPU runs, at 1-3 threads: the work
 * counted must be done (the result is the recurrence's, chain i starting at i + 1, summed over threads). */
static int fma_runs(void) {
    static const int lanes[4] = {0, 8, 16, 4}, chains[4] = {0, 12, 16, 16};
    enum { ITERS = 1000 };
    int bad = 0;
    for (int isa = 1; isa < 4; isa++) {
        if (!isa_supported(isa)) continue;
        double want = 0;
        for (int c = 0; c < chains[isa]; c++) {
            float x = (float)(c + 1);
            for (int i = 0; i < ITERS; i++) x = fmaf(x, 0.999999f, 1e-7f);
            want += x;
        }
        for (int n = 1; n <= 3; n++) {
            float result = 0;
            double flops = fma_burst(isa, ITERS, n, &result);
            if (flops != 2.0 * lanes[isa] * chains[isa] * ITERS * n || fabs(result - n * want) > 1e-5 * n * want) {
                fprintf(stderr, "fma_burst(isa %d, %d threads): %g operations, result %g, expected %g\n", isa, n,
                        flops, result, n * want);
                bad = 1;
            }
        }
    }
    return bad;
}

/* microkernel_burst (csrc/gemm.c) on every instruction set: `iters` calls leave C + iters x A @ B in C,
 * exactly (small integers: every product and sum is exact) */
static int micro_runs(void) {
    enum { KC = 37, ITERS = 3 };
    for (int isa = 0; isa < 4; isa++) {
        if (!isa_supported(isa)) continue;
        const int mr = gemm_mr(isa), nr = gemm_nr(isa);
        float a[8 * KC], b[KC * 32], c[8 * 32]; /* the largest tile: AVX-512's 8 x 32 */
        for (int i = 0; i < mr * KC; i++) a[i] = (float)(i % 9) - 4.0f;
        for (int i = 0; i < KC * nr; i++) b[i] = (float)(i % 7) - 3.0f;
        for (int i = 0; i < mr * nr; i++) c[i] = (float)(i % 5);
        double flops = microkernel_burst(isa, KC, ITERS, a, b, c);
        int bad = flops != 2.0 * mr * nr * KC * ITERS;
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) {
                double want = (double)((i * nr + j) % 5);
                for (int p = 0; p < KC; p++) want += ITERS * (double)a[i * KC + p] * b[p * nr + j];
                if (c[i * nr + j] != want) bad = 1;
            }
        if (bad) {
            fprintf(stderr, "microkernel_burst(isa %d): wrong C or operation count (%g)\n", isa, flops);
            return 1;
        }
    }
    return 0;
}

int main(void) {
    double worst = 0;
    for (int n = 1; n <= 4; n++) { /* teams of every size, the pool growing and shrinking its use */
        set_num_threads(n);
        for (unsigned s = 0; s < 10; s++) worst = fmax(worst, check_matmul(s));
        usleep(2000); /* long enough for the workers to stop spinning and sleep */
    }
    set_num_threads(2);
    double w1 = 0, w2 = 0; /* two callers at once */
    pthread_t t1, t2;
    pthread_create(&t1, NULL, caller, &w1);
    pthread_create(&t2, NULL, caller, &w2);
    pthread_join(t1, NULL), pthread_join(t2, NULL);
    worst = fmax(worst, fmax(w1, w2));
    if (attention_runs() != 0) return fprintf(stderr, "attention failed\n"), 1;
    if (elementwise_runs() != 0) return 1;
    if (gemv_runs() != 0) return 1;
    if (fma_runs() != 0) return 1;
    if (micro_runs() != 0) return 1;
    worst = fmax(worst, check_every_isa());
    pid_t child = fork(); /* the child has no workers: the pool must start its own */
    if (child == 0) _exit(check_matmul(99) < 1e-4 ? 0 : 1);
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return fprintf(stderr, "forked child failed\n"), 1;
    printf("threads_stress: largest error %.2g\n", worst);
    return worst < 1e-4 ? 0 : 1;
}
