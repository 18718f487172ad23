/* The row and element loops of elementwise.c, written once and compiled once per instruction set:
 * elementwise.c includes this file several times, each time with
 *   EW_SUFFIX  the name suffix (portable, avx2, avx512) and
 *   EW_TARGET  the function attribute (empty, or __attribute__((target("avx2"))), ...),
 * and gets a table EW_OPS_<suffix>. The compiler vectorizes each loop for that target (as vec_body.h).
 *
 * Every loop is plain float arithmetic in a fixed order, and elementwise.c turns off the fusing of a
 * multiply and an add into one FMA, so each value is the same bits whatever the vector width, the
 * instruction set, the thread count or where the array starts (a tensor-parallel slice of a row gets
 * the bits of the whole row). Sums over a row go into 16 lanes in a fixed order (never reassociated). */
#ifndef EW_CAT
#define EW_CAT2(a, b) a##b
#define EW_CAT(a, b) EW_CAT2(a, b)
#endif
#define EW_NAME(name) EW_CAT(name, EW_SUFFIX)

/* exp(x) for x <= 0: exp_neg.h's (the one attention.c uses), compiled here with this ISA's target so the
 * loops that call it vectorize. */
EW_TARGET static inline float EW_NAME(exp_neg_)(float x) { return exp_neg(x); }

/* sum of x[c] * y[c] over a row, in 16 lanes added in a fixed order */
EW_TARGET static float EW_NAME(row_dot_)(const float *x, const float *y, long n) {
    float lane[16] = {0};
    long c = 0;
    for (; c + 16 <= n; c += 16)
        for (int k = 0; k < 16; k++) lane[k] += x[c + k] * y[c + k];
    for (int k = 0; c < n; c++, k++) lane[k] += x[c] * y[c];
    float s = 0.0f;
    for (int k = 0; k < 16; k++) s += lane[k];
    return s;
}

/* RMSNorm forward of rows [r0, r1): rstd = 1 / sqrt(mean(x^2) + eps), xhat = x * rstd, y = xhat * w */
EW_TARGET static void EW_NAME(rmsnorm_forward_rows_)(const float *x, const float *w, float eps, long C, long r0,
                                                     long r1, float *y, float *xhat, float *rstd) {
    for (long r = r0; r < r1; r++) {
        const float *xr = x + r * C;
        float *yr = y + r * C, *hr = xhat + r * C;
        float rs = 1.0f / sqrtf(EW_NAME(row_dot_)(xr, xr, C) / (float)C + eps);
        for (long c = 0; c < C; c++) {
            float h = xr[c] * rs;
            hr[c] = h;
            yr[c] = h * w[c];
        }
        rstd[r] = rs;
    }
}

/* RMSNorm backward of rows [r0, r1): dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dout * w;
 * dw_part += dout * xhat, row after row (the caller gives each fixed block of rows its own dw_part). */
EW_TARGET static void EW_NAME(rmsnorm_backward_rows_)(const float *dout, const float *xhat, const float *rstd,
                                                      const float *w, long C, long r0, long r1, float *dx,
                                                      float *dw_part, float *dxhat) {
    for (long r = r0; r < r1; r++) {
        const float *dr = dout + r * C, *hr = xhat + r * C;
        float *xr = dx + r * C;
        for (long c = 0; c < C; c++) {
            dxhat[c] = dr[c] * w[c];
            dw_part[c] += dr[c] * hr[c];
        }
        float mean = EW_NAME(row_dot_)(dxhat, hr, C) / (float)C;
        float rs = rstd[r];
        for (long c = 0; c < C; c++) xr[c] = rs * (dxhat[c] - hr[c] * mean);
    }
}

