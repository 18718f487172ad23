/* exp(x) for x <= ~0, written so the compiler vectorizes the loops that call it (libm's expf is one call
 * per value). Cephes' expf: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n built in
 * the exponent bits. Relative error ~1e-7. x < -87 is read as -87 (exp(-87) ~ 1.6e-38: still a normal
 * float); NaN stays NaN. One definition for attention.c (scores minus their max or their lse) and the
 * elementwise kernels (softmax / cross-entropy rows, SiLU): each file's pragmas and target apply where
 * it is inlined. */
#ifndef LLAMA3NP_EXP_NEG_H
#define LLAMA3NP_EXP_NEG_H
#include <stdint.h>
#include <string.h>

static inline float exp_neg(float x) {
    float v = x < -87.0f ? -87.0f : x;
    /* n = round(v / ln2): adding 1.5 * 2^23 pushes the fraction bits out, leaving n in the low bits of
     * t's mantissa (bit arithmetic, so no float-to-int conversion of a NaN) */
    float t = v * 1.44269504088896341f + 12582912.0f;
    float nf = t - 12582912.0f;
    float r = v - nf * 0.693359375f + nf * 2.12194440e-4f; /* ln2 in two parts: r keeps its low bits */
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    uint32_t tbits, two_n_bits;
    memcpy(&tbits, &t, 4);
    two_n_bits = (tbits - 0x4B400000u + 127u) << 23; /* 0x4B400000 = the bits of 1.5 * 2^23 */
    float two_n;
    memcpy(&two_n, &two_n_bits, 4);
    return y * two_n;
}
#endif
