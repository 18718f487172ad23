/* sgemm: C = op(A) @ op(B) in float32, blocked for the caches with packed panels and a register-tiled
 * SIMD micro-kernel (the GotoBLAS / BLIS scheme), on 1..n threads.
 *
 * The idea in four steps (notebooks/02_kernels walks through them with timings):
 *   1. The micro-kernel computes one small MR x NR tile of C entirely in registers: for each p it
 *      loads one row of NR values of B, broadcasts each of the MR values of A's column p, and does
 *      MR x NR fused multiply-adds. C is read and written once per tile, not once per p.
 *   2. Packing: A and B are copied into "slivers" laid out exactly in the order the micro-kernel
 *      reads them (A: MR values per p, B: NR values per p), so its loads are sequential and
 *      aligned, whatever the strides or transposes of the original matrices. (On AVX2 and AVX-512
 *      an A that is not transposed is read in place instead, MR rows side by side: there copying
 *      it cost more than it saved; see a_in_place.)
 *   3. Blocking: K is cut into blocks of KC so a packed A sliver (MR x KC) stays in L1 while the
 *      micro-kernel runs along a packed block of B (KC x NC) that stays in L2.
 *   4. Threads take whole MC x NC tiles of C from a shared counter and never wait for each other.
 *
 * Row-major throughout: element (i, j) of a matrix with leading dimension ld is at [i*ld + j].
 * The instruction set of the micro-kernel is chosen at run time (select_isa), so one build runs on
 * any x86-64 (portable, AVX2, AVX-512); on arm64 the same file builds the portable and NEON kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gemm.h"
#include "llama3np_kernels.h"
#include "parallel.h"

/* LLAMA3NP_NO_SIMD builds only the portable kernel, as on arm64 (to check that path on x86 too) */
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LLAMA3NP_NO_SIMD)
#define LLAMA3NP_X86 1
#include <immintrin.h>
#endif
/* NEON (Advanced SIMD) is part of every arm64 CPU: no run-time check needed */
#if defined(__aarch64__) && !defined(LLAMA3NP_NO_SIMD)
#define LLAMA3NP_NEON 1
#include <arm_neon.h>
#endif

/* Block sizes (in floats). KC: depth of one packed block; NC: width of a packed B block (KC*NC*4
 * bytes, in L2, see nc_block); MC: the most rows of a packed A block (528 KiB, streamed a sliver at a
 * time; a multiple of every MR: 4, 6, 8). Row blocks are multiples of the kernel's MR, so that only the
 * last one has a partial sliver. KC and NC can be set at build time (LLAMA3NP_CFLAGS="-DKC=384") to try others. */
#ifndef KC
#define KC 256
#endif
#ifdef NC
#define NC_MAX NC
static int nc_block(void) { return NC; }
#else
#define NC_MAX 512
/* Every column block packs all of A's rows again, so wider blocks pack A less often: with N = 512 (the
 * dx and dW products of `small`), 384 + 128 columns pack A twice, where 512 packs it once. A block
 * of 512 (512 KiB) needs an L2 of 1 MiB (Zen 4, Intel cores since Tiger Lake); measured there (Zen 4, 1
 * thread, medians of 6 alternating runs) 384 -> 512: dx = dy w 93.9 -> 100.1 GFLOP/s and dW = dy^T x
 * 97.8 -> 103.4 on AVX2, 94.6 -> 100.2 and 97.8 -> 100.5 on AVX-512, 2 threads +3-4%. A 512 KiB L2
 * (Zen 2/3) keeps 384 (384 KiB). */
static int nc_block(void) {
    static int nc = 0; /* chosen once; threads that race here all store the same value */
    int n = __atomic_load_n(&nc, __ATOMIC_RELAXED);
    if (!n) {
        long l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
        l2 = sysconf(_SC_LEVEL2_CACHE_SIZE); /* 0 or -1 where the C library does not know */
#endif
        n = l2 >= (1L << 20) ? 512 : 384;
        __atomic_store_n(&nc, n, __ATOMIC_RELAXED);
    }
    return n;
}
#endif
#define MC 528
#define MIN_TILE 72 /* rows: a claim packs all of B's block for them (~28% of a 72-row claim's time) */
#define MAX_MR 8
#define MAX_NR 32

/* ---------------------------------------------------------------------------------------------- */
/* Micro-kernels: C[0:MR, 0:NR] (+)= A (MR x kc) @ Bp (kc x NR, packed).                           */
/* Bp holds, for each p, the NR values B[p, j]. A's element (i, p) is at A[i * rs + p * cs]: each   */
/* kernel body is written once over those strides and compiled for a packed A sliver (rs = 1,      */
/* cs = MR: the MR values of column p side by side), for a row-major tile with the fixed leading    */
/* dimension GEMM_TILE_LD (rs = GEMM_TILE_LD, cs = 1) and for its transpose (rs = 1,                */
/* cs = GEMM_TILE_LD), which attention.c multiplies without packing them. The strides are           */
/* compile-time constants (but kernel_ld's row stride), so every load is a plain offset.            */

typedef void (*ukernel_fn)(int kc, const float *A, const float *Bp, float *C, long ldc, int accumulate);
/* the same with A's rows lda apart, read in place (A's element (i, p) at A[i * lda + p]) */
typedef void (*ukernel_ld_fn)(int kc, const float *A, long lda, const float *Bp, float *C, long ldc, int accumulate);

#define INLINE static inline __attribute__((always_inline))

/* One instruction set's micro-kernels: its tile body (name_tile) compiled for each layout of A (see
 * above): ukernel_name (packed slivers, cs = MR), _rows (a tile, rs = GEMM_TILE_LD) and _cols (the tile's
 * transpose, cs = GEMM_TILE_LD); UKERNEL_LD adds _ld (rows lda apart, read in place). `target` is the
 * function attribute that lets the compiler use the instruction set (empty for portable C and NEON). */
#define UKERNELS(name, target, MR)                                                                             \
    target static void ukernel_##name(int kc, const float *A, const float *Bp, float *C, long ldc,            \
                                      int accumulate) {                                                        \
        name##_tile(kc, A, 1, MR, Bp, C, ldc, accumulate);                                                     \
    }                                                                                                          \
    target static void ukernel_##name##_rows(int kc, const float *A, const float *Bp, float *C, long ldc,      \
                                             int accumulate) {                                                 \
        name##_tile(kc, A, GEMM_TILE_LD, 1, Bp, C, ldc, accumulate);                                           \
    }                                                                                                          \
    target static void ukernel_##name##_cols(int kc, const float *A, const float *Bp, float *C, long ldc,      \
                                             int accumulate) {                                                 \
        name##_tile(kc, A, 1, GEMM_TILE_LD, Bp, C, ldc, accumulate);                                           \
    }
#define UKERNEL_LD(name, target)                                                                               \
    target static void ukernel_##name##_ld(int kc, const float *A, long lda, const float *Bp, float *C,       \
                                           long ldc, int accumulate) {                                         \
        name##_tile(kc, A, lda, 1, Bp, C, ldc, accumulate);                                                    \
    }

/* The portable kernel: plain C that any compiler vectorizes; the reference for the SIMD ones.
 * 4 x 8 keeps the 32 accumulators in 8 SSE (or NEON) registers: with 4 x 16 gcc spills them to memory
 * and runs 6x slower. */
#define PORTABLE_MR 4
#define PORTABLE_NR 8
INLINE void portable_tile(int kc, const float *A, long rs, long cs, const float *Bp, float *C, long ldc,
                          int accumulate) {
    float acc[PORTABLE_MR][PORTABLE_NR] = {{0}};
    for (int p = 0; p < kc; p++) {
        for (int i = 0; i < PORTABLE_MR; i++)
            for (int j = 0; j < PORTABLE_NR; j++) acc[i][j] += A[i * rs] * Bp[j];
        A += cs;           /* pointer steps, not p * MR: with -fwrapv (Python's flags) gcc cannot */
        Bp += PORTABLE_NR; /* prove p * MR + i never wraps and vectorizes the wrong loop */
    }
    for (int i = 0; i < PORTABLE_MR; i++)
        for (int j = 0; j < PORTABLE_NR; j++)
            C[i * ldc + j] = accumulate ? C[i * ldc + j] + acc[i][j] : acc[i][j];
}

UKERNELS(portable, , PORTABLE_MR)

