/* Fused float32 kernels over stored rows, called through ctypes by deltakit/engine/fused.py.

   The inputs are row blocks as stored (bfloat16 or float32); each kernel converts them to float32 in tiles
   that stay in the L1 cache, computes, and writes the output dtype, so a block is one pass over memory
   instead of one per torch operation. The arithmetic is IEEE float32 in the order mergekit's torch code
   runs it, one rounding per operation (built with -ffp-contract=off: no fused multiply-adds; -fno-trapping-math only
   lets gcc vectorize selects, the values are IEEE's), so the
   results are the bits of fused.py's torch path; a fused multiply-add only where asked for (fmaf, one rounding).
   ctypes releases the GIL for the call. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 1024
#define MAX_INPUTS 16

enum { DK_FLOAT32 = 0, DK_BFLOAT16 = 1 };

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define DK_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DK_CLONES
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void load(const void *src, int dtype, int64_t first, int len, float *dst) {
    if (dtype == DK_BFLOAT16) {
        const uint16_t *s = (const uint16_t *)src + first;
        for (int k = 0; k < len; k++) dst[k] = bf16_to_f32(s[k]);
    } else {
        memcpy(dst, (const float *)src + first, (size_t)len * sizeof(float));
    }
}

static inline void store(void *dst, int dtype, int64_t first, int len, const float *src) {
    if (dtype == DK_BFLOAT16) {
        uint16_t *d = (uint16_t *)dst + first;
        for (int k = 0; k < len; k++) d[k] = f32_to_bf16(src[k]);
    } else {
        memcpy((float *)dst + first, src, (size_t)len * sizeof(float));
    }
}

/* out = b + (sum_i w[i] * (x[i] - b)) / divisor * scale, with b = base, or without a base
   (sum_i w[i] * x[i]) / divisor * scale. The first product is rounded; each next one is rounded and added
   (left to right), or with fma added in one rounding: fmaf(v, w[i], acc). */
DK_CLONES
void dk_combine(int n, const void *const *x, const float *w, const void *base, int in_dtype, float divisor,
                float scale, int fma, void *out, int out_dtype, int64_t count) {
    float acc[TILE], v[TILE], b[TILE];
    for (int64_t first = 0; first < count; first += TILE) {
        int len = count - first < TILE ? (int)(count - first) : TILE;
        if (base) load(base, in_dtype, first, len, b);
        for (int i = 0; i < n; i++) {
            load(x[i], in_dtype, first, len, v);
            if (base)
                for (int k = 0; k < len; k++) v[k] = v[k] - b[k];
            const float wi = w[i];
            if (i == 0)
                for (int k = 0; k < len; k++) acc[k] = v[k] * wi;
            else if (fma)
                for (int k = 0; k < len; k++) acc[k] = fmaf(v[k], wi, acc[k]);
            else
                for (int k = 0; k < len; k++) acc[k] = acc[k] + v[k] * wi;
        }
        for (int k = 0; k < len; k++) acc[k] = acc[k] / divisor * scale;
        if (base)
            for (int k = 0; k < len; k++) acc[k] = acc[k] + b[k];
        store(out, out_dtype, first, len, acc);
    }
}

/* mergekit's nearswap of x toward base (a): w = clamp(t * (1 / max(|a - x|, 1e-6)), 0, 1), out = w x + (1 - w) a.
   torch's t / tensor is a reciprocal, then a product; NaN passes through the clamps, as torch's clamp. */
