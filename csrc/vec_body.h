/* The vector helpers of gemm.h (vec_ops_t), written once and compiled once per instruction set:
 * gemm.c includes this file several times, each time with
 *   VEC_SUFFIX  the name suffix (portable, avx2, avx512) and
 *   VEC_TARGET  the function attribute (empty, or __attribute__((target("avx2,fma"))), ...),
 * and gets a table VEC_OPS_<suffix>. The compiler vectorizes each loop for that target. They are
 * picked by the micro-kernel's ISA (vec_ops(isa)), not by the CPU, so LLAMA3NP_ISA=avx2 runs AVX2
 * code everywhere, and clang builds them too (gcc's target_clones, used before, are gcc-only). */
#ifndef VEC_CAT
#define VEC_CAT2(a, b) a##b
#define VEC_CAT(a, b) VEC_CAT2(a, b)
#endif
#define VEC_NAME(name) VEC_CAT(name, VEC_SUFFIX)

/* x . y */
VEC_TARGET static float VEC_NAME(vec_dot_)(const float *x, const float *y, int n) {
    float s = 0.0f;
    /* allow this one sum to be reordered into vector lanes (-fopenmp-simd: no OpenMP runtime) */
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < n; d++) s += x[d] * y[d];
    return s;
}

/* y += alpha * x */
VEC_TARGET static void VEC_NAME(vec_axpy_)(float *y, float alpha, const float *x, int n) {
    for (int d = 0; d < n; d++) y[d] += alpha * x[d];
}

/* out[r] = x . y_r for four rows y_r at once: four independent sums keep the FMA units busy */
VEC_TARGET static void VEC_NAME(vec_dot4_)(const float *x, const float *y0, const float *y1, const float *y2,
                                           const float *y3, int n, float *out) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int d = 0; d < n; d++) {
        s0 += x[d] * y0[d];
        s1 += x[d] * y1[d];
        s2 += x[d] * y2[d];
        s3 += x[d] * y3[d];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* y += a0 x0 + a1 x1 + a2 x2 + a3 x3: four rows per pass over y, so y is loaded and stored 4x less */
VEC_TARGET static void VEC_NAME(vec_axpy4_)(float *y, const float *a, const float *x0, const float *x1,
                                            const float *x2, const float *x3, int n) {
    for (int d = 0; d < n; d++) y[d] += a[0] * x0[d] + a[1] * x1[d] + a[2] * x2[d] + a[3] * x3[d];
}

static const vec_ops_t VEC_NAME(VEC_OPS_) = {VEC_NAME(vec_dot_), VEC_NAME(vec_axpy_), VEC_NAME(vec_dot4_),
                                             VEC_NAME(vec_axpy4_)};

#undef VEC_NAME
#undef VEC_SUFFIX
#undef VEC_TARGET