#if LLAMA3NP_X86
/* AVX2 + FMA: 16 ymm registers of 8 floats. A 6 x 16 tile is 12 accumulators, plus 2 for the row
 * of B and 1 for the broadcast of A: 15 of the 16 registers, 12 FMAs per 2 loads + 6 broadcasts. */
#define AVX2_MR 6
#define AVX2_NR 16
__attribute__((target("avx2,fma"))) INLINE void avx2_tile(int kc, const float *A, long rs, long cs, const float *Bp,
                                                         float *C, long ldc, int accumulate) {
    __m256 c[AVX2_MR][2];
    /* every loop over i fully unrolled, so that c lives in registers only (a loop left rolled makes
     * gcc keep c in memory too, storing it on every step: half the speed) */
#pragma GCC unroll 6
    for (int i = 0; i < AVX2_MR; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int p = 0; p < kc; p++) {
        __m256 b0 = _mm256_load_ps(Bp), b1 = _mm256_load_ps(Bp + 8);
#pragma GCC unroll 6
        for (int i = 0; i < AVX2_MR; i++) {
            __m256 a = _mm256_broadcast_ss(A + i * rs);
            c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
        }
        A += cs;
        Bp += AVX2_NR;
    }
#pragma GCC unroll 6
    for (int i = 0; i < AVX2_MR; i++) {
        float *Ci = C + i * ldc;
        if (accumulate) {
            c[i][0] = _mm256_add_ps(c[i][0], _mm256_loadu_ps(Ci));
            c[i][1] = _mm256_add_ps(c[i][1], _mm256_loadu_ps(Ci + 8));
        }
        _mm256_storeu_ps(Ci, c[i][0]);
        _mm256_storeu_ps(Ci + 8, c[i][1]);
    }
}

UKERNELS(avx2, __attribute__((target("avx2,fma"))), AVX2_MR)
UKERNEL_LD(avx2, __attribute__((target("avx2,fma"))))

/* AVX-512: 32 zmm registers of 16 floats. An 8 x 32 tile is 16 accumulators + 2 for B + 1 for the
 * broadcast: 16 independent FMAs per step hide their 4-cycle latency, and 8 rows divide the 64-row
 * tiles of the attention kernel exactly (14 x 32 fills more registers but wastes 6 of 70 rows there,
 * and measured no faster on the 1024^3 product here). */
#define AVX512_MR 8
#define AVX512_NR 32
__attribute__((target("avx512f"))) INLINE void avx512_tile(int kc, const float *A, long rs, long cs, const float *Bp,
                                                          float *C, long ldc, int accumulate) {
    __m512 c[AVX512_MR][2];
#pragma GCC unroll 16
    for (int i = 0; i < AVX512_MR; i++) c[i][0] = c[i][1] = _mm512_setzero_ps(); /* unrolled: see AVX2 */
    for (int p = 0; p < kc; p++) {
        __m512 b0 = _mm512_load_ps(Bp), b1 = _mm512_load_ps(Bp + 16);
#pragma GCC unroll 16
        for (int i = 0; i < AVX512_MR; i++) {
            __m512 a = _mm512_set1_ps(A[i * rs]);
            c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
        }
        A += cs;
        Bp += AVX512_NR;
    }
#pragma GCC unroll 16
    for (int i = 0; i < AVX512_MR; i++) {
        float *Ci = C + i * ldc;
        if (accumulate) {
            c[i][0] = _mm512_add_ps(c[i][0], _mm512_loadu_ps(Ci));
            c[i][1] = _mm512_add_ps(c[i][1], _mm512_loadu_ps(Ci + 16));
        }
        _mm512_storeu_ps(Ci, c[i][0]);
        _mm512_storeu_ps(Ci + 16, c[i][1]);
    }
}

UKERNELS(avx512, __attribute__((target("avx512f"))), AVX512_MR)
UKERNEL_LD(avx512, __attribute__((target("avx512f"))))
#endif

#if LLAMA3NP_NEON
/* NEON (arm64): 32 registers of 4 floats. An 8 x 8 tile is 16 accumulators, plus 2 for the row of B
 * and 2 for the column of A: for a packed A sliver, its 8 values of column p are two plain loads and
 * each FMA takes its A value from a lane (fmla v.4s, v.4s, v.s[lane]), so no broadcasts at all:
 * 16 FMAs per 4 loads. 8 rows and 8 columns divide the attention kernel's 64-row, 64-key tiles. */
#define NEON_MR 8
#define NEON_NR 8
INLINE void neon_tile(int kc, const float *A, long rs, long cs, const float *Bp, float *C, long ldc, int accumulate) {
    float32x4_t c[NEON_MR][2];
    for (int i = 0; i < NEON_MR; i++) c[i][0] = c[i][1] = vdupq_n_f32(0.0f);
    for (int p = 0; p < kc; p++) {
        float32x4_t b0 = vld1q_f32(Bp), b1 = vld1q_f32(Bp + 4);
        if (rs == 1) { /* a packed sliver: column p of A is 8 consecutive floats */
            float32x4_t a0 = vld1q_f32(A), a1 = vld1q_f32(A + 4);
#define NEON_ROW(i, a, lane)                                   \
    c[i][0] = vfmaq_laneq_f32(c[i][0], b0, a, lane);           \
    c[i][1] = vfmaq_laneq_f32(c[i][1], b1, a, lane);
            NEON_ROW(0, a0, 0) NEON_ROW(1, a0, 1) NEON_ROW(2, a0, 2) NEON_ROW(3, a0, 3)
            NEON_ROW(4, a1, 0) NEON_ROW(5, a1, 1) NEON_ROW(6, a1, 2) NEON_ROW(7, a1, 3)
#undef NEON_ROW
        } else { /* a row-major tile: the column is strided, one value per row */
            for (int i = 0; i < NEON_MR; i++) {
                c[i][0] = vfmaq_n_f32(c[i][0], b0, A[i * rs]);
                c[i][1] = vfmaq_n_f32(c[i][1], b1, A[i * rs]);
            }
        }
        A += cs;
        Bp += NEON_NR;
    }
    for (int i = 0; i < NEON_MR; i++) {
        float *Ci = C + i * ldc;
        if (accumulate) {
            c[i][0] = vaddq_f32(c[i][0], vld1q_f32(Ci));
            c[i][1] = vaddq_f32(c[i][1], vld1q_f32(Ci + 4));
        }
        vst1q_f32(Ci, c[i][0]);
        vst1q_f32(Ci + 4, c[i][1]);
    }
}

UKERNELS(neon, , NEON_MR)
#endif

typedef struct {
    const char *name;
    int mr, nr;
    ukernel_fn kernel;      /* A packed */
    ukernel_fn kernel_rows; /* A a row-major tile with leading dimension GEMM_TILE_LD */
    ukernel_fn kernel_cols; /* A the transpose of such a tile: A's element (i, p) at A[p * GEMM_TILE_LD + i] */
    ukernel_ld_fn kernel_ld; /* A's rows read in place, any leading dimension (NULL: pack them) */
} isa_t;

/* indexed by the ISA numbers of llama3np_kernels.h; an entry this build or CPU cannot run is the
 * portable kernel's, and isa_supported() says it is not available */
#define PORTABLE_ENTRY \
    {"portable", PORTABLE_MR, PORTABLE_NR, ukernel_portable, ukernel_portable_rows, ukernel_portable_cols, NULL}
static const isa_t ISAS[N_ISAS] = {
    PORTABLE_ENTRY,
#if LLAMA3NP_X86
    {"avx2", AVX2_MR, AVX2_NR, ukernel_avx2, ukernel_avx2_rows, ukernel_avx2_cols, ukernel_avx2_ld},
    {"avx512", AVX512_MR, AVX512_NR, ukernel_avx512, ukernel_avx512_rows, ukernel_avx512_cols,
     ukernel_avx512_ld},
#else
    PORTABLE_ENTRY,
    PORTABLE_ENTRY,
#endif
#if LLAMA3NP_NEON
    {"neon", NEON_MR, NEON_NR, ukernel_neon, ukernel_neon_rows, ukernel_neon_cols, NULL},
#else
    PORTABLE_ENTRY,
#endif
};

/* ---------------------------------------------------------------------------------------------- */
/* Run-time choices: instruction set and thread count.                                             */