DK_CLONES
void dk_nearswap(const void *x, const void *base, int in_dtype, float t, void *out, int out_dtype, int64_t count) {
    float a[TILE], v[TILE], r[TILE];
    const float lo = 1e-6f;
    for (int64_t first = 0; first < count; first += TILE) {
        int len = count - first < TILE ? (int)(count - first) : TILE;
        load(base, in_dtype, first, len, a);
        load(x, in_dtype, first, len, v);
        for (int k = 0; k < len; k++) r[k] = fabsf(a[k] - v[k]); /* one simple loop per step: each vectorizes */
        for (int k = 0; k < len; k++) r[k] = r[k] < lo ? lo : r[k];
        for (int k = 0; k < len; k++) r[k] = (1.0f / r[k]) * t;
        for (int k = 0; k < len; k++) r[k] = r[k] < 0.0f ? 0.0f : r[k];
        for (int k = 0; k < len; k++) r[k] = r[k] > 1.0f ? 1.0f : r[k];
        for (int k = 0; k < len; k++) r[k] = r[k] * v[k] + (1.0f - r[k]) * a[k];
        store(out, out_dtype, first, len, r);
    }
}

/* gram[i * n + j] += <v_i, v_j> for i <= j (the lower triangle mirrored), v_i = x[i] - base (rounded to float32)
   or x[i]; the products and their sums in float64. A product of two float32 values is exact in float64, so adding it
   by fused multiply-add (one instruction) rounds as adding the product does. */
DK_CLONES
void dk_gram(int n, const void *const *x, const void *base, int in_dtype, int64_t count, double *gram) {
    float v[MAX_INPUTS][TILE];
    float b[TILE];
    double total[MAX_INPUTS * MAX_INPUTS] = {0};
    for (int64_t first = 0; first < count; first += TILE) {
        int len = count - first < TILE ? (int)(count - first) : TILE;
        if (base) load(base, in_dtype, first, len, b);
        for (int i = 0; i < n; i++) {
            load(x[i], in_dtype, first, len, v[i]);
            if (base)
                for (int k = 0; k < len; k++) v[i][k] = v[i][k] - b[k];
        }
        if (n == 2) { /* one loop for the three products of two inputs: each entry widened once */
            double s00 = 0.0, s10 = 0.0, s11 = 0.0;
            const float *p = v[0], *q = v[1];
#pragma omp simd reduction(+ : s00, s10, s11)
            for (int k = 0; k < len; k++) {
                double a = p[k], c = q[k];
                s00 = fma(a, a, s00);
                s10 = fma(c, a, s10);
                s11 = fma(c, c, s11);
            }
            total[0] += s00;
            total[2] += s10;
            total[3] += s11;
            continue;
        }
        for (int i = 0; i < n; i++)
            for (int j = 0; j <= i; j++) {
                double s = 0.0;
                const float *p = v[i], *q = v[j];
#pragma omp simd reduction(+ : s)
                for (int k = 0; k < len; k++) s = fma((double)p[k], (double)q[k], s);
                total[i * n + j] += s;
            }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++) {
            gram[i * n + j] += total[i * n + j];
            if (j != i) gram[j * n + i] += total[i * n + j];
        }
}

/* torch.rand(count, generator=torch.Generator().manual_seed(seed)) on the CPU: torch's mt19937 seeded with the seed's
   low 32 bits, one 32-bit draw per entry, u = (r & (2^24 - 1)) * 2^-24 (exact in float32). */
DK_CLONES
void dk_uniform(uint64_t seed, int64_t count, float *out) {
    uint32_t s[624];
    s[0] = (uint32_t)seed;
    for (int i = 1; i < 624; i++) s[i] = 1812433253u * (s[i - 1] ^ (s[i - 1] >> 30)) + (uint32_t)i;
    for (int64_t first = 0; first < count; first += 624) {
        /* the twist, a new state of 624 words, in runs that each vectorize (the last word wraps to s[0]) */
        for (int i = 0; i < 227; i++) {
            uint32_t y = (s[i] & 0x80000000u) | (s[i + 1] & 0x7fffffffu);
            s[i] = s[i + 397] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
        }
        for (int i = 227; i < 623; i++) {
            uint32_t y = (s[i] & 0x80000000u) | (s[i + 1] & 0x7fffffffu);
            s[i] = s[i - 227] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
        }
        uint32_t y = (s[623] & 0x80000000u) | (s[0] & 0x7fffffffu);
        s[623] = s[396] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
        int len = count - first < 624 ? (int)(count - first) : 624;
        float *o = out + first;
        for (int i = 0; i < len; i++) {
            uint32_t t = s[i];
            t ^= t >> 11;
            t ^= (t << 7) & 0x9d2c5680u;
            t ^= (t << 15) & 0xefc60000u;
            t ^= t >> 18;
            o[i] = (float)(int32_t)(t & 0xffffffu) * (1.0f / 16777216.0f);
        }
    }
}

