/* Fused causal grouped-query attention, forward and backward, in the FlashAttention manner.
 *
 *   out = softmax(q k^T / sqrt(hd) + mask) v         q (B, H, T, hd), k and v (B, KV, S, hd)
 *
 * Query head h reads kv head h / (H / KV) (Meta's repeat_kv, without the copy). The T queries are the
 * last T of the S positions: query i sits at position S - T + i and sees keys j <= S - T + i, so a
 * decode step against a KV cache (T = 1) is the same code as a full forward (S = T).
 *
 * Forward: for a block of BR queries, walk over blocks of BC keys, keeping for each query row the
 * running max m and running sum l of exp(score - m) (the "online softmax"): when a new block raises
 * the max from m to m', everything accumulated so far is multiplied by exp(m - m'). At the end
 * out = acc / l and lse = m + log(l). The T x S score matrix never exists; each thread holds one
 * BR x BC tile.
 * Backward: recompute each tile's probabilities from lse (p = exp(score - lse)), then
 *   dv += p^T dout,  dp = dout v^T,  ds = p * (dp - D) / sqrt(hd) with D = rowsum(dout * out),
 *   dq += ds k,      dk += ds^T q.
 * The products are small matrix multiplies done by the packed SIMD micro-kernel of gemm.c. Operands
 * used by many tiles (k and v of a kv head, q and dout of a query head) are packed once into the
 * micro-kernel's layout. The probability tiles are read in place by the micro-kernel, as the left
 * operand (p v, ds k) and as its transpose (p^T dout, ds^T q: a kernel variant whose A steps along the
 * tile's rows; packing them instead cost 4-7% of the backward, measured: tiny's shape AVX2 10.84 ->
 * 10.13 ms, small's 33.0 -> 31.8, 1 thread).
 * Decode (T < ROWS_MAX_T): the forward walks the keys row by row instead (forward_rows), since
 * packing k and v for one query would cost as much as the attention itself.
 *
 * Document masks (kv_start, optional, (B, T) int32): query i of row b sees only keys
 * j >= kv_start[b, i] (capped at the query's own position under the causal mask, so no row is empty):
 * several documents packed in one row, or the pad positions of a left-padded row in a KV cache. Key
 * tiles wholly before every query of a block are skipped (packed rows cost less than one long
 * document); inside a tile, masked scores get probability 0 exactly, so a document's results never
 * depend on the values of another's keys and values.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "llama3np_kernels.h"
#include "parallel.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LLAMA3NP_NO_SIMD)
#define ATTN_X86 1
#include <immintrin.h>
#endif

#include "exp_neg.h"

#define BR 64 /* query rows per tile */
#define BC 64 /* keys per tile, and the leading dimension of every score tile */
#if BC != GEMM_TILE_LD
#error "score tiles are multiplied in place by gemm_rowmajor_a, which needs their leading dimension"
#endif
#define TILE_ROWS (BR + 8) /* gemm_rowmajor_a may read up to 7 rows past the last one (zeros), and
                            * gemm_tile_transposed_a up to 7 columns past a row's end (the next row's) */

/* ---------------------------------------------------------------------------------------------- */
/* exp of a row of scores (exp_neg.h), a loop the compiler vectorizes. Inputs are <= ~0 here (scores
 * minus their max or their lse). */
VECTOR_CLONES
static void exp_inplace(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = exp_neg(x[i]);
}

/* scale a row and return its max (lanes of 16 so the compiler can vectorize the reduction) */
VECTOR_CLONES
static float scale_and_max(float *s, int n, float scale, float init) {
    float lane[16];
    for (int k = 0; k < 16; k++) lane[k] = init;
    int c = 0;
    for (; c + 16 <= n; c += 16)
        for (int k = 0; k < 16; k++) {
            float x = s[c + k] * scale;
            s[c + k] = x;
            lane[k] = x > lane[k] ? x : lane[k];
        }
    for (; c < n; c++) {
        s[c] *= scale;
        lane[0] = s[c] > lane[0] ? s[c] : lane[0];
    }
    float mx = lane[0];
    for (int k = 1; k < 16; k++) mx = lane[k] > mx ? lane[k] : mx;
    return mx;
}

/* s = exp(s * a - b) in place, and the sum of the results (lanes of 16, as above) */
VECTOR_CLONES
static float exp_affine_sum(float *s, int n, float a, float b) {
    for (int c = 0; c < n; c++) s[c] = s[c] * a - b;
    exp_inplace(s, n);
    float lane[16] = {0};
    int c = 0;
    for (; c + 16 <= n; c += 16)
        for (int k = 0; k < 16; k++) lane[k] += s[c + k];
    for (; c < n; c++) lane[0] += s[c];
    float sum = 0.0f;
    for (int k = 0; k < 16; k++) sum += lane[k];
    return sum;
}

/* ds = p * (dp - D) * scale, in place of dp: the softmax backward for one row */
VECTOR_CLONES
static void softmax_backward_row(float *dp, const float *p, int n, float D, float scale) {
    for (int c = 0; c < n; c++) dp[c] = p[c] * (dp[c] - D) * scale;
}