int isa_supported(int isa) {
    if (isa == 0) return 1;
#if LLAMA3NP_X86 && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (isa == 2) return __builtin_cpu_supports("avx512f");
    if (isa == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#if LLAMA3NP_NEON
    if (isa == 3) return 1;
#endif
    return 0;
}

static int best_isa(void) {
    static const int fastest_first[N_ISAS] = {2, 3, 1, 0};
    for (int i = 0; i < N_ISAS; i++)
        if (isa_supported(fastest_first[i])) return fastest_first[i];
    return 0;
}

static int g_isa = -1;  /* -1: not chosen yet */
static int g_num_threads = 1;

int select_isa(int isa) {
    int best = best_isa();
    g_isa = (isa < 0 || isa >= N_ISAS || !isa_supported(isa)) ? best : isa;
    return g_isa;
}

int current_isa(void) {
    if (g_isa < 0) select_isa(-1);
    return g_isa;
}

void set_num_threads(int n) { g_num_threads = n < 1 ? 1 : n; }
int get_num_threads(void) { return g_num_threads; }

/* ---------------------------------------------------------------------------------------------- */
/* Packing. Element (i, p) of op(A) is A[i*lda + p], or A[p*lda + i] when A is stored transposed.  */

#if LLAMA3NP_X86
/* dst[q * ds + r] = src[r * ld + q] for r, q < 8: eight rows of 8 floats in, eight columns out.
 * Packing a strided operand one float at a time costs a load and a store per value; this does 64
 * values in 8 loads, 24 shuffles and 8 stores (the unpack / shuffle / permute transpose). */
__attribute__((target("avx"))) static void transpose_8x8(const float *src, long ld, float *dst, long ds) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ld);
    for (int i = 0; i < 8; i += 2) { /* interleave row pairs: (r0[0] r1[0] r0[1] r1[1] | ...) */
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) { /* then pairs of pairs: 4 rows side by side per 128-bit lane */
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) { /* rows 0-3 from u[i], rows 4-7 from u[i + 4]: low lanes, then high */
        _mm256_storeu_ps(dst + i * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}
#endif

#if LLAMA3NP_X86
/* dst[q * 6 + r] = src[r * ld + q] for r < 6, q < 8: six rows of 8 floats in, eight columns of 6 out
 * (an AVX2 sliver: MR = 6). The 8 x 8 transpose above with two zero rows. Columns 0-6 are stored as
 * 8 floats each, in order, so each store's two zeros are overwritten by the next column; the last as
 * 4 + 2, so nothing past the 48 values is written. 9 stores instead of 16 (perf, AVX2, 1024^3: this
 * packing's share 4.5% -> 4.0%; what is left is mostly reading A's six rows from L3). */
__attribute__((target("avx"))) static void transpose_6x8(const float *src, long ld, float *dst) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 6; i++) r[i] = _mm256_loadu_ps(src + i * ld);
    r[6] = r[7] = _mm256_setzero_ps();
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    __m256 col[8];
    for (int i = 0; i < 4; i++) {
        col[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);     /* column i: rows 0-5, then two zeros */
        col[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
    for (int i = 0; i < 7; i++) _mm256_storeu_ps(dst + i * 6, col[i]);
    _mm_storeu_ps(dst + 42, _mm256_castps256_ps128(col[7]));                   /* rows 0-3 of column 7 */
    _mm_storel_pi((__m64 *)(dst + 46), _mm256_extractf128_ps(col[7], 1));       /* rows 4-5 */
}
#endif

/* whether transpose_8x8 can run here (packing only copies: the result is the same either way) */
#if LLAMA3NP_X86
static int fast_transpose(void) { return current_isa() == 1 || current_isa() == 2; }
#endif

/* rows i0..i0+mr of op(A), columns p0..p0+kc, into one sliver of MR rows (zero past mr) */
static void pack_a_sliver(int trans_a, const float *A, long lda, int i0, int mr, int p0, int kc, int MR,
                          float *dst) {
    int p = 0;
#if LLAMA3NP_X86
    /* A not transposed, a full sliver of 8 rows: 8 x 8 blocks of A transposed in registers */
    if (!trans_a && mr == 8 && MR == 8 && fast_transpose())
        for (; p + 8 <= kc; p += 8) transpose_8x8(A + (long)i0 * lda + p0 + p, lda, dst + (long)p * MR, MR);
    if (!trans_a && mr == 6 && MR == 6 && fast_transpose()) /* AVX2's slivers */
        for (; p + 8 <= kc; p += 8) transpose_6x8(A + (long)i0 * lda + p0 + p, lda, dst + (long)p * MR);
#endif
    /* A transposed, a full sliver: one fixed-size copy per p (a 32- or 24-byte move, not a loop over mr;
     * the attention kernel packs its transposed probability tiles this way, AVX2's MR = 6 included) */
    if (trans_a && mr == 8 && MR == 8)
        for (; p < kc; p++) memcpy(dst + (long)p * 8, A + (long)(p0 + p) * lda + i0, 8 * sizeof(float));
    if (trans_a && mr == 6 && MR == 6)
        for (; p < kc; p++) memcpy(dst + (long)p * 6, A + (long)(p0 + p) * lda + i0, 6 * sizeof(float));
    for (; p < kc; p++) {
        float *d = dst + (long)p * MR;
        if (trans_a) {
            const float *src = A + (long)(p0 + p) * lda + i0;  /* a row of the stored A^T: contiguous */
            for (int i = 0; i < mr; i++) d[i] = src[i];
        } else {
            const float *src = A + (long)i0 * lda + p0 + p;  /* a column of A: stride lda */
            for (int i = 0; i < mr; i++) d[i] = src[(long)i * lda];
        }
        for (int i = mr; i < MR; i++) d[i] = 0.0f;
    }
}

/* rows p0..p0+kc of op(B), columns j0..j0+nr, into one sliver of NR columns (zero past nr) */
static void pack_b_sliver(int trans_b, const float *B, long ldb, int p0, int kc, int j0, int nr, int NR,
                          float *dst) {
    if (trans_b) {
        /* column j of op(B) is row j0 + j of the stored B^T: read it along its length (sequential
         * reads the prefetcher follows), write it down the sliver with stride NR */
        int j = 0;
#if LLAMA3NP_X86
        /* 8 rows of B^T at a time, transposed in registers 8 x 8 (the last kc % 8 one by one) */
        if (fast_transpose())
            for (; j + 8 <= nr; j += 8) {
                const float *src = B + (long)(j0 + j) * ldb + p0;
                int p = 0;
                for (; p + 8 <= kc; p += 8) transpose_8x8(src + p, ldb, dst + (long)p * NR + j, NR);
                for (; p < kc; p++)
                    for (int r = 0; r < 8; r++) dst[(long)p * NR + j + r] = src[(long)r * ldb + p];
            }
#endif
        for (; j < nr; j++) {
            const float *src = B + (long)(j0 + j) * ldb + p0;
            for (int p = 0; p < kc; p++) dst[(long)p * NR + j] = src[p];
        }
        for (int p = 0; p < kc; p++)
            for (int j = nr; j < NR; j++) dst[(long)p * NR + j] = 0.0f;
        return;
    }
    /* a full sliver: one fixed-size copy per row (a loop of runtime length nr is slower) */
    if (nr == NR && (NR == 8 || NR == 16 || NR == 32)) {
        const float *src = B + (long)p0 * ldb + j0;
        if (NR == 16)
            for (int p = 0; p < kc; p++) memcpy(dst + (long)p * 16, src + (long)p * ldb, 16 * sizeof(float));
        else if (NR == 32)
            for (int p = 0; p < kc; p++) memcpy(dst + (long)p * 32, src + (long)p * ldb, 32 * sizeof(float));
        else
            for (int p = 0; p < kc; p++) memcpy(dst + (long)p * 8, src + (long)p * ldb, 8 * sizeof(float));
        return;
    }
    for (int p = 0; p < kc; p++) {
        float *d = dst + (long)p * NR;
        const float *src = B + (long)(p0 + p) * ldb + j0; /* a row of B: contiguous */
        for (int j = 0; j < nr; j++) d[j] = src[j];
        for (int j = nr; j < NR; j++) d[j] = 0.0f;
    }
}

/* The two strided cases, a whole block at a time: op(A) = A^T (a row of the stored A^T holds MR
 * values of every sliver) and op(B) = B (a row of B holds NR values of every sliver). Sliver by
 * sliver, the packing reads W values from each of kc rows far apart, then comes back to the same rows
 * for the next sliver. Here eight rows at a time are dealt out to every sliver: the eight row
 * segments stay in L1 while each sliver gets its 8 x W values as one contiguous run. (Dealing one
 * row at a time writes W values to every sliver, KC * W floats apart, which all fall in the same
 * few L1 sets and evict each other.) dW = dy^T x spent 20% of its time packing, sliver by sliver.
 * The packed values are the same either way. */
INLINE void copy_w(float *dst, const float *src, int w, int W) {
    /* fixed-size copies: a memcpy of run-time length is a call, one of 24 or 64 bytes a move or two */
    if (w == 6 && W == 6) memcpy(dst, src, 6 * sizeof(float));
    else if (w == 8 && W == 8) memcpy(dst, src, 8 * sizeof(float));
    else if (w == 16 && W == 16) memcpy(dst, src, 16 * sizeof(float));
    else if (w == 32 && W == 32) memcpy(dst, src, 32 * sizeof(float));
    else {
        for (int r = 0; r < w; r++) dst[r] = src[r];
        for (int r = w; r < W; r++) dst[r] = 0.0f; /* past the edge of the matrix */
    }
}

/* kc rows of n values (src, ld apart) into slivers of W: sliver j / W at dst + j * kc, row p of it at + p * W */
static void deal_rows(const float *src, long ld, int kc, int n, int W, float *dst) {
    for (int p0 = 0; p0 < kc; p0 += 8) {
        int pn = kc - p0 < 8 ? kc - p0 : 8;
        for (int j = 0; j < n; j += W) {
            int w = n - j < W ? n - j : W;
            float *d = dst + (long)j * kc + (long)p0 * W;
            for (int p = 0; p < pn; p++) copy_w(d + p * W, src + (long)(p0 + p) * ld + j, w, W);
        }
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* The macro-kernel: slivers [s0, s1) of A times a packed B block (kc x nc), into C. A is laid out as
 *   A_PACKED  packed slivers, MR * kc floats apart;
 *   A_TILE    a row-major tile with leading dimension GEMM_TILE_LD (attention.c's);
 *   A_TILE_T  the transpose of such a tile (attention.c's p^T and ds^T): row i of A is its column i;
 *   A_LD      row-major with leading dimension lda, read in place (isa->kernel_ld; full slivers only,
 *             as the kernel reads MR rows);
 * B's slivers are b_stride apart (kc * NR when packed for this call). */
enum { A_LD = A_TILE_T + 1 };

INLINE void run_kernel(const isa_t *isa, int a_layout, int kc, const float *a, long lda, const float *b, float *c,
                       long ldc, int accumulate) {
    if (a_layout == A_LD) isa->kernel_ld(kc, a, lda, b, c, ldc, accumulate);
    else (a_layout == A_TILE ? isa->kernel_rows : a_layout == A_TILE_T ? isa->kernel_cols : isa->kernel)(
        kc, a, b, c, ldc, accumulate);
}

static void macro_kernel(const isa_t *isa, int s0, int s1, int mc, int nc, int kc, const float *Ap,
                         const float *Bp, long b_stride, float *C, long ldc, int accumulate, int a_layout, long lda) {
    const int MR = isa->mr, NR = isa->nr;
    const long a_step = a_layout == A_LD     ? lda /* between rows of A */
                        : a_layout == A_TILE   ? GEMM_TILE_LD
                        : a_layout == A_TILE_T ? 1
                                               : kc;
    float edge[MAX_MR * MAX_NR] __attribute__((aligned(64)));
    for (int s = s0; s < s1; s++) {
        int ir = s * MR, mr = mc - ir < MR ? mc - ir : MR;
        for (int jr = 0; jr < nc; jr += NR) {
            int nr = nc - jr < NR ? nc - jr : NR;
            const float *a = Ap + (long)ir * a_step, *b = Bp + (jr / NR) * b_stride;
            float *c = C + (long)ir * ldc + jr;
            if (mr == MR && nr == NR) {
                run_kernel(isa, a_layout, kc, a, lda, b, c, ldc, accumulate);
            } else {
                /* a partial tile at the edge of C: compute the full tile aside, keep the valid part */
                run_kernel(isa, a_layout, kc, a, lda, b, edge, NR, 0);
                for (int i = 0; i < mr; i++)
                    for (int j = 0; j < nr; j++)
                        c[(long)i * ldc + j] = accumulate ? c[(long)i * ldc + j] + edge[i * NR + j] : edge[i * NR + j];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* The blocked loops. The work is cut into tiles of C of MC rows x NC columns; each thread takes    */
/* claims of `group` row tiles of one column block from a shared counter and computes each claim    */
/* alone, over the whole K: for every block of KC it packs the columns of B (KC x NC, into L2) once, */
/* then for each row tile packs its rows of A (MC x KC), or reads them in place (a_in_place), and   */
/* runs the micro-kernel over them.                                                                 */
/* Threads share nothing and never wait for each other, which matters on a busy machine: a thread   */
/* the OS has paused delays only its own claim. Sharing each packed B block between row tiles,     */
/* with transpose_8x8 in the packing, measured 0.94 -> 1.03x OpenBLAS for y = x @ w.T on 1 thread.  */

typedef struct {
    const isa_t *isa;
    int trans_a, trans_b, M, N, K;
    const float *A, *B;
    long lda, ldb, ldc;
    float *C;
    int accumulate;
    int mc_tile;     /* rows per tile, at most MC */
    int group;       /* row tiles per claim (one column block), that share each packed block of B */
    int a_in_place;  /* A's rows read where they are, not packed (see sgemm_team) */
    int nc;          /* columns per block (nc_block) */
    float *work;     /* per thread: a packed A block (MC x KC) then a packed B block (KC x NC) */
    int next_tile;   /* the shared claim counter */
} gemm_ctx;

/* floats of one thread's workspace, a multiple of 16 so every piece stays 64-byte aligned */
static long a_block_floats(void) { return (long)(MC + MAX_MR) * KC; }
static long thread_work_floats(void) { return a_block_floats() + (long)KC * NC_MAX; }

static void gemm_thread(void *arg, int tid, int nthreads, barrier_t *barrier) {
    (void)nthreads, (void)barrier;
    gemm_ctx *g = (gemm_ctx *)arg;
    const isa_t *isa = g->isa;
    const int MR = isa->mr, NR = isa->nr;
    float *Ap = g->work + (long)tid * thread_work_floats(), *Bp = Ap + a_block_floats();
    const int MT = g->mc_tile, G = g->group, n_row_tiles = (g->M + MT - 1) / MT;
    const int W = g->nc, n_groups = (n_row_tiles + G - 1) / G, n_claims = n_groups * ((g->N + W - 1) / W);
    for (;;) {
        int t = __atomic_fetch_add(&g->next_tile, 1, __ATOMIC_RELAXED);
        if (t >= n_claims) break;
        /* a claim: G row tiles of one column block. K blocks outside, row tiles inside, so each packed
         * block of B (in L2) serves all G row tiles before the next is packed. Every C[i, j] still sums
         * its K blocks in the same order, so the bits do not depend on G. */
        int t0 = (t % n_groups) * G, t1 = t0 + G < n_row_tiles ? t0 + G : n_row_tiles, jc = (t / n_groups) * W;
        int nc = g->N - jc < W ? g->N - jc : W;
        for (int pc = 0; pc < g->K; pc += KC) {
            int kc = g->K - pc < KC ? g->K - pc : KC;
            if (!g->trans_b) /* rows pc.. of B, columns jc.. */
                deal_rows(g->B + (long)pc * g->ldb + jc, g->ldb, kc, nc, NR, Bp);
            else
                for (int jr = 0; jr < nc; jr += NR) {
                    int nr = nc - jr < NR ? nc - jr : NR;
                    pack_b_sliver(1, g->B, g->ldb, pc, kc, jc + jr, nr, NR, Bp + (long)jr * kc);
                }
            for (int ic = t0 * MT; ic < t1 * MT && ic < g->M; ic += MT) {
                int mc = g->M - ic < MT ? g->M - ic : MT;
                int n_slivers = (mc + MR - 1) / MR;
                const float *A = g->trans_a ? g->A + ic : g->A + (long)ic * g->lda;
                float *Ct = g->C + (long)ic * g->ldc + jc;
                const int acc = g->accumulate || pc > 0; /* later K blocks add to what the first one wrote */
                if (g->a_in_place) {
                    /* full slivers read where they are; a last partial one packed (the kernel reads MR rows) */
                    int full = mc / MR, ir = full * MR;
                    macro_kernel(isa, 0, full, mc, nc, kc, A + pc, Bp, (long)kc * NR, Ct, g->ldc, acc, A_LD, g->lda);
                    if (ir < mc) {
                        pack_a_sliver(0, A, g->lda, ir, mc - ir, pc, kc, MR, Ap);
                        macro_kernel(isa, 0, 1, mc - ir, nc, kc, Ap, Bp, (long)kc * NR, Ct + (long)ir * g->ldc, g->ldc,
                                     acc, A_PACKED, 0);
                    }
                    continue;
                }
                if (g->trans_a) /* rows pc.. of the stored A^T, columns ic.. */
                    deal_rows(A + (long)pc * g->lda, g->lda, kc, mc, MR, Ap);
                else
                    for (int s = 0; s < n_slivers; s++) {
                        int mr = mc - s * MR < MR ? mc - s * MR : MR;
                        pack_a_sliver(0, A, g->lda, s * MR, mr, pc, kc, MR, Ap + (long)s * MR * kc);
                    }
                macro_kernel(isa, 0, n_slivers, mc, nc, kc, Ap, Bp, (long)kc * NR, Ct, g->ldc, acc, A_PACKED, 0);
            }
        }
    }
}

static void *aligned_floats(long n) {
    void *p = NULL;
    if (n < 16) n = 16;
    if (posix_memalign(&p, 64, (size_t)n * sizeof(float)) != 0) return NULL;
    return p;
}

/* One workspace kept between calls: a fresh multi-MiB malloc is a fresh mmap, and the kernel then
 * zeroes every page on first touch (in a training step of the `small` preset this removed 15,000 of
 * 136,000 page faults). Taken with
 * trylock, so a concurrent call (cffi releases the GIL) or a call in a forked child never waits:
 * it allocates its own instead. Returns NULL if the workspace is busy or cannot grow; on success
 * the caller holds g_workspace_lock until it is done. */
static pthread_mutex_t g_workspace_lock = PTHREAD_MUTEX_INITIALIZER;
static float *g_workspace = NULL;
static long g_workspace_floats = 0;

static float *cached_workspace(long need) {
    if (pthread_mutex_trylock(&g_workspace_lock) != 0) return NULL;
    if (g_workspace_floats < need) {
        free(g_workspace);
        g_workspace = aligned_floats(need);
        g_workspace_floats = g_workspace ? need : 0;
    }
    if (!g_workspace) {
        pthread_mutex_unlock(&g_workspace_lock);
        return NULL;
    }
    return g_workspace;
}

/* the packed path on a team of nthreads (the caller picked the count) */
static int sgemm_team(int nthreads, int trans_a, int trans_b, int M, int N, int K, const float *A, long lda,
                      const float *B, long ldb, float *C, long ldc, int accumulate) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        /* an empty sum: C = 0 (or C unchanged when accumulating) */
        if (!accumulate)
            for (int i = 0; i < M; i++) memset(C + (long)i * ldc, 0, (size_t)N * sizeof(float));
        return 0;
    }
    gemm_ctx g = {&ISAS[current_isa()], trans_a, trans_b, M, N, K, A, B, lda, ldb, ldc, C, accumulate,
                  MC, 1, 0, nc_block(), NULL, 0};
    /* A not transposed: a sliver's MR rows are read where they are (each row a sequential stream) rather
     * than packed, which saves copying A once per column block and K block, unless its rows are a
     * multiple of 4 KiB apart: then every row of a sliver falls in the same few L1 sets and they evict
     * each other (lda 1024, 4096, 8192 measured 2-3% slower than packing on AVX2). Packing or not, the
     * kernel sums the same products in the same order: the same bits. AVX2, 1 thread, the training
     * products of tiny and small (y = x w^T, dx = dy w), 7 interleaved rounds: +1-3%; AVX-512 tiny +1-7%. */
    g.a_in_place = !trans_a && g.isa->kernel_ld != NULL && lda % 1024 != 0;
    /* Every claim packs its own blocks of B, so claims cost packing (at ~0.4 ns a packed float against
     * 2 x rows FLOPs a float at ~100 GFLOP/s, about 28% of a claim of 72 rows, 4% of one of 528) and
     * buy balance: a thread the OS pauses leaves the rest of its share to the others. Two claims per
     * thread: against four, dW = dy^T x of the training steps (N = 256, K = 2048) measured 2-6% faster
     * at 2 threads, the other products the same. One thread has nothing to balance: one claim per
     * column block (the loops below then keep whole tiles and group them all), B packed once. */
    const int claims = nthreads == 1 ? 1 : 2 * nthreads;
    /* Row tiles: as few as MC allows, or, when they would give fewer claims than wanted, as many as the
     * claims need (but none under MIN_TILE rows); then all of one size, a multiple of MR (only the last
     * has a partial sliver). Halving MC until there were enough cut dW = dy^T x of `tiny`'s 768-wide layers
     * (768 rows) into 5 x 144 + 48, one thread doing 432 rows to the other's 336; 4 x 192 packs B fewer
     * times and splits evenly: 142-158 -> 168-172 GFLOP/s at 2 threads (AVX2, two interleaved runs; 256 rows,
     * 66 x 3 + 58 instead of 72 x 3 + 40: 124-131 -> 137). How rows are tiled changes no element's sum: the
     * same bits. */
    const int n_col_tiles = (N + g.nc - 1) / g.nc, MR = g.isa->mr;
    const int want = (claims + n_col_tiles - 1) / n_col_tiles, most = (M + MIN_TILE - 1) / MIN_TILE;
    int rows = (M + MC - 1) / MC;
    if (rows < want) rows = want < most ? want : most;
    g.mc_tile = ((M + rows - 1) / rows + MR - 1) / MR * MR;
    /* row tiles taken together (sharing each packed B block), as many as still leave the claims wanted:
     * B is then packed n_row_tiles / group times instead of n_row_tiles times */
    const int n_row_tiles = (M + g.mc_tile - 1) / g.mc_tile;
    while (g.group < n_row_tiles && (n_row_tiles + 2 * g.group - 1) / (2 * g.group) * n_col_tiles >= claims)
        g.group *= 2;
    int n_tiles = (n_row_tiles + g.group - 1) / g.group * n_col_tiles;
    if (nthreads > n_tiles) nthreads = n_tiles;
    long need = (long)nthreads * thread_work_floats();
    float *owned = NULL;
    g.work = cached_workspace(need);
    int cached = g.work != NULL;
    if (!cached) {
        owned = aligned_floats(need);
        if (!owned) return -1;
        g.work = owned;
    }
    parallel_run(nthreads, gemm_thread, &g);
    if (cached) pthread_mutex_unlock(&g_workspace_lock);
    free(owned);
    return 0;
}


/* ---------------------------------------------------------------------------------------------- */
/* A few rows of A (a decode step: one token per sequence). Packing B would cost as much as using it */
/* once, so B is streamed in its own layout. With B stored transposed (the model's x @ w.T, w (N, K) */
/* row-major) each C[i, n] is a dot product of two contiguous rows; otherwise each row of C is a sum */
/* of rows of B scaled by A[i, p]. Threads take chunks of columns of C.                              */

#define SMALL_M 16   /* up to this many rows of A streaming beats packing (measured, M = 1..32, K = N = 2048) */
#define SMALL_CHUNK 256 /* columns of C per task (rows of the stored B^T) */
#define MIN_CHUNK 64     /* ... at least, when several threads share a product */
/* of B, for each thread of a product of 1-3 rows of A: 2 threads on 256 KB were 1.09-1.19x one (from L3)
 * and 1.26-1.39x (from memory), on 128 KB 0.84-0.92x and 0.92-1.23x (Zen 4, x @ w.T for w (256, 256),
 * (128, 512), (128, 256), (64, 512)) */
#define GEMV_BYTES_PER_THREAD 131072.0
#define STREAMS 8    /* rows of B^T the GEMV kernels read at once, far apart (see below) */
#define STREAMS_M 4  /* ... for fewer rows of A than this (memory-bound); for more, ROWS adjacent ones, */
#define ROWS 4       /* which stay in L1 while every row of A reads them (eight measured slower at M = 16) */

/* the vector helpers (gemm.h's vec_ops_t), once per instruction set */
#define VEC_SUFFIX portable
#define VEC_TARGET
#include "vec_body.h"
#if LLAMA3NP_X86
#define VEC_SUFFIX avx2
#define VEC_TARGET __attribute__((target("avx2,fma")))
#include "vec_body.h"
#define VEC_SUFFIX avx512
#define VEC_TARGET __attribute__((target("avx512f")))
#include "vec_body.h"
#endif

const vec_ops_t *vec_ops(int isa) {
#if LLAMA3NP_X86
    if (isa == 1) return &VEC_OPS_avx2;
    if (isa == 2) return &VEC_OPS_avx512;
#endif
    (void)isa;
    return &VEC_OPS_portable; /* and NEON: the arm64 baseline vectorizes with NEON */
}

/* GEMV micro-kernels for B stored transposed (the model's x @ w.T, w (N, K) row-major). In a decode
 * step every row of w is used once, so the speed is set by how fast w streams in from memory:
 *   - STREAMS rows are read at once, and they are far apart: rows r, r + gap, ..., r + 7 gap of a
 *     chunk of rows (gap = chunk / 8, 64 KB for dim 512). Each of the eight is a sequential stream that
 *     the hardware prefetchers follow on its own, so eight streams of cache misses are in flight
 *     instead of one. On a Xeon (4 KB pages) the weights of a `small` decode step came in at 15-17
 *     GB/s this way, 10 GB/s reading one row after the other and 10-12 interleaving four ADJACENT
 *     rows (2 KB apart: one stream that the prefetcher sees jumping back and forth; on a Zen 4 that
 *     measured 2.3x slower than one row at a time).
 *   - one accumulator per row, eight rows at once: eight independent sums keep the FMA units busy
 *     (an FMA waits ~4 cycles for its previous sum, and two can start per cycle), and x is loaded
 *     once for eight rows of w. (AVX-512 with four accumulators per row, four rows at once, read
 *     14-15 GB/s here; eight rows of one accumulator, 16-17.)
 * Every row's sum has the same order, lanes and reduction whichever group it was computed in (eight
 * rows far apart, the last rows of a chunk one by one, four rows of x at once): a row's bits never
 * depend on the thread count, the chunking or the other rows of x. */
typedef void (*dot_rows_fn)(const float *x, const float *w, long ldw, long gap, int n, int K, float *out);
/* out[s] = x . w_s for s < n <= STREAMS, row w_s = w + s * gap * ldw */

/* portable: the compiler-vectorized dot product, one row at a time */
static void dot_rows_portable(const float *x, const float *w, long ldw, long gap, int n, int K, float *out) {
    for (int s = 0; s < n; s++) out[s] = VEC_OPS_portable.dot(x, w + s * gap * ldw, K);
}

#if LLAMA3NP_X86
/* the 8 lanes of v added pairwise, always in the same order */
__attribute__((target("avx2,fma"))) INLINE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* S rows at once (S a constant after inlining: the accumulators stay in registers), `step` floats apart */
__attribute__((target("avx2,fma"))) INLINE void avx2_dots(const float *x, const float *w, long step, int S, int K,
                                                          float *out) {
    __m256 c[STREAMS];
#pragma GCC unroll 8
    for (int s = 0; s < S; s++) c[s] = _mm256_setzero_ps();
    int p = 0;
    for (; p + 8 <= K; p += 8) {
        __m256 xp = _mm256_loadu_ps(x + p);
#pragma GCC unroll 8
        for (int s = 0; s < S; s++) c[s] = _mm256_fmadd_ps(xp, _mm256_loadu_ps(w + s * step + p), c[s]);
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; s++) {
        float sum = hsum_avx2(c[s]);
        for (int q = p; q < K; q++) sum = fmaf(x[q], w[s * step + q], sum); /* the last K % 8 */
        out[s] = sum;
    }
}

/* The row driver of one instruction set, compiled under its own target so that each ISA##_dots call
 * inlines with S a constant (its accumulators in registers): eight far-apart rows at once, else four,
 * then one by one. */
#define DOT_ROWS_DRIVER(ISA, TARGET)                                                                     \
    __attribute__((target(TARGET))) static void dot_rows_##ISA(const float *x, const float *w, long ldw, \
                                                               long gap, int n, int K, float *out) {    \
        if (n == STREAMS) {                                                                              \
            ISA##_dots(x, w, gap * ldw, STREAMS, K, out);                                                \
            return;                                                                                      \
        }                                                                                                \
        int s = 0;                                                                                       \
        for (; s + 4 <= n; s += 4) ISA##_dots(x, w + s * gap * ldw, gap * ldw, 4, K, out + s);           \
        for (; s < n; s++) ISA##_dots(x, w + s * gap * ldw, 0, 1, K, out + s);                           \
    }

DOT_ROWS_DRIVER(avx2, "avx2,fma")

/* AVX-512: the same with 16 lanes, eight rows at once (8 of the 32 zmm registers); the last K % 16
 * floats by a masked load, which reads only the lanes it keeps. */
__attribute__((target("avx512f"))) INLINE void avx512_dots(const float *x, const float *w, long step, int S, int K,
                                                           float *out) {
    __m512 c[STREAMS];
#pragma GCC unroll 8
    for (int s = 0; s < S; s++) c[s] = _mm512_setzero_ps();
    for (int p = 0; p < K; p += 16) {
        __mmask16 m = K - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - p)) - 1);
        __m512 xp = _mm512_maskz_loadu_ps(m, x + p);
#pragma GCC unroll 8
        for (int s = 0; s < S; s++) c[s] = _mm512_fmadd_ps(xp, _mm512_maskz_loadu_ps(m, w + s * step + p), c[s]);
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; s++) out[s] = _mm512_reduce_add_ps(c[s]);
}

DOT_ROWS_DRIVER(avx512, "avx512f")

/* avx512_dots with each row's 16 lanes in two ymm registers (lanes 0-7, 8-15) instead of one zmm: the same
 * FMA on every lane, the tail's masked lanes included, then the same reduction of the 16: the same bits.
 * AVX-512VL gives the 16 ymm accumulators plus x their 32 registers. */
__attribute__((target("avx512f,avx512vl,fma"))) INLINE void avx512vl_dots(const float *x, const float *w, long step,
                                                                      int S, int K, float *out) {
    __m256 lo[STREAMS], hi[STREAMS];
#pragma GCC unroll 8
    for (int s = 0; s < S; s++) lo[s] = hi[s] = _mm256_setzero_ps();
    int p = 0;
    for (; p + 16 <= K; p += 16) {
        __m256 x0 = _mm256_loadu_ps(x + p), x1 = _mm256_loadu_ps(x + p + 8);
#pragma GCC unroll 8
        for (int s = 0; s < S; s++) {
            lo[s] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + s * step + p), lo[s]);
            hi[s] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w + s * step + p + 8), hi[s]);
        }
    }
    if (p < K) {
        int n = K - p;
        __mmask8 m0 = (__mmask8)(n >= 8 ? 0xFF : (1u << n) - 1), m1 = (__mmask8)(n > 8 ? (1u << (n - 8)) - 1 : 0);
        __m256 x0 = _mm256_maskz_loadu_ps(m0, x + p), x1 = _mm256_maskz_loadu_ps(m1, x + p + 8);
#pragma GCC unroll 8
        for (int s = 0; s < S; s++) {
            lo[s] = _mm256_fmadd_ps(x0, _mm256_maskz_loadu_ps(m0, w + s * step + p), lo[s]);
            hi[s] = _mm256_fmadd_ps(x1, _mm256_maskz_loadu_ps(m1, w + s * step + p + 8), hi[s]);
        }
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; s++)
        out[s] = _mm512_reduce_add_ps(_mm512_castpd_ps(
            _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo[s])), _mm256_castps_pd(hi[s]), 1)));
}

