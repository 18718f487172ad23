/* gemm.c's internals shared with attention.c: vector helpers, packing and the packed products. */
#ifndef LLAMA3NP_GEMM_H
#define LLAMA3NP_GEMM_H

#define N_ISAS 4 /* portable, avx2, avx512, neon: the numbering of llama3np_kernels.h */

/* Functions marked VECTOR_CLONES are compiled for several instruction sets: on x86-64 Linux the
 * compiler builds an AVX-512, an AVX2 and a baseline copy and the loader picks one for this CPU
 * (target_clones); elsewhere they are plain functions. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && !defined(LLAMA3NP_NO_SIMD)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Vector helpers over n floats, one set per instruction set (vec_body.h): dot = x . y,
 * axpy: y += alpha * x, dot4: out[r] = x . y_r for r < 4, axpy4: y += a[0] x0 + a[1] x1 + a[2] x2 + a[3] x3.
 * vec_ops(isa) with isa as current_isa() returns them. */
typedef struct {
    float (*dot)(const float *x, const float *y, int n);
    void (*axpy)(float *y, float alpha, const float *x, int n);
    void (*dot4)(const float *x, const float *y0, const float *y1, const float *y2, const float *y3, int n,
                 float *out);
    void (*axpy4)(float *y, const float *a, const float *x0, const float *x1, const float *x2, const float *x3,
                  int n);
} vec_ops_t;
const vec_ops_t *vec_ops(int isa);

/* Packed operands, for callers that reuse them (attention packs k and v once per head, not per tile).
 * isa is the value of current_isa() read once by the caller, so packing and use agree.
 * A packed op(A) (m x k) is ceil(m / MR) slivers, MR * k floats apart: rows i0.. (i0 a multiple of MR)
 * start at Ap + i0 * k. A packed op(B) (k x n) is ceil(n / NR) slivers of k rows, NR * k floats
 * apart: columns j0.. (j0 a multiple of NR) start at Bp + j0 * k, and rows p0.. of every sliver at
 * Bp + p0 * NR with the sliver stride unchanged. Buffers must be 64-byte aligned. */
long gemm_packed_a_floats(int isa, int m, int k);
long gemm_packed_b_floats(int isa, int k, int n);
void gemm_pack_a(int isa, int trans, const float *A, long lda, int m, int k, float *Ap);
void gemm_pack_b(int isa, int trans, const float *B, long ldb, int k, int n, float *Bp);
/* C (m, n) (+)= packed A (m x k) @ packed B (k x n) whose slivers are b_stride floats apart */
void gemm_packed(int isa, int m, int n, int k, const float *Ap, const float *Bp, long b_stride, float *C, long ldc,
                 int accumulate);

/* The same with A a row-major (m x k) tile whose leading dimension is GEMM_TILE_LD, read in place:
 * no packing. Rows up to m rounded up to a multiple of MR (at most m + 7) must be readable; their
 * results are dropped. */
#define GEMM_TILE_LD 64
void gemm_rowmajor_a(int isa, int m, int n, int k, const float *A, const float *Bp, long b_stride, float *C,
                     long ldc, int accumulate);
/* And with A the transpose of such a tile: A's element (i, p) at A[p * GEMM_TILE_LD + i] (the tile holds
 * k rows of at least m columns), read in place. Columns up to m rounded up to a multiple of MR must be
 * readable (past the last row's: its next row's first ones); their results are dropped. */
void gemm_tile_transposed_a(int isa, int m, int n, int k, const float *A, const float *Bp, long b_stride, float *C,
                            long ldc, int accumulate);

/* How A is given to gemm_sliver: packed (gemm_packed's), a tile (gemm_rowmajor_a's), its transpose
 * (gemm_tile_transposed_a's) */
enum { A_PACKED, A_TILE, A_TILE_T };

/* One sliver s (rows s * MR .. of m, MR = gemm_mr) of gemm_packed, gemm_rowmajor_a or gemm_tile_transposed_a
 * (a_layout), over the columns [0, n) and the depth [p0, p1) only:
 * C[rows, :n] (+)= A[rows, p0:p1] @ B[p0:p1, :n]. For the tiles of a causal mask (attention.c), where the
 * rest of a product is masked or adds only zeros; nothing is done when n <= 0 or p1 <= p0. */
void gemm_sliver(int isa, int a_layout, int s, int m, int n, int k, int p0, int p1, const float *A, const float *Bp,
                 long b_stride, float *C, long ldc, int accumulate);

#endif