/* ---------------------------------------------------------------------------------------------- */
/* AVX2 + FMA and AVX-512 versions of the three row operations above: 8 or 16 lanes, exp by the same */
/* Cephes polynomial in FMAs, one pass over the row each (the versions above take three). AVX2 does  */
/* a ragged end through an 8-float buffer (its masked store, vmaskmovps, is microcoded and slow on   */
/* AMD's Zen); AVX-512 with mask registers. They are picked with the micro-kernel (ROW_OPS[isa]), so */
/* LLAMA3NP_ISA=avx2 runs AVX2 code; the versions above are target_clones, which the loader picks by */
/* the CPU (and only gcc builds). Measured, 1 thread, B=1, 8 heads, 2 kv heads, T=1024, hd 64: the   */
/* AVX-512 forward 18.3 -> 11.5 ms CPU time.                                                         */

#if ATTN_X86
#define AVX2_FN __attribute__((target("avx2,fma")))

/* the same Cephes expf as exp_inplace, 8 at a time (NaN stays NaN: max keeps x when x is NaN) */
AVX2_FN static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    const __m256 shift = _mm256_set1_ps(12582912.0f);
    __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift);
    __m256 nf = _mm256_sub_ps(t, shift);
    __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(nf, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 127));
    return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

/* lanes 0 .. n-1 on (1 <= n <= 7) */
AVX2_FN static inline __m256i tail_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* the 8 lanes combined pairwise, always in the same order */
AVX2_FN static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

AVX2_FN static inline float hmax8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    h = _mm_max_ps(_mm_movehl_ps(h, h), h);
    return _mm_cvtss_f32(_mm_max_ss(_mm_movehdup_ps(h), h));
}

AVX2_FN static float scale_and_max_avx2(float *s, int n, float scale, float init) {
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(init);
    int c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + c), sc);
        _mm256_storeu_ps(s + c, x);
        mx = _mm256_max_ps(x, mx); /* a NaN x leaves mx as it was, as the portable loop does */
    }
    if (c < n) {
        float buf[8] __attribute__((aligned(32))) = {0};
        memcpy(buf, s + c, (size_t)(n - c) * sizeof(float));
        __m256 x = _mm256_mul_ps(_mm256_load_ps(buf), sc);
        _mm256_store_ps(buf, x);
        memcpy(s + c, buf, (size_t)(n - c) * sizeof(float));
        mx = _mm256_max_ps(_mm256_blendv_ps(mx, x, _mm256_castsi256_ps(tail_mask(n - c))), mx);
    }
    return hmax8(mx);
}

AVX2_FN static float exp_affine_sum_avx2(float *s, int n, float a, float b) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    __m256 sum = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + c), va, vb));
        _mm256_storeu_ps(s + c, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (c < n) {
        float buf[8] __attribute__((aligned(32))) = {0};
        memcpy(buf, s + c, (size_t)(n - c) * sizeof(float));
        __m256 e = exp8(_mm256_fmsub_ps(_mm256_load_ps(buf), va, vb));
        _mm256_store_ps(buf, e);
        memcpy(s + c, buf, (size_t)(n - c) * sizeof(float));
        sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(tail_mask(n - c))));
    }
    return hsum8(sum);
}

AVX2_FN static void softmax_backward_row_avx2(float *dp, const float *p, int n, float D, float scale) {
    const __m256 vd = _mm256_set1_ps(D), sc = _mm256_set1_ps(scale);
    int c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + c), _mm256_sub_ps(_mm256_loadu_ps(dp + c), vd));
        _mm256_storeu_ps(dp + c, _mm256_mul_ps(x, sc));
    }
    for (; c < n; c++) dp[c] = p[c] * (dp[c] - D) * scale;
}

/* AVX-512: the same, 16 lanes, ragged ends by masked loads and stores (cheap here: mask registers) */
#define AVX512_FN __attribute__((target("avx512f")))

AVX512_FN static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* keeps a NaN x, as exp8 */
    const __m512 shift = _mm512_set1_ps(12582912.0f);
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shift);
    __m512 nf = _mm512_sub_ps(t, shift);
    __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    __m512i n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000 - 127));
    return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
}

AVX512_FN static inline __mmask16 lanes16(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

AVX512_FN static float scale_and_max_avx512(float *s, int n, float scale, float init) {
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(init);
    for (int c = 0; c < n; c += 16) {
        __mmask16 m = lanes16(n - c);
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + c), sc);
        _mm512_mask_storeu_ps(s + c, m, x);
        mx = _mm512_mask_max_ps(mx, m, x, mx); /* a NaN x leaves mx as it was */
    }
    return _mm512_reduce_max_ps(mx);
}

AVX512_FN static float exp_affine_sum_avx512(float *s, int n, float a, float b) {
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < n; c += 16) {
        __mmask16 m = lanes16(n - c);
        __m512 e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + c), va, vb));
        _mm512_mask_storeu_ps(s + c, m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

AVX512_FN static void softmax_backward_row_avx512(float *dp, const float *p, int n, float D, float scale) {
    const __m512 vd = _mm512_set1_ps(D), sc = _mm512_set1_ps(scale);
    for (int c = 0; c < n; c += 16) {
        __mmask16 m = lanes16(n - c);
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + c), _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + c), vd));
        _mm512_mask_storeu_ps(dp + c, m, _mm512_mul_ps(x, sc));
    }
}
#endif

/* the row operations for each instruction set (numbering of llama3np_kernels.h) */
typedef struct {
    float (*scale_and_max)(float *s, int n, float scale, float init);
    float (*exp_affine_sum)(float *s, int n, float a, float b);
    void (*softmax_backward_row)(float *dp, const float *p, int n, float D, float scale);
} row_ops_t;