/* Stable ranks of m non-negative float32 magnitudes (their bit patterns order as they do; 31 bits): an LSD radix sort
   of (key << 32 | position) in digits of 11, 10 and 10 bits, skipping a pass whose digit all keys share. A pass whose
   digit most keys share (bf16 deltas: the low bits are nearly always 0) keeps that bucket's position in a register
   while the digit repeats, instead of a chain of counter updates through memory. pair and tmp hold m entries. */
static void stable_ranks(const float *a, int64_t m, uint64_t *pair, uint64_t *tmp, int32_t *rank) {
    static const int shift[3] = {0, 11, 21}, width[3] = {11, 10, 10};
    uint32_t hist[3][2048];
    memset(hist, 0, sizeof hist);
    for (int64_t j = 0; j < m; j++) {
        uint32_t key;
        memcpy(&key, &a[j], sizeof key);
        pair[j] = (uint64_t)key << 32 | (uint64_t)j;
        hist[0][key & 2047u]++;
        hist[1][(key >> 11) & 1023u]++;
        hist[2][(key >> 21) & 1023u]++;
    }
    for (int d = 0; d < 3; d++) {
        const uint32_t mask = (1u << width[d]) - 1u;
        const int sh = 32 + shift[d];
        uint32_t *h = hist[d], at = 0, most = 0;
        if (h[(uint32_t)(pair[0] >> sh) & mask] == (uint32_t)m) continue;
        for (uint32_t b = 0; b <= mask; b++) {
            uint32_t c = h[b];
            most = c > most ? c : most;
            h[b] = at;
            at += c;
        }
        if (most > (uint32_t)(m - m / 8)) {
            uint32_t cur = (uint32_t)(pair[0] >> sh) & mask, pos = h[cur];
            for (int64_t j = 0; j < m; j++) {
                uint64_t p = pair[j];
                uint32_t b = (uint32_t)(p >> sh) & mask;
                if (b != cur) {
                    h[cur] = pos;
                    cur = b;
                    pos = h[b];
                }
                tmp[pos++] = p;
            }
        } else {
            for (int64_t j = 0; j < m; j++) {
                uint64_t p = pair[j];
                tmp[h[(uint32_t)(p >> sh) & mask]++] = p;
            }
        }
        uint64_t *t = pair;
        pair = tmp;
        tmp = t;
    }
    for (int64_t j = 0; j < m; j++) rank[(uint32_t)pair[j]] = (int32_t)j;
}

/* the float64 sums of a[0..len) and of the kept entries of a, added to sums[0] and sums[1] */
static inline void add_sums(const uint8_t *keep, const float *a, int64_t len, double *sums) {
    double s0 = 0.0, s1 = 0.0;
#pragma omp simd reduction(+ : s0, s1)
    for (int64_t k = 0; k < len; k++) {
        s0 += (double)a[k];
        s1 += keep[k] ? (double)a[k] : 0.0;
    }
    sums[0] += s0;
    sums[1] += s1;
}