DOT_ROWS_DRIVER(avx512vl, "avx512f,avx512vl,fma")

/* Four rows of x at once (a prefill of several tokens): out[i * STREAMS + s] = x_i . w_s, x_i = x + i * ldx.
 * Each load of w feeds four FMAs instead of one, so the loads no longer limit the speed. Four rows of w
 * at a time (16 accumulators), each sum exactly as avx512_dots makes it, so a token's result has the
 * same bits alone or in a batch. (AVX-512 only: AVX2 has 16 registers.) */
__attribute__((target("avx512f"))) INLINE void avx512_dots_x4(const float *x, long ldx, const float *w, long step,
                                                              int S, int K, float *out) {
    __m512 c[4][4];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) c[i / 4][i % 4] = _mm512_setzero_ps();
    for (int p = 0; p < K; p += 16) {
        __mmask16 m = K - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - p)) - 1);
#pragma GCC unroll 4
        for (int s = 0; s < S; s++) {
            __m512 ws = _mm512_maskz_loadu_ps(m, w + s * step + p);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) c[i][s] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i * ldx + p), ws, c[i][s]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
        for (int s = 0; s < S; s++) out[i * STREAMS + s] = _mm512_reduce_add_ps(c[i][s]);
}

__attribute__((target("avx512f")))
static void dot_rows_x4_avx512(const float *x, long ldx, const float *w, long ldw, long gap, int n, int K, float *out) {
    int s = 0;
    for (; s + 4 <= n; s += 4) avx512_dots_x4(x, ldx, w + s * gap * ldw, gap * ldw, 4, K, out + s);
    for (; s < n; s++) avx512_dots_x4(x, ldx, w + s * gap * ldw, 0, 1, K, out + s);
}
#endif

