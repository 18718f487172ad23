/* sgemm for use inside other kernels (attention.c): one thread, packing buffers from the caller. */
#ifndef LLAMA3NP_GEMM_H
#define LLAMA3NP_GEMM_H

/* floats of workspace sgemm_serial needs for an (M, N, K) product (64-byte aligned by the caller) */
long sgemm_work_floats(int M, int N, int K);

/* C (M, N) (+)= op(A) (M, K) @ op(B) (K, N) on the calling thread; see sgemm in llama3np_kernels.h */
void sgemm_serial(int trans_a, int trans_b, int M, int N, int K, const float *A, long lda, const float *B,
                  long ldb, float *C, long ldc, int accumulate, float *work);

/* Packed operands, for callers that reuse them (attention packs k and v once per head, not per tile).
 * isa is the value of current_isa() read once by the caller, so packing and use agree.
 * A packed op(A) (m x k) is ceil(m / MR) slivers, MR * k floats apart: rows i0.. (i0 a multiple of MR)
 * start at Ap + i0 * k. A packed op(B) (k x n) is ceil(n / NR) slivers of k rows, NR * k floats
 * apart: columns j0.. (j0 a multiple of NR) start at Bp + j0 * k, and rows p0.. of every sliver at
 * Bp + p0 * NR with the sliver stride unchanged. Buffers must be 64-byte aligned. */
int gemm_mr(int isa);
int gemm_nr(int isa);
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

#endif