#define CLONED_ROW_OPS {scale_and_max, exp_affine_sum, softmax_backward_row}
static const row_ops_t ROW_OPS[N_ISAS] = {
    CLONED_ROW_OPS,
#if ATTN_X86
    {scale_and_max_avx2, exp_affine_sum_avx2, softmax_backward_row_avx2},
    {scale_and_max_avx512, exp_affine_sum_avx512, softmax_backward_row_avx512},
#else
    CLONED_ROW_OPS,
    CLONED_ROW_OPS,
#endif
    CLONED_ROW_OPS, /* NEON: the compiler's vectorization of the portable loops */
};

typedef struct {
    const float *q, *k, *v, *dout, *out, *lse;
    const long *qs, *ks, *vs, *douts, *outs, *lses; /* strides in floats of dims 0, 1, 2 */
    float *out_c, *lse_c;                           /* forward outputs, contiguous */
    float *dq, *dk, *dv;                            /* backward outputs, contiguous */
    float *dk_heads, *dv_heads;                     /* (B, H, S, hd) per-query-head partials, or NULL */
    float *kv_packed;                               /* forward: packed k^T and v of every kv head */
    const int *kv_start;                            /* (B, T) first visible key per query, or NULL */
    int B, H, KV, T, S, hd, causal, isa;
    const row_ops_t *rows;                          /* ROW_OPS[isa] */
    float scale;
    int next_task, next_pack, failed;
} attn_ctx;

#define UP16(n) (((n) + 15) / 16 * 16) /* keep every buffer 64-byte aligned */

/* floats of one kv head's packed k^T (hd x S) and v (S x hd), as B operands */
static long kv_pack_floats(const attn_ctx *a) {
    return UP16(gemm_packed_b_floats(a->isa, a->hd, a->S)) + UP16(gemm_packed_b_floats(a->isa, a->S, a->hd));
}

/* pack k^T and v of kv head g in batch b: kt (hd x S) and v (S x hd) as B operands */
static void pack_kv(const attn_ctx *a, int b, int g, float *kt, float *vp) {
    const float *K = a->k + b * a->ks[0] + g * a->ks[1];
    const float *V = a->v + b * a->vs[0] + g * a->vs[1];
    gemm_pack_b(a->isa, 1, K, a->ks[2], a->hd, a->S, kt); /* op(B) = K^T, stored as K */
    gemm_pack_b(a->isa, 0, V, a->vs[2], a->S, a->hd, vp);
}

/* per-thread scratch, carved from one allocation */
typedef struct {
    float *s, *p, *qp, *acc, *m, *l;       /* tiles (read in place by the products), q packed, row statistics */
    float *D, *qa, *da, *qb, *db;          /* backward: row terms, q and dout packed as A and as B */
    float *kt, *kp, *vt;                   /* backward: k^T, k and v^T of the kv head, packed as B */
    void *mem;
} scratch_t;

static float *carve(float **cursor, long n) {
    float *p = *cursor;
    *cursor += UP16(n);
    return p;
}

static int scratch_alloc(const attn_ctx *a, scratch_t *w, int backward) {
    const int isa = a->isa, hd = a->hd, T = a->T, S = a->S;
    const int n_blocks = (T + BR - 1) / BR;
    long a_blk = gemm_packed_a_floats(isa, BR, hd); /* one packed block of BR query rows */
    long sizes[14] = {TILE_ROWS * BC, TILE_ROWS * BC, a_blk, (long)BR * hd, BR, BR, 0, 0, 0, 0, 0, 0, 0, 0};
    if (backward) {
        sizes[6] = T;
        sizes[7] = sizes[8] = UP16(a_blk) * n_blocks;
        sizes[9] = sizes[10] = gemm_packed_b_floats(isa, T, hd);
        sizes[11] = gemm_packed_b_floats(isa, hd, S);
        sizes[12] = gemm_packed_b_floats(isa, S, hd);
        sizes[13] = gemm_packed_b_floats(isa, hd, S);
    }
    long total = 0;
    for (int i = 0; i < 14; i++) total += UP16(sizes[i]);
    if (posix_memalign(&w->mem, 64, (size_t)total * sizeof(float)) != 0) return -1;
    memset(w->mem, 0, (size_t)UP16(TILE_ROWS * BC) * 2 * sizeof(float)); /* the tiles' padding rows */
    float *cur = (float *)w->mem;
    float **slots[14] = {&w->s, &w->p, &w->qp, &w->acc, &w->m, &w->l, &w->D,
                         &w->qa, &w->da, &w->qb, &w->db, &w->kt, &w->kp, &w->vt};
    for (int i = 0; i < 14; i++) *slots[i] = carve(&cur, sizes[i]);
    return 0;
}

/* the first key query row i of batch b (0-based among the T queries) may see */
static int first_key(const attn_ctx *a, int b, int i) {
    if (!a->kv_start) return 0;
    int start = a->kv_start[(long)b * a->T + i], pos = a->S - a->T + i;
    return a->causal && start > pos ? pos : start; /* a query always sees itself */
}

/* which of the bc keys starting at j0 query row i of batch b may see: tile columns [*c0, return value),
 * empty when they are equal */
static int visible_keys(const attn_ctx *a, int b, int i, int j0, int bc, int *c0) {
    int lo = first_key(a, b, i) - j0;
    int hi = a->causal ? a->S - a->T + i + 1 - j0 : bc; /* the query's own position is the last it sees */
    lo = lo < 0 ? 0 : (lo > bc ? bc : lo);
    hi = hi < lo ? lo : (hi > bc ? bc : hi);
    *c0 = lo;
    return hi;
}