/* The GEMV kernel of an instruction set: on AVX-512 the ymm form when the CPU has AVX-512VL (the same bits;
 * measured on a Zen 4, 1 thread, x @ w.T from memory, medians of 9 interleaved rounds: w (768, 512) 22.2-24.7 ->
 * 25.2-25.9 GB/s, (1536, 512) 24.7-26.2 -> 26.0-27.2, (512, 1536) 25.5-25.7 -> 26.6-26.8, (8192, 512) the same). */
static dot_rows_fn dot_rows_for(int isa);

typedef void (*dot_rows_x4_fn)(const float *x, long ldx, const float *w, long ldw, long gap, int n, int K, float *out);
/* NULL: that instruction set computes one row of x at a time */
static const dot_rows_x4_fn DOT_ROWS_X4[N_ISAS] = {
    NULL,
#if LLAMA3NP_X86
    NULL, dot_rows_x4_avx512,
#else
    NULL, NULL,
#endif
    NULL,
};

/* NEON: the compiler-vectorized dot product (4 lanes), as the portable path */
static const dot_rows_fn DOT_ROWS[N_ISAS] = {
    dot_rows_portable,
#if LLAMA3NP_X86
    dot_rows_avx2, dot_rows_avx512,
#else
    dot_rows_portable, dot_rows_portable,
#endif
    dot_rows_portable,
};

