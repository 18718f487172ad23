/* The CPU's float32 peak: how many fused multiply-adds per second its vector units can do, for the
 * instruction set of a micro-kernel. This is the ceiling of every matmul (a GEMM's GFLOP/s divided by
 * it is how much of the hardware the kernel uses, its "efficiency"), and of a training step: the step's
 * FLOPs divided by it is the least time the step can take on this machine (benchmarks/bench_train.py).
 *
 * How: independent chains x = x * b + c, each one FMA per step. One FMA waits for the previous one of
 * its chain (4 cycles on current x86 and Apple cores), so with enough chains side by side every FMA
 * unit starts one each cycle: 2 units x 4 cycles needs 8 chains; we keep 12 (AVX2: 16 registers) or 16
 * (AVX-512, NEON: 32 registers). b is just below 1 and c small, so x settles near c / (1 - b) and stays
 * a normal number (denormals would be slow). Nothing is read from memory: this is arithmetic alone.
 * The compiler may not drop the steps (no -ffast-math; the results are returned), but it may merge
 * chains it can prove equal: started from the same value, gcc computed one chain and this reported 1.5x
 * the real peak. So each starts from its own value. Measured on a Zen 4 (AMD EPYC, 1 core): 117.3
 * GFLOP/s with AVX2 and with AVX-512 alike (its 512-bit FMAs run as two 256-bit halves).
 */
#include "llama3np_kernels.h"
#include "parallel.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LLAMA3NP_NO_SIMD)
#define PEAK_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__) && !defined(LLAMA3NP_NO_SIMD)
#define PEAK_NEON 1
#include <arm_neon.h>
#endif

#define B_ 0.999999f
#define C_ 1e-7f

/* chains x0 .. x11 (x15) starting from different values: equal chains would be one to the compiler */
#define INIT12(type, set) type x0 = set(1.0f), x1 = set(2.0f), x2 = set(3.0f), x3 = set(4.0f), x4 = set(5.0f), \
                          x5 = set(6.0f), x6 = set(7.0f), x7 = set(8.0f), x8 = set(9.0f), x9 = set(10.0f),  \
                          x10 = set(11.0f), x11 = set(12.0f)
#define INIT16(type, set) INIT12(type, set), x12 = set(13.0f), x13 = set(14.0f), x14 = set(15.0f), x15 = set(16.0f)
/* the same step for chains x0 .. x11 (and x12 .. x15), written out so they stay in registers */
#define STEP12(fma) x0 = fma(x0, b, c), x1 = fma(x1, b, c), x2 = fma(x2, b, c), x3 = fma(x3, b, c),   \
                    x4 = fma(x4, b, c), x5 = fma(x5, b, c), x6 = fma(x6, b, c), x7 = fma(x7, b, c),   \
                    x8 = fma(x8, b, c), x9 = fma(x9, b, c), x10 = fma(x10, b, c), x11 = fma(x11, b, c)
#define STEP16(fma) STEP12(fma), x12 = fma(x12, b, c), x13 = fma(x13, b, c), x14 = fma(x14, b, c), \
                    x15 = fma(x15, b, c)
/* their sum, in chain order */
#define SUM12(add) add(add(add(add(add(add(add(add(add(add(add(x0, x1), x2), x3), x4), x5), x6), x7), x8), x9), \
                           x10), x11)
#define SUM16(add) add(add(add(add(SUM12(add), x12), x13), x14), x15)

/* name(iters): N chains of vectors of `type` (set: broadcast, fma(x, b, c): x * b + c, add, lane0: the
 * first lane as a float), iters steps, the first lane of their sum */
#define CHAINS(name, type, set, fma, add, lane0, N)                 \
    static float name(long iters) {                                 \
        const type b = set(B_), c = set(C_);                        \
        INIT##N(type, set);                                         \
        for (long i = 0; i < iters; i++) STEP##N(fma);              \
        return lane0(SUM##N(add));                                  \
    }

#if PEAK_X86
__attribute__((target("avx2,fma"))) CHAINS(chains_avx2, __m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps,
                                           _mm256_cvtss_f32, 12)
__attribute__((target("avx512f"))) CHAINS(chains_avx512, __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps,
                                          _mm512_cvtss_f32, 16)
#endif

#if PEAK_NEON
#define NEON_FMA(x, b, c) vfmaq_f32(c, x, b) /* vfmaq_f32(c, x, b) = c + x * b */
#define NEON_LANE0(v) vgetq_lane_f32(v, 0)
CHAINS(chains_neon, float32x4_t, vdupq_n_f32, NEON_FMA, vaddq_f32, NEON_LANE0, 16)
#endif

/* floats of FMA per loop step: chains x lanes (0: no FMA chains for this instruction set) */
static long fmas_per_step(int isa) {
#if PEAK_X86
    if (isa == 1) return 12 * 8;
    if (isa == 2) return 16 * 16;
#endif
#if PEAK_NEON
    if (isa == 3) return 16 * 4;
#endif
    (void)isa;
    return 0;
}

typedef struct {
    int isa;
    long iters;
    float sink[64]; /* one result per thread (up to 64): returned, so the work cannot be dropped */
} peak_ctx;

static void peak_thread(void *arg, int tid, int nthreads, barrier_t *barrier) {
    peak_ctx *p = (peak_ctx *)arg;
    float r = 0.0f;
    (void)nthreads, (void)barrier;
#if PEAK_X86
    if (p->isa == 1) r = chains_avx2(p->iters);
    if (p->isa == 2) r = chains_avx512(p->iters);
#endif
#if PEAK_NEON
    if (p->isa == 3) r = chains_neon(p->iters);
#endif
    if (tid < 64) p->sink[tid] = r;
}

double fma_burst(int isa, long iters, int nthreads, float *result) {
    long per_step = isa_supported(isa) ? fmas_per_step(isa) : 0;
    if (per_step == 0 || iters < 1) return 0.0;
    peak_ctx p = {isa, iters, {0}};
    nthreads = nthreads < 1 ? 1 : (nthreads > 64 ? 64 : nthreads);
    int ran = parallel_run(nthreads, peak_thread, &p);
    *result = 0.0f;
    for (int t = 0; t < ran; t++) *result += p.sink[t];
    return 2.0 * (double)per_step * (double)iters * ran; /* an FMA is two floating-point operations */
}