/* sigmoid(x) from exp(-|x|) (never overflows): 1 / (1 + e) for x >= 0, e / (1 + e) below */
EW_TARGET static inline float EW_NAME(sigmoid_)(float x) {
    float e = EW_NAME(exp_neg_)(-fabsf(x));
    return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

/* SwiGLU forward of elements [i0, i1): sig = sigmoid(a), silu = a * sig, out = silu * b. sig and silu
 * are stored only if asked for (not NULL): the backward can recompute them from a, the same bits. */
EW_TARGET static void EW_NAME(swiglu_forward_range_)(const float *a, const float *b, long i0, long i1, float *out,
                                                     float *sig, float *silu) {
    if (!sig) {
        for (long i = i0; i < i1; i++) out[i] = a[i] * EW_NAME(sigmoid_)(a[i]) * b[i];
        return;
    }
    for (long i = i0; i < i1; i++) {
        float s = EW_NAME(sigmoid_)(a[i]);
        float h = a[i] * s;
        sig[i] = s;
        silu[i] = h;
        out[i] = h * b[i];
    }
}

/* SwiGLU backward: da = dout * b * sig * (1 + a * (1 - sig)), db = dout * silu (ops.py's order), with sig
 * and silu the forward's, or (NULL) recomputed from a as the forward computes them. Reading two arrays
 * fewer costs one exp an element more: the training steps of tiny and small measured ~2% faster at 2
 * threads (the memory traffic is the bound there), the same at 1. */
EW_TARGET static void EW_NAME(swiglu_backward_range_)(const float *dout, const float *a, const float *b,
                                                      const float *sig, const float *silu, long i0, long i1,
                                                      float *da, float *db) {
    if (!sig) {
        for (long i = i0; i < i1; i++) {
            float s = EW_NAME(sigmoid_)(a[i]);
            da[i] = dout[i] * b[i] * s * (1.0f + a[i] * (1.0f - s));
            db[i] = dout[i] * (a[i] * s);
        }
        return;
    }
    for (long i = i0; i < i1; i++) {
        float s = sig[i];
        da[i] = dout[i] * b[i] * s * (1.0f + a[i] * (1.0f - s));
        db[i] = dout[i] * silu[i];
    }
}

/* RoPE of one head's row: out[2i] = x0 c - x1 s, out[2i+1] = x0 s + x1 c (x0, x1 = x[2i], x[2i+1]) */
EW_TARGET static void EW_NAME(rope_row_)(const float *x, const float *cs, const float *sn, long half, float *out) {
    for (long i = 0; i < half; i++) {
        float x0 = x[2 * i], x1 = x[2 * i + 1], c = cs[i], s = sn[i];
        out[2 * i] = x0 * c - x1 * s;
        out[2 * i + 1] = x0 * s + x1 * c;
    }
}

/* Cross-entropy forward of rows [r0, r1): lse = max + log(sum exp(logits - max)), nll = lse - logits[target] */
EW_TARGET static void EW_NAME(cross_entropy_forward_rows_)(const float *logits, const int64_t *targets, long V,
                                                           long r0, long r1, float *lse, float *nll) {
    for (long r = r0; r < r1; r++) {
        const float *x = logits + r * V;
        float lane[16];
        for (int k = 0; k < 16; k++) lane[k] = x[0];
        long c = 0;
        for (; c + 16 <= V; c += 16)
            for (int k = 0; k < 16; k++) lane[k] = x[c + k] > lane[k] ? x[c + k] : lane[k];
        for (int k = 0; c < V; c++, k++) lane[k] = x[c] > lane[k] ? x[c] : lane[k];
        float mx = lane[0];
        for (int k = 1; k < 16; k++) mx = lane[k] > mx ? lane[k] : mx;
        for (int k = 0; k < 16; k++) lane[k] = 0.0f;
        for (c = 0; c + 16 <= V; c += 16)
            for (int k = 0; k < 16; k++) lane[k] += EW_NAME(exp_neg_)(x[c + k] - mx);
        for (int k = 0; c < V; c++, k++) lane[k] += EW_NAME(exp_neg_)(x[c] - mx);
        float sum = 0.0f;
        for (int k = 0; k < 16; k++) sum += lane[k];
        float l = mx + logf(sum);
        lse[r] = l;
        nll[r] = l - x[targets[r]];
    }
}

/* Cross-entropy backward of rows [r0, r1): dlogits = (softmax - onehot(target)) * scale[row] */
EW_TARGET static void EW_NAME(cross_entropy_backward_rows_)(const float *logits, const int64_t *targets,
                                                            const float *lse, const float *scale, long V, long r0,
                                                            long r1, float *dlogits) {
    for (long r = r0; r < r1; r++) {
        const float *x = logits + r * V;
        float *d = dlogits + r * V;
        float l = lse[r], s = scale[r];
        long t = targets[r];
        float xt = x[t]; /* read first: dlogits may be logits itself (written in place) */
        for (long c = 0; c < V; c++) d[c] = EW_NAME(exp_neg_)(x[c] - l) * s;
        d[t] = (EW_NAME(exp_neg_)(xt - l) - 1.0f) * s;
    }
}

/* AdamW of elements [i0, i1), the operations of optim.AdamW.step in its order, each rounded to float32
 * as NumPy rounds it: the same bits as the NumPy update. */
EW_TARGET static void EW_NAME(adamw_range_)(float *p, const float *g, float *m, float *v, const adamw_coef *k,
                                            long i0, long i1) {
    const float decay = k->decay, beta1 = k->beta1, one_minus_beta1 = k->one_minus_beta1, beta2 = k->beta2,
                one_minus_beta2 = k->one_minus_beta2, sqrt_bc2 = k->sqrt_bc2, eps = k->eps,
                step_size = k->step_size;
    for (long i = i0; i < i1; i++) {
        float pi = p[i] * decay; /* decay is 1 for the norm weights: x * 1 is x, bit for bit */
        float mi = m[i] * beta1 + g[i] * one_minus_beta1;
        float vi = v[i] * beta2 + g[i] * g[i] * one_minus_beta2;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - mi / (sqrtf(vi) / sqrt_bc2 + eps) * step_size;
    }
}

static const ew_ops_t EW_NAME(EW_OPS_) = {
    EW_NAME(rmsnorm_forward_rows_), EW_NAME(rmsnorm_backward_rows_), EW_NAME(swiglu_forward_range_),
    EW_NAME(swiglu_backward_range_), EW_NAME(rope_row_), EW_NAME(cross_entropy_forward_rows_),
    EW_NAME(cross_entropy_backward_rows_), EW_NAME(adamw_range_)};

#undef EW_NAME
#undef EW_SUFFIX
#undef EW_TARGET