static dot_rows_fn dot_rows_for(int isa) {
#if LLAMA3NP_X86 && (defined(__GNUC__) || defined(__clang__))
    if (isa == 2) {
        static int vl = -1; /* threads that race here all store the same value */
        int v = __atomic_load_n(&vl, __ATOMIC_RELAXED);
        if (v < 0) {
            __builtin_cpu_init();
            v = __builtin_cpu_supports("avx512vl") ? 1 : 0;
            __atomic_store_n(&vl, v, __ATOMIC_RELAXED);
        }
        if (v) return dot_rows_avx512vl;
    }
#endif
    return DOT_ROWS[isa];
}

typedef struct {
    int trans_b, M, N, K, accumulate;
    const float *A; /* op(A) (M, K), rows contiguous, lda apart */
    long lda;
    const float *B;
    long ldb, ldc;
    float *C;
    dot_rows_fn dot_rows;
    dot_rows_x4_fn dot_rows_x4;
    const vec_ops_t *vec;
    int chunk; /* columns of C per task */
    int next_chunk;
} small_m_ctx;

/* C[i, n + s * gap] (+)= v[i * STREAMS + s] for the rows i of A and the nb columns s */
static void scatter_rows(const small_m_ctx *g, int i0, int m, int n, long gap, int nb, const float *v) {
    for (int i = 0; i < m; i++) {
        float *c = g->C + (long)(i0 + i) * g->ldc + n;
        for (int s = 0; s < nb; s++) c[s * gap] = g->accumulate ? c[s * gap] + v[i * STREAMS + s] : v[i * STREAMS + s];
    }
}

