/* CPU kernels of the int8 and int4 codecs (see affine.py for the format, native.py for why and how this
 * is built). They produce the bytes the torch path produces, bit for bit: the same fp32 operations in the
 * same order, each rounded on its own (built with -ffp-contract=off, so no multiply-add is fused), the same
 * directed rounding of zero points and scales. What they save is passes: the torch path makes about ten
 * passes over an fp32 copy of the input; these read each group once into cache, reduce it, code it and
 * pack it while it is there.
 *
 * Layout: x is [T, H, D] flattened, C = H * D elements a token. Keys are grouped per channel along tokens
 * (scale and zero [G, H, D]), values per token along D (scale and zero [T, H, GD]). Codes keep x's order;
 * int4 puts code 2i in the low nibble of byte i and code 2i + 1 in the high one. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define ROUNDER 8388608.0f /* 2**23: added to a code in [0, 256), the sum's low mantissa byte is the code */
#define INLINE static inline __attribute__((always_inline))

INLINE float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float half_value(uint16_t b) { _Float16 h; memcpy(&h, &b, 2); return (float)h; }
INLINE uint16_t half_bits(float f) { _Float16 h = (_Float16)f; uint16_t b; memcpy(&b, &h, 2); return b; }

INLINE float load(int dtype, const void *p, int64_t i) {
    if (dtype == BF16) return from_bits((uint32_t)((const uint16_t *)p)[i] << 16);
    if (dtype == F16) return half_value(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

INLINE void store(int dtype, void *p, int64_t i, float v) {
    if (dtype == BF16) { /* round to nearest even, as torch's fp32 -> bf16 copy (inputs are finite) */
        uint32_t u = to_bits(v);
        ((uint16_t *)p)[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    } else if (dtype == F16) {
        ((uint16_t *)p)[i] = half_bits(v);
    } else {
        ((float *)p)[i] = v;
    }
}

/* The largest fp16 <= x (rounding.fp16_round_down). */
INLINE uint16_t half_round_down(float x) {
    uint16_t b = half_bits(x);
    if (half_value(b) > x) b = b == 0 ? 0x8001 : (b & 0x8000) ? b + 1 : b - 1;
    return b;
}

/* The first table index whose value is >= v, at most 255 (rounding.log_scale_up: searchsorted, left).
 * table[8k + r] is 2**(k - 18) times table[r] / table[0] exactly (scaling by a power of two is exact), so
 * the index is 8 per octave of v's exponent plus the count of the first octave's entries below v's
 * mantissa: no search, no branch. */
INLINE uint8_t log_scale_up(const float *table, float v) {
    if (!(v > table[0])) return 0;
    if (v > table[255]) return 255;
    const uint32_t b = to_bits(v); /* normal: v > table[0] = 2**-18 */
    const float mantissa = from_bits((b & 0x7FFFFFu) | 0x3F800000u), first = 1.0f / table[0];
    int r = 0;
    for (int k = 0; k < 8; k++) r += table[k] * first < mantissa;
    return (uint8_t)(8 * ((int)(b >> 23) - 127 + 18) + r);
}

typedef struct { float zero, inverse; } Coding;

/* A group's stored zero and scale code from its extremes, and the fp32 zero and 1/scale to code it with. */
INLINE Coding group_params(const float *table, float low, float high, float qmax, uint16_t *restrict zero, uint8_t *scale) {
    uint16_t z = half_round_down(low);
    Coding c = {half_value(z), 0.0f};
    uint8_t s = log_scale_up(table, (high - c.zero) / qmax);
    *zero = z;
    *scale = s;
    c.inverse = 1.0f / table[s];
    return c;
}

INLINE uint8_t code(float v, Coding c) {
    float scaled = (v - c.zero) * c.inverse;
    return (uint8_t)to_bits(scaled + ROUNDER);
}

/* n codes q into the flat code position at of out (bits 8: a byte each; 4: two a byte). A write at an odd
 * position fills the high nibble of the byte whose low nibble the previous call wrote. */
static void put_codes(uint8_t *out, int bits, int64_t at, const uint8_t *restrict q, int64_t n) {
    if (bits == 8) { memcpy(out + at, q, (size_t)n); return; }
    int64_t i = 0;
    if (at & 1) { out[at >> 1] |= (uint8_t)(q[0] << 4); i = 1; }
    uint8_t *o = out + ((at + i) >> 1);
    int64_t pairs = (n - i) >> 1;
    for (int64_t k = 0; k < pairs; k++) o[k] = (uint8_t)(q[i + 2 * k] | (q[i + 2 * k + 1] << 4));
    if ((n - i) & 1) o[pairs] = q[n - 1];
}

static void get_codes(const uint8_t *in, int bits, int64_t at, uint8_t *restrict q, int64_t n) {
    if (bits == 8) { memcpy(q, in + at, (size_t)n); return; }
    for (int64_t k = 0; k < n; k++) {
        int64_t j = at + k;
        q[k] = (uint8_t)((in[j >> 1] >> ((j & 1) * 4)) & 0x0F);
    }
}

/* Fast unpacking of a row starting on a byte, two codes at a time. */
INLINE void get_codes_row(const uint8_t *in, int bits, int64_t at, uint8_t *restrict q, int64_t n) {
    if (bits == 4 && !(at & 1) && !(n & 1)) {
        const uint8_t *b = in + (at >> 1);
        for (int64_t k = 0; k < n / 2; k++) { q[2 * k] = b[k] & 0x0F; q[2 * k + 1] = b[k] >> 4; }
        return;
    }
    get_codes(in, bits, at, q, n);
}

typedef struct { float low, high; int nan; } Extremes;

INLINE void encode_keys(int dtype, const void *restrict x, int64_t T, int64_t C, int64_t g, int bits, const float *table,
                        uint8_t *restrict codes, uint8_t *restrict scale, uint16_t *restrict zero, float *restrict lo, float *restrict hi, Coding *restrict cod,
                        uint8_t *restrict q, Extremes *ex) {
    float qmax = (float)((1 << bits) - 1);
    for (int64_t t0 = 0; t0 < T; t0 += g) {
        int64_t n = T - t0 < g ? T - t0 : g;
        int nan = 0;
        for (int64_t c = 0; c < C; c++) { float v = load(dtype, x, t0 * C + c); lo[c] = v; hi[c] = v; nan |= v != v; }
        for (int64_t t = 1; t < n; t++) {
            const int64_t row = (t0 + t) * C;
            for (int64_t c = 0; c < C; c++) {
                float v = load(dtype, x, row + c);
                lo[c] = v < lo[c] ? v : lo[c];
                hi[c] = v > hi[c] ? v : hi[c];
                nan |= v != v;
            }
        }
        ex->nan |= nan;
        const int64_t grp = t0 / g * C;
        for (int64_t c = 0; c < C; c++) {
            ex->low = lo[c] < ex->low ? lo[c] : ex->low;
            ex->high = hi[c] > ex->high ? hi[c] : ex->high;
            cod[c] = group_params(table, lo[c], hi[c], qmax, zero + grp + c, scale + grp + c);
        }
        for (int64_t t = 0; t < n; t++) {
            const int64_t row = (t0 + t) * C;
            for (int64_t c = 0; c < C; c++) q[c] = code(load(dtype, x, row + c), cod[c]);
            put_codes(codes, bits, row, q, C);
        }
    }
}

#define LANES 16

/* Smallest and largest of n elements from x[at]; returns 1 if one is NaN. */
INLINE int extremes_of(int dtype, const void *restrict x, int64_t at, int64_t n, float *low, float *high) {
    float lo = load(dtype, x, at), hi = lo;
    int nan = 0;
    for (int64_t k = 0; k < n; k++) {
        float v = load(dtype, x, at + k);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        nan |= v != v;
    }
    *low = lo;
    *high = hi;
    return nan;
}

/* The same for n a multiple of LANES, a vector at a time (a min or max reduction in one chain does not
 * vectorize without -ffast-math; GCC's vector extensions say it outright, for whatever width the CPU has). */
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef uint32_t vuint __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalf __attribute__((vector_size(LANES * 2)));

INLINE vfloat load_lanes(int dtype, const void *restrict x, int64_t at) {
    vfloat v;
    if (dtype == BF16) {
        vhalf h;
        memcpy(&h, (const uint16_t *)x + at, sizeof h);
        return (vfloat)(__builtin_convertvector(h, vuint) << 16);
    }
    if (dtype == F32) {
        memcpy(&v, (const float *)x + at, sizeof v);
        return v;
    }
    for (int j = 0; j < LANES; j++) v[j] = load(dtype, x, at + j);
    return v;
}

INLINE vfloat pick(vint mask, vfloat a, vfloat b) { return (vfloat)(((vint)a & mask) | ((vint)b & ~mask)); }

INLINE int extremes_lanes(int dtype, const void *restrict x, int64_t at, int64_t n, float *low, float *high) {
    vfloat lo = load_lanes(dtype, x, at), hi = lo;
    vint nan = lo != lo;
    for (int64_t k = LANES; k < n; k += LANES) {
        vfloat v = load_lanes(dtype, x, at + k);
        lo = pick(v < lo, v, lo);
        hi = pick(v > hi, v, hi);
        nan |= v != v;
    }
    float l = lo[0], h = hi[0];
    int any = 0;
    for (int j = 0; j < LANES; j++) {
        l = lo[j] < l ? lo[j] : l;
        h = hi[j] > h ? hi[j] : h;
        any |= nan[j];
    }
    *low = l;
    *high = h;
    return any != 0;
}

INLINE void encode_values(int dtype, const void *restrict x, int64_t T, int64_t H, int64_t D, int64_t g, int bits,
                          const float *table, uint8_t *restrict codes, uint8_t *restrict scale, uint16_t *restrict zero, uint8_t *restrict q,
                          Extremes *ex) {
    float qmax = (float)((1 << bits) - 1);
    const int64_t C = H * D, GD = (D + g - 1) / g;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t base = t * C + h * D;
            for (int64_t j = 0; j < GD; j++) {
                const int64_t d0 = j * g, n = D - d0 < g ? D - d0 : g;
                float low, high;
                ex->nan |= n % LANES ? extremes_of(dtype, x, base + d0, n, &low, &high)
                                     : extremes_lanes(dtype, x, base + d0, n, &low, &high);
                ex->low = low < ex->low ? low : ex->low;
                ex->high = high > ex->high ? high : ex->high;
                const int64_t at = (t * H + h) * GD + j;
                Coding c = group_params(table, low, high, qmax, zero + at, scale + at);
                for (int64_t k = 0; k < n; k++) q[h * D + d0 + k] = code(load(dtype, x, base + d0 + k), c);
            }
        }
        put_codes(codes, bits, t * C, q, C);
    }
}

/* Encode x ([T, H, D] of dtype) into codes, scale and zero (the caller's, sized as affine.py sizes them).
 * extremes gets x's smallest and largest element; returns 1 if x holds a NaN (the outputs are then
 * meaningless and the caller raises), -1 if out of memory, 0 otherwise. */
int pdflow_affine_encode(int dtype, const void *restrict x, int64_t T, int64_t H, int64_t D, int keys, int64_t g, int bits,
                         const float *table, uint8_t *restrict codes, uint8_t *restrict scale, uint16_t *restrict zero, float *extremes) {
    const int64_t C = H * D;
    uint8_t *q = malloc((size_t)C);
    float *lo = keys ? malloc((size_t)C * sizeof(float) * 2) : NULL;
    Coding *cod = keys ? malloc((size_t)C * sizeof(Coding)) : NULL;
    if (!q || (keys && (!lo || !cod))) { free(q); free(lo); free(cod); return -1; }
    Extremes ex = {load(dtype, x, 0), load(dtype, x, 0), 0};
    if (keys) {
        switch (dtype) {
        case BF16: encode_keys(BF16, x, T, C, g, bits, table, codes, scale, zero, lo, lo + C, cod, q, &ex); break;
        case F16: encode_keys(F16, x, T, C, g, bits, table, codes, scale, zero, lo, lo + C, cod, q, &ex); break;
        default: encode_keys(F32, x, T, C, g, bits, table, codes, scale, zero, lo, lo + C, cod, q, &ex);
        }
    } else {
        switch (dtype) {
        case BF16: encode_values(BF16, x, T, H, D, g, bits, table, codes, scale, zero, q, &ex); break;
        case F16: encode_values(F16, x, T, H, D, g, bits, table, codes, scale, zero, q, &ex); break;
        default: encode_values(F32, x, T, H, D, g, bits, table, codes, scale, zero, q, &ex);
        }
    }
    free(q); free(lo); free(cod);
    extremes[0] = ex.low;
    extremes[1] = ex.high;
    return ex.nan ? 1 : 0;
}

INLINE void decode_keys(int dtype, void *restrict out, int64_t T, int64_t C, int64_t g, int bits, const float *table,
                        const uint8_t *restrict codes, const uint8_t *restrict scale, const uint16_t *restrict zero, float *restrict zf, float *restrict sf,
                        uint8_t *restrict q) {
    for (int64_t t0 = 0; t0 < T; t0 += g) {
        const int64_t n = T - t0 < g ? T - t0 : g, grp = t0 / g * C;
        for (int64_t c = 0; c < C; c++) { zf[c] = half_value(zero[grp + c]); sf[c] = table[scale[grp + c]]; }
        for (int64_t t = 0; t < n; t++) {
            const int64_t row = (t0 + t) * C;
            get_codes_row(codes, bits, row, q, C);
            for (int64_t c = 0; c < C; c++) store(dtype, out, row + c, fmaf((float)q[c], sf[c], zf[c]));
        }
    }
}

INLINE void decode_values(int dtype, void *restrict out, int64_t T, int64_t H, int64_t D, int64_t g, int bits,
                          const float *table, const uint8_t *restrict codes, const uint8_t *restrict scale, const uint16_t *restrict zero,
                          uint8_t *restrict q) {
    const int64_t C = H * D, GD = (D + g - 1) / g;
    for (int64_t t = 0; t < T; t++) {
        get_codes_row(codes, bits, t * C, q, C);
        for (int64_t h = 0; h < H; h++) {
            for (int64_t j = 0; j < GD; j++) {
                const int64_t d0 = j * g, n = D - d0 < g ? D - d0 : g, at = (t * H + h) * GD + j;
                const float z = half_value(zero[at]), s = table[scale[at]];
                const int64_t first = h * D + d0;
                for (int64_t k = 0; k < n; k++) store(dtype, out, t * C + first + k, fmaf((float)q[first + k], s, z));
            }
        }
    }
}

/* Decode codes, scale and zero into out ([T, H, D] of dtype). Returns -1 if out of memory, else 0. */
int pdflow_affine_decode(int dtype, void *restrict out, int64_t T, int64_t H, int64_t D, int keys, int64_t g, int bits,
                         const float *table, const uint8_t *restrict codes, const uint8_t *restrict scale, const uint16_t *zero) {
    const int64_t C = H * D;
    uint8_t *q = malloc((size_t)C);
    float *f = keys ? malloc((size_t)C * sizeof(float) * 2) : NULL;
    if (!q || (keys && !f)) { free(q); free(f); return -1; }
    if (keys) {
        switch (dtype) {
        case BF16: decode_keys(BF16, out, T, C, g, bits, table, codes, scale, zero, f, f + C, q); break;
        case F16: decode_keys(F16, out, T, C, g, bits, table, codes, scale, zero, f, f + C, q); break;
        default: decode_keys(F32, out, T, C, g, bits, table, codes, scale, zero, f, f + C, q);
        }
    } else {
        switch (dtype) {
        case BF16: decode_values(BF16, out, T, H, D, g, bits, table, codes, scale, zero, q); break;
        case F16: decode_values(F16, out, T, H, D, g, bits, table, codes, scale, zero, q); break;
        default: decode_values(F32, out, T, H, D, g, bits, table, codes, scale, zero, q);
        }
    }
    free(q); free(f);
    return 0;
}
