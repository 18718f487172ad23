/* sgemm for use inside other kernels (attention.c): one thread, packing buffers from the caller. */
#ifndef LLAMA3NP_GEMM_H
#define LLAMA3NP_GEMM_H

/* floats of workspace sgemm_serial needs for an (M, N, K) product (64-byte aligned by the caller) */
long sgemm_work_floats(int M, int N, int K);

/* C (M, N) (+)= op(A) (M, K) @ op(B) (K, N) on the calling thread; see sgemm in llama3np_kernels.h */
void sgemm_serial(int trans_a, int trans_b, int M, int N, int K, const float *A, long lda, const float *B,
                  long ldb, float *C, long ldc, int accumulate, float *work);

#endif