/* Columns n, n + gap, ..., of C (nb of them) for every row of A: the nb rows of B^T they need are read
 * by every row of A while they are in L1 */
static void small_m_columns(const small_m_ctx *g, int n, long gap, int nb) {
    const float *b = g->B + (long)n * g->ldb; /* row n of the stored B^T */
    int i = 0;
    if (g->dot_rows_x4)
        for (; i + 4 <= g->M; i += 4) {
            float v[4 * STREAMS];
            g->dot_rows_x4(g->A + (long)i * g->lda, g->lda, b, g->ldb, gap, nb, g->K, v);
            scatter_rows(g, i, 4, n, gap, nb, v);
        }
    for (; i < g->M; i++) {
        float v[STREAMS];
        g->dot_rows(g->A + (long)i * g->lda, b, g->ldb, gap, nb, g->K, v);
        scatter_rows(g, i, 1, n, gap, nb, v);
    }
}

static void small_m_thread(void *arg, int tid, int nthreads, barrier_t *barrier) {
    (void)tid, (void)nthreads, (void)barrier;
    small_m_ctx *g = (small_m_ctx *)arg;
    const int K = g->K;
    for (;;) {
        int n0 = __atomic_fetch_add(&g->next_chunk, 1, __ATOMIC_RELAXED) * g->chunk;
        if (n0 >= g->N) break;
        int n1 = n0 + g->chunk < g->N ? n0 + g->chunk : g->N;
        if (g->trans_b) {
            if (g->M < STREAMS_M) {
                /* the chunk's rows of B^T as STREAMS streams: rows r, r + gap, ..., r + 7 gap for r < gap,
                 * then the last (n1 - n0) % STREAMS rows side by side */
                int gap = (n1 - n0) / STREAMS, rest = (n1 - n0) - gap * STREAMS;
                for (int r = 0; r < gap; r++) small_m_columns(g, n0 + r, gap, STREAMS);
                if (rest) small_m_columns(g, n0 + gap * STREAMS, 1, rest);
            } else {
                /* enough rows of A to be bound by the FMAs rather than by memory: adjacent rows of B^T,
                 * whose lines do not compete for the same L1 sets while every row of A reads them */
                for (int n = n0; n < n1; n += ROWS) small_m_columns(g, n, 1, n1 - n < ROWS ? n1 - n : ROWS);
            }
        } else {
            if (!g->accumulate)
                for (int i = 0; i < g->M; i++) memset(g->C + (long)i * g->ldc + n0, 0, (size_t)(n1 - n0) * sizeof(float));
            int p = 0;
            for (; p + 4 <= K; p += 4) {
                const float *b = g->B + (long)p * g->ldb + n0;
                for (int i = 0; i < g->M; i++)
                    g->vec->axpy4(g->C + (long)i * g->ldc + n0, g->A + (long)i * g->lda + p, b, b + g->ldb,
                              b + 2 * g->ldb, b + 3 * g->ldb, n1 - n0);
            }
            for (; p < K; p++)
                for (int i = 0; i < g->M; i++)
                    g->vec->axpy(g->C + (long)i * g->ldc + n0, g->A[(long)i * g->lda + p], g->B + (long)p * g->ldb + n0,
                             n1 - n0);
        }
    }
}

static int sgemm_small_m(int nthreads, int trans_a, int trans_b, int M, int N, int K, const float *A, long lda,
                         const float *B, long ldb, float *C, long ldc, int accumulate) {
    /* rows of A are read in place; a transposed A (columns contiguous) is copied to rows first */
    float *a = NULL;
    if (trans_a) {
        a = malloc((size_t)M * K * sizeof(float) + 1);
        if (!a) return -1;
        for (int i = 0; i < M; i++)
            for (int p = 0; p < K; p++) a[(long)i * K + p] = A[(long)p * lda + i];
    }
    const int isa = current_isa();
    small_m_ctx g = {trans_b, M, N, K, accumulate, a ? a : A, a ? K : lda, B, ldb, ldc, C, dot_rows_for(isa),
                     DOT_ROWS_X4[isa], vec_ops(isa), SMALL_CHUNK, 0};
    if (nthreads > 1) {
        /* at least two chunks per thread, so that a thread that starts late finds work to share, and the
         * caller is never left waiting long for one that took the last (rows of a chunk a multiple of
         * STREAMS, at least MIN_CHUNK) */
        int c = (N + 2 * nthreads - 1) / (2 * nthreads);
        c = (c + STREAMS - 1) / STREAMS * STREAMS;
        g.chunk = c < MIN_CHUNK ? MIN_CHUNK : (c < SMALL_CHUNK ? c : SMALL_CHUNK);
    }
    /* the chunks are taken from a shared counter, so the caller can do them all: a helper thread that
     * has not started when it is done is not waited for (a busy machine may give it a core only
     * milliseconds later, 20-100x the GEMV) */
    parallel_run_helpers(nthreads, small_m_thread, &g);
    free(a);
    return 0;
}