/* the first key any of the rows [i0, i0 + n) of batch b sees, rounded down to a tile start: tiles
 * before it hold no visible key for any of them */
static int first_tile(const attn_ctx *a, int b, int i0, int n) {
    if (!a->kv_start) return 0;
    int lo = a->S;
    for (int i = i0; i < i0 + n; i++) {
        int f = first_key(a, b, i);
        lo = f < lo ? f : lo;
    }
    return lo / BC * BC;
}

/* The parts of a tile that a mask leaves (the causal diagonal: row r sees keys < r + 1 of the tile). Each
 * row r sees columns [c0[r], c1[r]); a tile is `partial` when some row stops short of its end. Products
 * are then computed a sliver of MR rows at a time over what that sliver needs (gemm_sliver): the scores
 * and dp over the columns its rows see (rounded up to NR), p v and ds k over the keys they see, and
 * p^T dout, ds^T q (rows: keys) from the first query that sees one of the sliver's keys. What is skipped
 * is masked (never read) or adds exact zeros, so only the sign of a zero sum can differ from the whole
 * product. The diagonal tiles were 4 of 10 of `tiny`'s (T 256) and did twice the work they needed
 * (measured, AVX2, 1 thread, tiny's shape: forward 6.8 -> 6.1 ms, backward 12.0 -> 10.9). Whole tiles keep
 * the one-call products: sliver by sliver they measured 2-3% slower. */
typedef struct {
    int c0[BR], c1[BR];
    int br, bc, partial;
} tile_mask;

static void tile_mask_of(const attn_ctx *a, int b, int i0, int br, int j0, int bc, tile_mask *t) {
    t->br = br, t->bc = bc, t->partial = 0;
    for (int r = 0; r < br; r++) {
        t->c1[r] = visible_keys(a, b, i0 + r, j0, bc, &t->c0[r]);
        t->partial |= t->c1[r] < bc;
    }
}

/* the columns rows s * MR .. (s + 1) * MR - 1 see, 0 .. the returned count */
static int sliver_cols(const tile_mask *t, int s, int MR) {
    int hi = 0;
    for (int r = s * MR; r < t->br && r < (s + 1) * MR; r++) hi = t->c1[r] > hi ? t->c1[r] : hi;
    return hi;
}

/* the first row that sees one of the keys of sliver s (columns s * MR ..): rows before it have p = 0 there */
static int first_row_seeing(const tile_mask *t, int s, int MR) {
    int k0 = s * MR, k1 = k0 + MR;
    for (int r = 0; r < t->br; r++)
        if (t->c1[r] > t->c0[r] && t->c0[r] < k1 && t->c1[r] > k0) return r;
    return t->br;
}

/* C (br rows of the tile, ldc) = A (packed, depth k) @ B[:, :bc]: scores or dp, over the columns seen */
static void tile_scores(int isa, const tile_mask *t, int k, const float *Ap, const float *Bp, long b_stride, float *C,
                        long ldc) {
    if (!t->partial) {
        gemm_packed(isa, t->br, t->bc, k, Ap, Bp, b_stride, C, ldc, 0);
        return;
    }
    const int MR = gemm_mr(isa), NR = gemm_nr(isa);
    for (int s = 0; s * MR < t->br; s++) {
        int n = (sliver_cols(t, s, MR) + NR - 1) / NR * NR;
        gemm_sliver(isa, A_PACKED, s, t->br, n < t->bc ? n : t->bc, k, 0, k, Ap, Bp, b_stride, C, ldc, 0);
    }
}

/* C (br x n) += P (the tile, rows read in place) @ B (bc keys x n): p v or ds k, over the keys each sliver sees */
static void tile_rows_times(int isa, const tile_mask *t, int n, const float *P, const float *Bp, long b_stride,
                            float *C, long ldc) {
    if (!t->partial) {
        gemm_rowmajor_a(isa, t->br, n, t->bc, P, Bp, b_stride, C, ldc, 1);
        return;
    }
    const int MR = gemm_mr(isa);
    for (int s = 0; s * MR < t->br; s++)
        gemm_sliver(isa, A_TILE, s, t->br, n, t->bc, 0, sliver_cols(t, s, MR), P, Bp, b_stride, C, ldc, 1);
}

/* C (bc x n) += P^T (bc keys x br queries, the tile's transpose read in place) @ B (br x n): p^T dout or ds^T q,
 * from each sliver's first query */
static void tile_keys_times(int isa, const tile_mask *t, int n, const float *P, const float *Bp, long b_stride,
                            float *C, long ldc) {
    if (!t->partial) {
        gemm_tile_transposed_a(isa, t->bc, n, t->br, P, Bp, b_stride, C, ldc, 1);
        return;
    }
    const int MR = gemm_mr(isa);
    for (int s = 0; s * MR < t->bc; s++)
        gemm_sliver(isa, A_TILE_T, s, t->bc, n, t->br, first_row_seeing(t, s, MR), t->br, P, Bp, b_stride, C, ldc, 1);
}

/* ---------------------------------------------------------------------------------------------- */
/* Forward: one block of br queries of head h in batch b.                                           */

