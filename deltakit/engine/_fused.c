/* Fused float32 kernels over stored rows, called through ctypes by deltakit/engine/fused.py.

   The inputs are row blocks as stored (bfloat16 or float32); each kernel converts them to float32 in tiles
   that stay in the L1 cache, computes, and writes the output dtype, so a block is one pass over memory
   instead of one per torch operation. The arithmetic is IEEE float32 in the order mergekit's torch code
   runs it, one rounding per operation (built with -ffp-contract=off: no fused multiply-adds), so the
   results are the bits of fused.py's torch path; a fused multiply-add only where asked for (fmaf, one rounding).
   ctypes releases the GIL for the call. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
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
   or x[i]; the products and their sums in float64 (a product of two float32 values is exact in float64). */
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
        for (int i = 0; i < n; i++)
            for (int j = 0; j <= i; j++) {
                double s = 0.0;
                const float *p = v[i], *q = v[j];
#pragma omp simd reduction(+ : s)
                for (int k = 0; k < len; k++) s += (double)p[k] * (double)q[k];
                total[i * n + j] += s;
            }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++) {
            gram[i * n + j] += total[i * n + j];
            if (j != i) gram[j * n + i] += total[i * n + j];
        }
}

int dk_max_inputs(void) { return MAX_INPUTS; }

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "deltakit's fused kernels (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