int sgemm(int trans_a, int trans_b, int M, int N, int K, const float *A, long lda, const float *B, long ldb,
          float *C, long ldc, int accumulate) {
    int nthreads = g_num_threads;
    if (M < STREAMS_M && N > 0 && K > 0) {
        /* 1-3 rows of A (a decode step): each value of B is used at most 3 times, so the product is bound
         * by reading B, and a thread is worth it when it has enough of B to read: a helper spinning in
         * the pool starts within a microsecond, and one that has not started by the end is not waited
         * for (sgemm_small_m) */
        while (nthreads > 1 && (double)N * K * sizeof(float) < GEMV_BYTES_PER_THREAD * nthreads) nthreads--;
        return sgemm_small_m(nthreads, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    }
    /* waking a sleeping worker costs ~10-50 us: only worth it above ~4 MFLOP of work per extra thread */
    double flops = 2.0 * M * N * K;
    while (nthreads > 1 && flops < 4e6 * nthreads) nthreads--;
    if (M <= SMALL_M && N > 0 && K > 0)
        return sgemm_small_m(nthreads, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return sgemm_team(nthreads, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

/* ---------------------------------------------------------------------------------------------- */
/* Packed operands for other kernels (attention.c packs q, k, v once and reuses them per tile).     */

int gemm_nr(int isa) { return ISAS[isa].nr; }
int gemm_mr(int isa) { return ISAS[isa].mr; }

/* The micro-kernel alone (kernels.microkernel_rate): the packed kernel of isa run iters times on one A
 * sliver and one B sliver, always the same ones, so they stay in L1 and nothing is packed or fetched
 * from memory while it runs. Its rate beside the FMA peak (peak.c) splits a GEMM's distance from the
 * peak in two: the kernel's own instruction mix (loads, broadcasts, the C tile's loads and stores),
 * and everything around it (packing, caches, the edges of C). */
double microkernel_burst(int isa, int kc, long iters, const float *A, const float *B, float *C) {
    if (!isa_supported(isa) || kc < 1 || iters < 1) return 0.0;
    const isa_t *k = &ISAS[isa];
    float *Ap = aligned_floats((long)k->mr * kc), *Bp = aligned_floats((long)kc * k->nr);
    double flops = -1.0; /* out of memory */
    if (Ap && Bp) {
        gemm_pack_a(isa, 0, A, kc, k->mr, kc, Ap);
        gemm_pack_b(isa, 0, B, k->nr, kc, k->nr, Bp);
        for (long i = 0; i < iters; i++) k->kernel(kc, Ap, Bp, C, k->nr, 1); /* C += A B: each call needs the last */
        flops = 2.0 * k->mr * k->nr * (double)kc * (double)iters;
    }
    free(Ap);
    free(Bp);
    return flops;
}

long gemm_packed_a_floats(int isa, int m, int k) {
    int MR = ISAS[isa].mr;
    return (long)(m + MR - 1) / MR * MR * k;
}

long gemm_packed_b_floats(int isa, int k, int n) {
    int NR = ISAS[isa].nr;
    return (long)(n + NR - 1) / NR * NR * k;
}

void gemm_pack_a(int isa, int trans, const float *A, long lda, int m, int k, float *Ap) {
    int MR = ISAS[isa].mr;
    for (int i = 0; i < m; i += MR)
        pack_a_sliver(trans, A, lda, i, m - i < MR ? m - i : MR, 0, k, MR, Ap + (long)i * k);
}

void gemm_pack_b(int isa, int trans, const float *B, long ldb, int k, int n, float *Bp) {
    int NR = ISAS[isa].nr;
    for (int j = 0; j < n; j += NR)
        pack_b_sliver(trans, B, ldb, 0, k, j, n - j < NR ? n - j : NR, NR, Bp + (long)j * k);
}

void gemm_packed(int isa, int m, int n, int k, const float *Ap, const float *Bp, long b_stride, float *C, long ldc,
                 int accumulate) {
    const isa_t *I = &ISAS[isa];
    if (m <= 0 || n <= 0) return;
    macro_kernel(I, 0, (m + I->mr - 1) / I->mr, m, n, k, Ap, Bp, b_stride, C, ldc, accumulate, A_PACKED, 0);
}

void gemm_rowmajor_a(int isa, int m, int n, int k, const float *A, const float *Bp, long b_stride, float *C,
                     long ldc, int accumulate) {
    const isa_t *I = &ISAS[isa];
    if (m <= 0 || n <= 0) return;
    macro_kernel(I, 0, (m + I->mr - 1) / I->mr, m, n, k, A, Bp, b_stride, C, ldc, accumulate, A_TILE, 0);
}

void gemm_tile_transposed_a(int isa, int m, int n, int k, const float *A, const float *Bp, long b_stride, float *C,
                            long ldc, int accumulate) {
    const isa_t *I = &ISAS[isa];
    if (m <= 0 || n <= 0) return;
    macro_kernel(I, 0, (m + I->mr - 1) / I->mr, m, n, k, A, Bp, b_stride, C, ldc, accumulate, A_TILE_T, 0);
}

void gemm_sliver(int isa, int a_layout, int s, int m, int n, int k, int p0, int p1, const float *A, const float *Bp,
                 long b_stride, float *C, long ldc, int accumulate) {
    const isa_t *I = &ISAS[isa];
    const int MR = I->mr, ir = s * MR;
    if (n <= 0 || p1 <= p0 || ir >= m) return;
    if (a_layout != A_PACKED) /* a tile read in place: column p0 of row ir at A + ir * GEMM_TILE_LD + p0, or of
                               * its transpose at A + p0 * GEMM_TILE_LD + ir (macro_kernel adds the ir part) */
        macro_kernel(I, s, s + 1, m, n, p1 - p0, A + (a_layout == A_TILE ? p0 : (long)p0 * GEMM_TILE_LD),
                     Bp + (long)p0 * I->nr, b_stride, C, ldc, accumulate, a_layout, 0);
    else /* sliver s of a packed A starts at A + ir * k, its column p at + p * MR */
        macro_kernel(I, 0, 1, m - ir, n, p1 - p0, A + (long)ir * k + (long)p0 * MR, Bp + (long)p0 * I->nr, b_stride,
                     C + (long)ir * ldc, ldc, accumulate, A_PACKED, 0);
}

/* ---------------------------------------------------------------------------------------------- */
/* Teaching kernels (notebooks/02_kernels): where the blocked SIMD kernel starts from.              */

/* The textbook loop: for every C[i, j] a dot product down a column of B (stride N: a cache miss
 * per step once B is larger than the cache). */
void naive_sgemm(int M, int N, int K, const float *A, const float *B, float *C) {
    /* BEGIN SOLUTION ex18 */
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float acc = 0.0f;
            for (int p = 0; p < K; p++) acc += A[(long)i * K + p] * B[(long)p * N + j];
            C[(long)i * N + j] = acc;
        }
    /* END SOLUTION */
}

/* Loops reordered (i, p, j: B and C are read along rows) and tiled so a 64 x 256 block of B stays
 * in cache while every row of A uses it. The compiler vectorizes the j loop; no packing. */
void blocked_sgemm(int M, int N, int K, const float *A, const float *B, float *C) {
    const int TP = 64, TJ = 256;
    memset(C, 0, (size_t)M * N * sizeof(float));
    for (int p0 = 0; p0 < K; p0 += TP)
        for (int j0 = 0; j0 < N; j0 += TJ) {
            int p1 = p0 + TP < K ? p0 + TP : K, j1 = j0 + TJ < N ? j0 + TJ : N;
            for (int i = 0; i < M; i++) {
                float *c = C + (long)i * N;
                for (int p = p0; p < p1; p++) {
                    float a = A[(long)i * K + p];
                    const float *b = B + (long)p * N;
                    for (int j = j0; j < j1; j++) c[j] += a * b[j];
                }
            }
        }
}