/* keep[0..len) (0/1 bytes) as the bits from bit `first` on, a multiple of 8 */
static inline void pack_bits(const uint8_t *keep, int64_t first, int64_t len, uint8_t *bits) {
    uint8_t *o = bits + first / 8;
    int64_t full = len / 8;
    for (int64_t q = 0; q < full; q++) {
        const uint8_t *k8 = keep + 8 * q;
        o[q] = (uint8_t)(k8[0] | k8[1] << 1 | k8[2] << 2 | k8[3] << 3 | k8[4] << 4 | k8[5] << 5 | k8[6] << 6 | k8[7] << 7);
    }
    if (len % 8) {
        uint8_t last = 0;
        for (int64_t k = 8 * full; k < len; k++) last |= (uint8_t)(keep[k] << (k - 8 * full));
        o[full] = last;
    }
}

/* The keep mask of a DARE or DELLA delta d = x - base, as bits (entry k is bit k % 8 of byte k / 8), and the float64
   sums of |d| and of the kept |d| (sums[0], sums[1], added to). u holds one uniform per entry.
   DARE (della = 0): keep = u < density. DELLA: along each row of m entries keep = (u - lo) / step < r in float64, r the
   entry's stable rank by |d| in its row (0 = smallest).
   Returns -1 when the buffers of DELLA's rows cannot be allocated, else 0. */
DK_CLONES
int dk_sparse_mask(const void *x, const void *base, int in_dtype, const float *u, float density, int della, double lo,
                   double step, int64_t m, int64_t count, uint8_t *bits, double *sums) {
    if (!della) {
        float v[TILE], b[TILE];
        uint8_t keep[TILE];
        for (int64_t first = 0; first < count; first += TILE) {
            int len = count - first < TILE ? (int)(count - first) : TILE;
            load(x, in_dtype, first, len, v);
            load(base, in_dtype, first, len, b);
            for (int k = 0; k < len; k++) v[k] = fabsf(v[k] - b[k]);
            for (int k = 0; k < len; k++) keep[k] = u[first + k] < density;
            add_sums(keep, v, len, sums);
            pack_bits(keep, first, len, bits);
        }
        return 0;
    }
    if (m > INT32_MAX) return -1;
    float *a = malloc((size_t)m * sizeof *a), *row = malloc((size_t)m * sizeof *row);
    uint64_t *pair = malloc((size_t)m * sizeof *pair), *tmp = malloc((size_t)m * sizeof *tmp);
    int32_t *rank = malloc((size_t)m * sizeof *rank);
    uint8_t *keep = malloc((size_t)count);
    int ok = a && row && pair && tmp && rank && keep;
    for (int64_t first = 0; ok && first < count; first += m) {
        load(x, in_dtype, first, (int)m, a);
        load(base, in_dtype, first, (int)m, row);
        for (int64_t j = 0; j < m; j++) a[j] = fabsf(a[j] - row[j]);
        stable_ranks(a, m, pair, tmp, rank);
        const float *uf = u + first;
        uint8_t *k8 = keep + first;
        for (int64_t j = 0; j < m; j++) k8[j] = ((double)uf[j] - lo) / step < (double)rank[j];
        add_sums(k8, a, m, sums);
    }
    if (ok) pack_bits(keep, 0, count, bits);
    free(a); free(row); free(pair); free(tmp); free(rank); free(keep);
    return ok ? 0 : -1;
}

/* KEEP[b]: byte b's eight bits as 0/1 floats, entry l bit l (filled when the library is loaded) */
static float KEEP[256][8];

__attribute__((constructor)) static void fill_keep(void) {
    for (int b = 0; b < 256; b++)
        for (int l = 0; l < 8; l++) KEEP[b][l] = (float)((b >> l) & 1);
}

/* TIES and DARE's mix of sparsified deltas, the torch operations of deltakit.engine.fused.sparse_combine in their order:
   d_i = (x_i - b) * keep_i * factor[i] * w[i] (keep_i from bits[i], all kept where bits[i] is NULL; each product
   rounded), summed left to right. Without consensus: divided by divisor when normalize; with it, the sign of the sum is
   elected (>= 0: +) and only the terms of that sign are summed, divided (normalize) by the sum of their weights
   (1 where none). Then times scale (skipped for 1) and b added back. One simple loop per step, so each vectorizes. */