static void forward_block(const attn_ctx *a, scratch_t *w, int b, int h, int i0, int br) {
    const int hd = a->hd, isa = a->isa, NR = gemm_nr(isa), g = h / (a->H / a->KV);
    const float *Q = a->q + b * a->qs[0] + h * a->qs[1] + i0 * a->qs[2];
    const float *kt = a->kv_packed + ((long)b * a->KV + g) * kv_pack_floats(a);
    const float *vp = kt + UP16(gemm_packed_b_floats(isa, hd, a->S));
    gemm_pack_a(isa, 0, Q, a->qs[2], br, hd, w->qp); /* this block's queries, used by every key tile */
    /* keys past the last query's own position are masked for every row of the block */
    int n_keys = a->causal ? a->S - a->T + i0 + br : a->S;
    for (int r = 0; r < br; r++) {
        w->m[r] = -INFINITY; /* no key seen yet */
        w->l[r] = 0.0f;
    }
    memset(w->acc, 0, (size_t)br * hd * sizeof(float));
    for (int j0 = first_tile(a, b, i0, br); j0 < n_keys; j0 += BC) {
        int bc = n_keys - j0 < BC ? n_keys - j0 : BC;
        tile_mask t;
        tile_mask_of(a, b, i0, br, j0, bc, &t);
        /* scores of the tile: s (br, bc) = Q (br, hd) @ K[j0:j0+bc]^T (hd, bc) */
        tile_scores(isa, &t, hd, w->qp, kt + (long)j0 * hd, (long)NR * hd, w->s, BC);
        /* every row's new max first, then the exponentials: a row's exp pass waits for its max, and
         * with the maxima known the CPU overlaps one row's exps with the next row's (same values;
         * measured, 1 thread, alternating runs: tiny's forward (B 8, 8 heads, T 256, hd 32) AVX2
         * 6.02 -> 5.69 ms, AVX-512 5.27 -> 4.85; small's (4, 8, 512, 64) 15.9 -> 15.45, 14.55 -> 13.96) */
        float new_max[BR];
        for (int r = 0; r < br; r++)
            if (t.c1[r] > t.c0[r])
                new_max[r] = a->rows->scale_and_max(w->s + r * BC + t.c0[r], t.c1[r] - t.c0[r], a->scale, w->m[r]);
        for (int r = 0; r < br; r++) {
            float *s = w->s + r * BC;
            int c0 = t.c0[r], c1 = t.c1[r];
            if (c1 == c0) { /* no key of the tile is visible: probability 0, statistics unchanged */
                memset(s, 0, (size_t)bc * sizeof(float));
                continue;
            }
            float mx = new_max[r];
            /* the online softmax: rescale what was summed under the old max to the new max */
            /* exp(-inf) = 0 on the first tile; most later tiles hold no new max (a running record is
             * rare), and exp(0) = 1 exactly, so skip the call then */
            float correction = mx == w->m[r] ? 1.0f : expf(w->m[r] - mx);
            float sum = a->rows->exp_affine_sum(s + c0, c1 - c0, 1.0f, mx);
            for (int c = 0; c < c0; c++) s[c] = 0.0f; /* masked: probability 0 */
            for (int c = c1; c < bc; c++) s[c] = 0.0f;
            w->l[r] = w->l[r] * correction + sum;
            if (correction != 1.0f) {
                float *o = w->acc + r * hd;
                for (int d = 0; d < hd; d++) o[d] *= correction;
            }
            w->m[r] = mx;
        }
        /* acc (br, hd) += p (br, bc) @ V[j0:j0+bc] (bc, hd), p read in place */
        tile_rows_times(isa, &t, hd, w->s, vp + (long)j0 * NR, (long)NR * a->S, w->acc, hd);
    }
    /* every row saw at least one key (itself, or kv_start.. without the causal mask), so l > 0 */
    for (int r = 0; r < br; r++) {
        long row = ((long)b * a->H + h) * a->T + i0 + r;
        float inv = 1.0f / w->l[r];
        /* restrict: otherwise the compiler cannot tell the output from acc and left this loop scalar
         * (tiny's forward, AVX2: 5.69 -> 5.55 ms) */
        float *restrict o = a->out_c + row * hd;
        const float *restrict acc = w->acc + r * hd;
        for (int d = 0; d < hd; d++) o[d] = acc[d] * inv;
        a->lse_c[row] = w->m[r] + logf(w->l[r]);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Forward for a few queries (a KV-cache decode step, T small): packing k and v would cost as much  */
/* as using them once, and a micro-kernel tile would be mostly empty rows. Instead the G * T query  */
/* rows that share a kv head walk its keys together: each key and value row is loaded once and used */
/* by all of them (dot products for the scores, out += p v), with the same online softmax.          */

#define ROWS_MAX_T 4 /* below this many queries the row path is faster (measured: T = 1, 2 clearly, 3 even) */

/* all T query rows of the G heads of kv head g in batch b; row r is head g*G + r / T, query r % T */
static void forward_rows(const attn_ctx *a, float *s, float *acc, float *m, float *l, int b, int g) {
    const int hd = a->hd, G = a->H / a->KV, T = a->T, R = G * T;
    const vec_ops_t *vo = vec_ops(a->isa); /* the dot products and axpys of this ISA */
    const float *K = a->k + b * a->ks[0] + g * a->ks[1];
    const float *V = a->v + b * a->vs[0] + g * a->vs[1];
    const float *q[R];
    int c0[R], c1[R]; /* the keys row r may see in the current tile: columns c0[r] .. c1[r] - 1 */
    for (int r = 0; r < R; r++) {
        q[r] = a->q + b * a->qs[0] + (g * G + r / T) * a->qs[1] + (r % T) * a->qs[2];
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, (size_t)R * hd * sizeof(float));
    const int n_keys = a->S; /* the last query sees every key (S - T + T - 1) */
    for (int j0 = first_tile(a, b, 0, T); j0 < n_keys; j0 += BC) {
        int bc = n_keys - j0 < BC ? n_keys - j0 : BC;
        for (int r = 0; r < R; r++) c1[r] = visible_keys(a, b, r % T, j0, bc, &c0[r]);
        /* scores, four keys at a time (each key row is loaded once and used by every query row) */
        const long ldk = a->ks[2], ldv = a->vs[2];
        for (int c = 0; c < bc; c += 4) {
            const float *k = K + (j0 + c) * ldk;
            for (int r = 0; r < R; r++) {
                if (c >= c0[r] && c + 4 <= c1[r])
                    vo->dot4(q[r], k, k + ldk, k + 2 * ldk, k + 3 * ldk, hd, s + r * BC + c);
                else
                    for (int cc = c < c0[r] ? c0[r] : c; cc < c + 4 && cc < c1[r]; cc++)
                        s[r * BC + cc] = vo->dot(q[r], K + (j0 + cc) * ldk, hd);
            }
        }
        for (int r = 0; r < R; r++) {
            if (c1[r] == c0[r]) continue;
            float *sr = s + r * BC + c0[r];
            float mx = a->rows->scale_and_max(sr, c1[r] - c0[r], a->scale, m[r]);
            float correction = mx == m[r] ? 1.0f : expf(m[r] - mx); /* as in forward_block */
            l[r] = l[r] * correction + a->rows->exp_affine_sum(sr, c1[r] - c0[r], 1.0f, mx);
            if (correction != 1.0f)
                for (int d = 0; d < hd; d++) acc[r * hd + d] *= correction;
            m[r] = mx;
        }
        /* out += p v, four value rows at a time */
        for (int c = 0; c < bc; c += 4) {
            const float *v = V + (j0 + c) * ldv;
            for (int r = 0; r < R; r++) {
                if (c >= c0[r] && c + 4 <= c1[r])
                    vo->axpy4(acc + r * hd, s + r * BC + c, v, v + ldv, v + 2 * ldv, v + 3 * ldv, hd);
                else
                    for (int cc = c < c0[r] ? c0[r] : c; cc < c + 4 && cc < c1[r]; cc++)
                        vo->axpy(acc + r * hd, s[r * BC + cc], V + (j0 + cc) * ldv, hd);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        long row = ((long)b * a->H + g * G + r / T) * T + r % T;
        for (int d = 0; d < hd; d++) a->out_c[row * hd + d] = acc[r * hd + d] / l[r];
        a->lse_c[row] = m[r] + logf(l[r]);
    }
}

static void forward_rows_thread(void *arg, int tid, int nthreads, barrier_t *barrier) {
    (void)tid, (void)nthreads, (void)barrier;
    attn_ctx *a = (attn_ctx *)arg;
    const long R = (long)(a->H / a->KV) * a->T;
    float *mem = malloc((size_t)R * (BC + a->hd + 2) * sizeof(float));
    if (!mem) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (;;) {
        int t = __atomic_fetch_add(&a->next_task, 1, __ATOMIC_RELAXED);
        if (t >= a->B * a->KV) break;
        forward_rows(a, mem, mem + R * BC, mem + R * (BC + a->hd), mem + R * (BC + a->hd + 1), t / a->KV, t % a->KV);
    }
    free(mem);
}

static void forward_thread(void *arg, int tid, int nthreads, barrier_t *barrier) {
    (void)tid, (void)nthreads;
    attn_ctx *a = (attn_ctx *)arg;
    /* first, together: pack k^T and v of every kv head */
    int n_heads = a->B * a->KV;
    for (;;) {
        int t = __atomic_fetch_add(&a->next_pack, 1, __ATOMIC_RELAXED);
        if (t >= n_heads) break;
        float *kt = a->kv_packed + t * kv_pack_floats(a);
        pack_kv(a, t / a->KV, t % a->KV, kt, kt + UP16(gemm_packed_b_floats(a->isa, a->hd, a->S)));
    }
    barrier_wait(barrier);
    scratch_t w;
    if (scratch_alloc(a, &w, 0) != 0) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return; /* the other threads take the remaining tasks */
    }
    int n_blocks = (a->T + BR - 1) / BR, n_tasks = a->B * a->H * n_blocks;
    for (;;) {
        int t = __atomic_fetch_add(&a->next_task, 1, __ATOMIC_RELAXED);
        if (t >= n_tasks) break;
        /* last query blocks first: under the causal mask they have the most keys, so the dynamic
         * schedule ends with the small tasks and the threads finish together */
        int blk = n_blocks - 1 - t % n_blocks, bh = t / n_blocks;
        int i0 = blk * BR, br = a->T - i0 < BR ? a->T - i0 : BR;
        forward_block(a, &w, bh / a->H, bh % a->H, i0, br);
    }
    free(w.mem);
}

static int attention_threads(double flops) {
    int n = get_num_threads();
    while (n > 1 && flops < 4e6 * n) n--; /* starting a thread costs ~20 us */
    return n;
}

int attention_forward(const float *q, const long *q_strides, const float *k, const long *k_strides,
                      const float *v, const long *v_strides, float *out, float *lse, int B, int H, int KV,
                      int T, int S, int hd, int causal, const int *kv_start) {
    attn_ctx a = {.q = q, .k = k, .v = v, .qs = q_strides, .ks = k_strides, .vs = v_strides,
                  .out_c = out, .lse_c = lse, .B = B, .H = H, .KV = KV, .T = T, .S = S, .hd = hd,
                  .causal = causal, .kv_start = kv_start, .isa = current_isa(), .scale = 1.0f / sqrtf((float)hd)};
    a.rows = &ROW_OPS[a.isa];
    int nthreads = attention_threads(4.0 * B * H * T * (double)S * hd);
    if (T < ROWS_MAX_T) {
        parallel_run(nthreads, forward_rows_thread, &a);
        return a.failed && a.next_task == 0 ? -1 : 0;
    }
    void *packed = NULL;
    if (posix_memalign(&packed, 64, (size_t)B * KV * kv_pack_floats(&a) * sizeof(float)) != 0) return -1;
    a.kv_packed = (float *)packed;
    parallel_run(nthreads, forward_thread, &a);
    free(packed);
    /* a thread without scratch skipped its share; only if every thread failed is work undone */
    return a.failed && a.next_task == 0 ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Backward: all of query head h of batch b, accumulating dk and dv into dK, dV (S, hd). The kv head's
 * packed k^T, k and v^T are in w->kt, w->kp, w->vt already.                                         */

static void backward_head(const attn_ctx *a, scratch_t *w, int b, int h, float *dK, float *dV) {
    const int hd = a->hd, T = a->T, S = a->S, isa = a->isa, NR = gemm_nr(isa);
    const float *Q = a->q + b * a->qs[0] + h * a->qs[1];
    const float *dO = a->dout + b * a->douts[0] + h * a->douts[1];
    const float *O = a->out + b * a->outs[0] + h * a->outs[1];
    const float *L = a->lse + b * a->lses[0] + h * a->lses[1];
    const long ldq = a->qs[2], ldo = a->douts[2];
    const long a_blk = UP16(gemm_packed_a_floats(isa, BR, hd));
    float *dQ = a->dq + ((long)b * a->H + h) * T * hd;
    memset(dQ, 0, (size_t)T * hd * sizeof(float));
    /* pack q and dout once, as A operands (per block of BR rows) and as B operands */
    for (int i0 = 0; i0 < T; i0 += BR) {
        int br = T - i0 < BR ? T - i0 : BR;
        gemm_pack_a(isa, 0, Q + i0 * ldq, ldq, br, hd, w->qa + (i0 / BR) * a_blk);
        gemm_pack_a(isa, 0, dO + i0 * ldo, ldo, br, hd, w->da + (i0 / BR) * a_blk);
    }
    gemm_pack_b(isa, 0, Q, ldq, T, hd, w->qb);
    gemm_pack_b(isa, 0, dO, ldo, T, hd, w->db);
    /* D_i = sum_j p_ij dp_ij = dout_i . out_i: the softmax backward's row term, once per row */
    for (int i = 0; i < T; i++) {
        float s = 0.0f;
        for (int d = 0; d < hd; d++) s += dO[i * ldo + d] * O[i * a->outs[2] + d];
        w->D[i] = s;
    }
    for (int j0 = 0; j0 < S; j0 += BC) {
        int bc = S - j0 < BC ? S - j0 : BC;
        /* under the causal mask only queries at positions >= j0 see this block; start at the block
         * of BR rows holding the first of them (rows before it get probability 0) */
        int i_first = a->causal ? j0 - (S - T) : 0;
        int i_start = i_first < 0 ? 0 : i_first / BR * BR;
        for (int i0 = i_start; i0 < T; i0 += BR) {
            int br = T - i0 < BR ? T - i0 : BR;
            if (first_tile(a, b, i0, br) > j0) continue; /* the tile is before every row's document */
            const float *qa = w->qa + (i0 / BR) * a_blk, *da = w->da + (i0 / BR) * a_blk;
            tile_mask t;
            tile_mask_of(a, b, i0, br, j0, bc, &t);
            /* p (br, bc) = exp(Q_i K_j^T * scale - lse_i), recomputed; masked entries 0 */
            tile_scores(isa, &t, hd, qa, w->kt + (long)j0 * hd, (long)NR * hd, w->p, BC);
            for (int r = 0; r < br; r++) {
                float *p = w->p + r * BC;
                int c0 = t.c0[r], c1 = t.c1[r];
                a->rows->exp_affine_sum(p + c0, c1 - c0, a->scale, L[(i0 + r) * a->lses[2]]);
                for (int c = 0; c < c0; c++) p[c] = 0.0f;
                for (int c = c1; c < bc; c++) p[c] = 0.0f;
            }
            /* dV_j (bc, hd) += p^T (bc, br) @ dout_i (br, hd) */
            tile_keys_times(isa, &t, hd, w->p, w->db + (long)i0 * NR, (long)NR * T, dV + (long)j0 * hd, hd);
            /* dp (br, bc) = dout_i (br, hd) @ V_j^T (hd, bc), over the columns seen */
            tile_scores(isa, &t, hd, da, w->vt + (long)j0 * hd, (long)NR * hd, w->s, BC);
            /* ds = p (dp - D) scale on the columns a row sees (where p = 0 it is 0: set, since dp past them
             * was not computed) */
            for (int r = 0; r < br; r++) {
                float *ds = w->s + r * BC;
                a->rows->softmax_backward_row(ds, w->p + r * BC, t.c1[r], w->D[i0 + r], a->scale);
                for (int c = t.c1[r]; c < bc; c++) ds[c] = 0.0f;
            }
            /* dQ_i (br, hd) += ds (br, bc) @ K_j (bc, hd), ds read in place */
            tile_rows_times(isa, &t, hd, w->s, w->kp + (long)j0 * NR, (long)NR * S, dQ + (long)i0 * hd, hd);
            /* dK_j (bc, hd) += ds^T (bc, br) @ Q_i (br, hd) */
            tile_keys_times(isa, &t, hd, w->s, w->qb + (long)i0 * NR, (long)NR * T, dK + (long)j0 * hd, hd);
        }
    }
}

/* pack the kv head (b, g) for backward_head: k^T and v^T (hd x S) and k (S x hd) as B operands */
static void backward_pack_kv(const attn_ctx *a, scratch_t *w, int b, int g) {
    const float *K = a->k + b * a->ks[0] + g * a->ks[1];
    const float *V = a->v + b * a->vs[0] + g * a->vs[1];
    gemm_pack_b(a->isa, 1, K, a->ks[2], a->hd, a->S, w->kt);
    gemm_pack_b(a->isa, 0, K, a->ks[2], a->S, a->hd, w->kp);
    gemm_pack_b(a->isa, 1, V, a->vs[2], a->hd, a->S, w->vt);
}

/* Two ways to split the work over threads:
 *  - one task per kv head (b, g): it runs the G query heads that share it and owns dK, dV of g;
 *  - when there are fewer kv heads than threads (e.g. n_kv_heads = 1), one task per query head,
 *    each writing its dk, dv to its own (S, hd) slot of dk_heads, summed over the group after. */
static void backward_thread(void *arg, int tid, int nthreads, barrier_t *barrier) {
    attn_ctx *a = (attn_ctx *)arg;
    const int G = a->H / a->KV, hd = a->hd;
    const long slot = (long)a->S * hd;
    scratch_t w;
    int ok = scratch_alloc(a, &w, 1) == 0;
    if (!ok) __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
    int per_head = a->dk_heads != NULL;
    int n_tasks = per_head ? a->B * a->H : a->B * a->KV;
    while (ok) {
        int t = __atomic_fetch_add(&a->next_task, 1, __ATOMIC_RELAXED);
        if (t >= n_tasks) break;
        if (per_head) {
            int b = t / a->H, h = t % a->H;
            float *dK = a->dk_heads + t * slot, *dV = a->dv_heads + t * slot;
            memset(dK, 0, slot * sizeof(float));
            memset(dV, 0, slot * sizeof(float));
            backward_pack_kv(a, &w, b, h / G);
            backward_head(a, &w, b, h, dK, dV);
        } else {
            int b = t / a->KV, g = t % a->KV;
            float *dK = a->dk + t * slot, *dV = a->dv + t * slot;
            memset(dK, 0, slot * sizeof(float));
            memset(dV, 0, slot * sizeof(float));
            backward_pack_kv(a, &w, b, g);
            for (int h = g * G; h < (g + 1) * G; h++) backward_head(a, &w, b, h, dK, dV);
        }
    }
    if (ok) free(w.mem);
    if (!per_head) return;
    /* sum the per-head partials over each group: dk[b, g] = sum over h in g of dk_heads[b, h] */
    barrier_wait(barrier);
    long n = (long)a->B * a->KV * slot;
    for (long e = tid; e < n; e += nthreads) {
        long bg = e / slot, x = e % slot, b = bg / a->KV, g = bg % a->KV;
        float sk = 0.0f, sv = 0.0f;
        for (int h = (int)g * G; h < (g + 1) * G; h++) {
            sk += a->dk_heads[(b * a->H + h) * slot + x];
            sv += a->dv_heads[(b * a->H + h) * slot + x];
        }
        a->dk[e] = sk;
        a->dv[e] = sv;
    }
}

int attention_backward(const float *dout, const long *dout_strides, const float *q, const long *q_strides,
                       const float *k, const long *k_strides, const float *v, const long *v_strides,
                       const float *out, const long *out_strides, const float *lse, const long *lse_strides,
                       float *dq, float *dk, float *dv, int B, int H, int KV, int T, int S, int hd, int causal,
                       const int *kv_start) {
    attn_ctx a = {.q = q, .k = k, .v = v, .dout = dout, .out = out, .lse = lse, .qs = q_strides,
                  .ks = k_strides, .vs = v_strides, .douts = dout_strides, .outs = out_strides,
                  .lses = lse_strides, .dq = dq, .dk = dk, .dv = dv, .B = B, .H = H, .KV = KV, .T = T,
                  .S = S, .hd = hd, .causal = causal, .kv_start = kv_start, .isa = current_isa(), .scale = 1.0f / sqrtf((float)hd)};
    a.rows = &ROW_OPS[a.isa];
    int nthreads = attention_threads(10.0 * B * H * T * (double)S * hd);
    void *partials = NULL;
    if (nthreads > 1 && B * KV < nthreads && H > KV) {
        size_t bytes = (size_t)B * H * S * hd * sizeof(float);
        partials = malloc(2 * bytes);
        if (partials) {
            a.dk_heads = (float *)partials;
            a.dv_heads = (float *)((char *)partials + bytes);
        }
        /* without the memory: fall back to one task per kv head */
    }
    parallel_run(nthreads, backward_thread, &a);
    free(partials);
    /* a thread without scratch skipped its share; only if every thread failed is work undone */
    return a.failed && a.next_task == 0 ? -1 : 0;
}
