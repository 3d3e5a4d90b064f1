/* ggml's 32-element block quantizers (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), written from the
 * format's definition so the bytes equal llama.cpp's quantize_row_*_ref.
 *
 * Exactness rules this file keeps (and kiln compiles it with -ffp-contract=off, never
 * -ffast-math): every float operation is the reference's, in its order; float -> int8
 * conversions go through a truncating float -> int32 conversion and keep the low byte, as
 * x86-64 compilers do for the reference's casts (this matters only for out-of-range values,
 * i.e. blocks whose scale is denormal and whose inverse is inf); fp16 is round-to-nearest-even
 * (checked against numpy for all 2^32 float32 bit patterns). Blocks holding NaN are outside
 * the contract: the reference's result there depends on where the NaN sits.
 *
 * The block scans are written on the floats' bit patterns so the compiler can vectorize
 * them (integer max/min reductions reassociate freely, float ones do not): for |x| the
 * bit pattern orders like the value, and for signed x a sign-folded key does. Where the
 * reference's "first element wins" rule could pick a different zero (+0 vs -0), a short
 * scalar scan picks the same element it does.
 */

#include <stdint.h>
#include <string.h>

#define QK 32

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> IEEE binary16 bits, round to nearest even (NaN stays a quiet NaN). */
static inline uint16_t fp16_bits(float f) {
    const uint32_t u = f2u(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((a >> 13) & 0x3ffu);
    if (a >= 0x477ff000u) return sign | 0x7c00u;          /* >= 65520 rounds to infinity */
    if (a >= 0x38800000u) {                                  /* normal half */
        const uint32_t r = a + 0x0fffu + ((a >> 13) & 1u);
        return sign | (uint16_t)((r >> 13) - (112u << 10));
    }
    if (a <= 0x33000000u) return sign;                       /* <= 2^-25: rounds to zero */
    /* subnormal half: the value in units of 2^-24, rounded to nearest even */
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - (a >> 23);                 /* 14 .. 24 */
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return sign | (uint16_t)q;
}

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

/* float -> int8 the way the reference's casts compile: truncate to int32, keep the low byte
 * (out-of-range values, which only a denormal scale makes, give 0x80000000 -> 0 on x86). */
static inline int8_t trunc8(float v) { return (int8_t)(uint8_t)(uint32_t)(int32_t)v; }

/* Largest |x| of a block as float (all non-negative, so the bit patterns order like the values). */
static inline float block_absmax(const float *x) {
    int32_t m = 0;
    for (int j = 0; j < QK; j++) {
        const int32_t b = (int32_t)(f2u(x[j]) & 0x7fffffffu);
        m = b > m ? b : m;
    }
    return u2f((uint32_t)m);
}

/* The first element of largest magnitude, or +0 when the block is all zeros
 * (the reference's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from amax = max = 0). */
static inline float block_signed_absmax(const float *x) {
    const uint32_t m = f2u(block_absmax(x));
    if (m == 0) return 0.0f;
    int j = 0;
    while ((f2u(x[j]) & 0x7fffffffu) != m) j++;
    return x[j];
}

/* A signed int32 key that orders like the float value (-0 just below +0). */
static inline int32_t order_key(float f) {
    const int32_t b = (int32_t)f2u(f);
    return b ^ (int32_t)((uint32_t)(b >> 31) >> 1);
}
static inline float from_key(int32_t k) { return u2f((uint32_t)(k ^ (int32_t)((uint32_t)(k >> 31) >> 1))); }

/* The reference's min/max scan (`if (v < min) min = v; if (v > max) max = v;` from FLT_MAX/-FLT_MAX):
 * the values are the block's extremes; when an extreme is zero the first zero of the block is the one kept. */
static inline void block_min_max(const float *x, float *mn, float *mx) {
    int32_t lo = order_key(x[0]), hi = lo;
    for (int j = 1; j < QK; j++) {
        const int32_t k = order_key(x[j]);
        lo = k < lo ? k : lo;
        hi = k > hi ? k : hi;
    }
    float a = from_key(lo), b = from_key(hi);
    if (a == 0.0f || b == 0.0f) {
        int j = 0;
        while (x[j] != 0.0f) j++;
        if (a == 0.0f) a = x[j];
        if (b == 0.0f) b = x[j];
    }
    *mn = a;
    *mx = b;
}

/* Bit 4 of each of the 32 quants as the little-endian uint32 qh (quant j -> bit j): eight at a time,
 * the bits moved to the bottom of their bytes and gathered into the top byte by one multiply
 * (byte i's bit lands on bit 56 + i; no two partial products share a bit, so nothing carries). */
static inline void put_qh(uint8_t *p, const uint8_t *q) {
    for (int k = 0; k < 4; k++) {
        uint64_t w;
        memcpy(&w, q + 8 * k, 8);
        p[k] = (uint8_t)((((w >> 4) & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56);
    }
}

static inline void put_nibbles(uint8_t *p, const uint8_t *q) {
    for (int j = 0; j < QK / 2; j++) p[j] = (uint8_t)((q[j] & 0x0f) | ((q[j + QK / 2] & 0x0f) << 4));
}

/* Q8_0: fp16 d, 32 x int8 (34 bytes). */
void kiln_q8_0(const float *restrict x, uint8_t *restrict y, int64_t nb) {
    const float half_down = 0x1.fffffep-2f; /* roundf(v) == trunc(v + copysign(this, v)) for |v| < 128 */
    for (int64_t i = 0; i < nb; i++, x += QK, y += 34) {
        const float d = block_absmax(x) / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put16(y, fp16_bits(d));
        int8_t *qs = (int8_t *)(y + 2);
        for (int j = 0; j < QK; j++) {
            const float v = x[j] * id;
            const float h = u2f((f2u(v) & 0x80000000u) | f2u(half_down));
            qs[j] = trunc8(v + h);
        }
    }
}

/* Q4_0: fp16 d, 16 bytes of nibbles (18 bytes). */
void kiln_q4_0(const float *restrict x, uint8_t *restrict y, int64_t nb) {
    uint8_t q[QK];
    for (int64_t i = 0; i < nb; i++, x += QK, y += 18) {
        const float d = block_signed_absmax(x) / -8;
        const float id = d ? 1.0f / d : 0.0f;
        put16(y, fp16_bits(d));
        for (int j = 0; j < QK; j++) {
            const int t = trunc8(x[j] * id + 8.5f);
            q[j] = (uint8_t)(15 < t ? 15 : t);
        }
        put_nibbles(y + 2, q);
    }
}

/* Q4_1: fp16 d, fp16 min, 16 bytes of nibbles (20 bytes). */
void kiln_q4_1(const float *restrict x, uint8_t *restrict y, int64_t nb) {
    uint8_t q[QK];
    for (int64_t i = 0; i < nb; i++, x += QK, y += 20) {
        float mn, mx;
        block_min_max(x, &mn, &mx);
        const float d = (mx - mn) / 15;
        const float id = d ? 1.0f / d : 0.0f;
        put16(y, fp16_bits(d));
        put16(y + 2, fp16_bits(mn));
        for (int j = 0; j < QK; j++) {
            const int t = trunc8((x[j] - mn) * id + 0.5f);
            q[j] = (uint8_t)(15 < t ? 15 : t);
        }
        put_nibbles(y + 4, q);
    }
}

/* Q5_0: fp16 d, uint32 qh, 16 bytes of low nibbles (22 bytes). */
void kiln_q5_0(const float *restrict x, uint8_t *restrict y, int64_t nb) {
    uint8_t q[QK];
    for (int64_t i = 0; i < nb; i++, x += QK, y += 22) {
        const float d = block_signed_absmax(x) / -16;
        const float id = d ? 1.0f / d : 0.0f;
        put16(y, fp16_bits(d));
        for (int j = 0; j < QK; j++) {
            const int t = trunc8(x[j] * id + 16.5f);
            q[j] = (uint8_t)(31 < t ? 31 : t);
        }
        put_qh(y + 2, q);
        put_nibbles(y + 6, q);
    }
}

/* Q5_1: fp16 d, fp16 min, uint32 qh, 16 bytes of low nibbles (24 bytes); no clamp, as in the reference. */
void kiln_q5_1(const float *restrict x, uint8_t *restrict y, int64_t nb) {
    uint8_t q[QK];
    for (int64_t i = 0; i < nb; i++, x += QK, y += 24) {
        float mn, mx;
        block_min_max(x, &mn, &mx);
        const float d = (mx - mn) / 31;
        const float id = d ? 1.0f / d : 0.0f;
        put16(y, fp16_bits(d));
        put16(y + 2, fp16_bits(mn));
        for (int j = 0; j < QK; j++) q[j] = (uint8_t)trunc8((x[j] - mn) * id + 0.5f);
        put_qh(y + 4, q);
        put_nibbles(y + 8, q);
    }
}

/* Exposed for tests: the fp16 conversion every header uses. */
void kiln_fp16(const float *restrict x, uint16_t *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = fp16_bits(x[i]);
}