DK_CLONES
void dk_sparse_combine(int n, const void *const *x, const float *w, const float *factor, const uint8_t *const *bits,
                       const void *base, int in_dtype, int consensus, int normalize, float divisor, float scale,
                       void *out, int out_dtype, int64_t count) {
    float b[TILE], v[TILE], kf[TILE], total[TILE], pos[TILE], neg[TILE], wpos[TILE], wneg[TILE];
    for (int64_t first = 0; first < count; first += TILE) {
        int len = count - first < TILE ? (int)(count - first) : TILE;
        load(base, in_dtype, first, len, b);
        for (int i = 0; i < n; i++) {
            const float wi = w[i], fi = factor[i];
            load(x[i], in_dtype, first, len, v);
            for (int k = 0; k < len; k++) v[k] = v[k] - b[k];
            if (bits[i]) {
                const uint8_t *by = bits[i] + first / 8;
                for (int q = 0; q < (len + 7) / 8; q++) memcpy(kf + 8 * q, KEEP[by[q]], sizeof KEEP[0]);
                for (int k = 0; k < len; k++) v[k] = v[k] * kf[k];
            }
            for (int k = 0; k < len; k++) v[k] = v[k] * fi;
            for (int k = 0; k < len; k++) v[k] = v[k] * wi;
            if (i == 0)
                memcpy(total, v, (size_t)len * sizeof(float));
            else
                for (int k = 0; k < len; k++) total[k] = total[k] + v[k];
            if (!consensus) continue;
            if (i == 0) {
                for (int k = 0; k < len; k++) pos[k] = v[k] < 0.0f ? 0.0f : v[k];
                for (int k = 0; k < len; k++) neg[k] = v[k] > 0.0f ? 0.0f : v[k];
                for (int k = 0; k < len; k++) wpos[k] = (v[k] > 0.0f ? 1.0f : 0.0f) * wi;
                for (int k = 0; k < len; k++) wneg[k] = (v[k] < 0.0f ? 1.0f : 0.0f) * wi;
            } else {
                for (int k = 0; k < len; k++) pos[k] = pos[k] + (v[k] < 0.0f ? 0.0f : v[k]);
                for (int k = 0; k < len; k++) neg[k] = neg[k] + (v[k] > 0.0f ? 0.0f : v[k]);
                for (int k = 0; k < len; k++) wpos[k] = wpos[k] + (v[k] > 0.0f ? 1.0f : 0.0f) * wi;
                for (int k = 0; k < len; k++) wneg[k] = wneg[k] + (v[k] < 0.0f ? 1.0f : 0.0f) * wi;
            }
        }
        if (!consensus) {
            if (normalize)
                for (int k = 0; k < len; k++) total[k] = total[k] / divisor;
        } else {
            /* kf, v: the 0/1 masks of an elected + and an elected - */
            for (int k = 0; k < len; k++) kf[k] = total[k] >= 0.0f ? 1.0f : 0.0f;
            for (int k = 0; k < len; k++) v[k] = total[k] < 0.0f ? 1.0f : 0.0f;
            for (int k = 0; k < len; k++) total[k] = pos[k] * kf[k] + neg[k] * v[k];
            if (normalize) {
                for (int k = 0; k < len; k++) wpos[k] = wpos[k] * kf[k] + wneg[k] * v[k];
                for (int k = 0; k < len; k++) wpos[k] = wpos[k] + (wpos[k] == 0.0f ? 1.0f : 0.0f);
                for (int k = 0; k < len; k++) total[k] = total[k] / wpos[k];
            }
        }
        if (scale != 1.0f)
            for (int k = 0; k < len; k++) total[k] = total[k] * scale;
        for (int k = 0; k < len; k++) total[k] = total[k] + b[k];
        store(out, out_dtype, first, len, total);
    }
}

int dk_max_inputs(void) { return MAX_INPUTS; }

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "deltakit's fused kernels (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
