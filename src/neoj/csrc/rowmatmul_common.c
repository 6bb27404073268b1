/* Shared by every ISA variant of the row kernels, which #include it (rowmatmul_x86.c, rowmatmul_arm.c):
 * bf16/fp32 access and the activation quantization of the int8 products. A .c file rather than a header
 * only so that the package data pattern (every .c file in csrc) ships it; never compiled on its own.
 *
 * Each variant is the same C compiled with explicit ISA flags (-mavx2 -mfma, -mavx512f ..., -march=
 * armv8.2-a+dotprod, never -march=native), so one library runs on every CPU with those features and
 * neoj/rowmatmul.py picks the variant at run time from the CPU's features, as ggml does.
 *
 * int8 products: each block of QBLOCK activations of a row is scaled to 15-bit integers
 * v = round(x * 16383 / max|x|) (v in -16383..16383). A block's sum of q * v over its 256 values is then
 * an exact integer (at most 256 * 127 * 16383 < 2^31), whatever instructions compute it (VNNI byte dot
 * products, 16-bit multiply-adds, NEON dot products), and is scaled once per block in fp32. 15 bits
 * per 256-value block keep activations about 100x finer than the bf16 that aten._weight_int8pack_mm
 * takes.
 */
#ifndef NEOJ_ROWMATMUL_COMMON_H
#define NEOJ_ROWMATMUL_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QBLOCK 256      /* activations per quantization block: K must be a multiple */
#define QMAX 16383      /* largest |v| */
#define NEOJ_ROWMATMUL_ABI 2 /* bumped when an exported signature changes: rowmatmul.py checks it */

/* OpenMP splits a product over threads only from this many weights on: below, the fork costs more. */
#define PARALLEL_MIN_WEIGHTS 32768

/* Activations, bias and output are all fp32 or all bf16 (the model's dtype), so the layer needs no
 * conversions around the call. */
static inline float get(const void *p, long i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void put(void *p, long i, float v, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    /* Round to nearest even, as PyTorch does; NaN stays NaN. */
    ((uint16_t *)p)[i] = v != v ? 0x7fc0 : (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* quantize_row(x, K, bf16, v, xs, vsum) scales one row of K activations (K a multiple of QBLOCK) block by
 * block: v gets the 15-bit values, xs the scale of each block (x ~ v * xs), and vsum (if not NULL) each
 * block's sum of v. Two forms that give the same values bit for bit: AVX2 where the build has it, else C. */
#if defined(__AVX2__)
#include <immintrin.h>

/* 8 activations from p + i as fp32 (bf16 widened: its bits are the high half of an fp32's). */
static inline __m256 load8(const void *p, long i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* quantize_row with AVX2: the same IEEE operations as the C form (|x|, max skipping NaN, x * inv rounded
 * half to even, clamped, NaN to 0), 8 at a time. A decode step quantizes every layer's
 * input before the layer's parallel product, so the scalar loop was a serial few percent of a batch's step. */
static void quantize_row(const void *x, long K, int bf16, int16_t *v, float *xs, long *vsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f), hi = _mm256_set1_ps((float)QMAX), lo = _mm256_set1_ps(-(float)QMAX);
    for (long b = 0; b < K / QBLOCK; b++) {
        long k0 = b * QBLOCK;
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QBLOCK; j += 8) /* max(a, m) returns m where a is NaN: a NaN is skipped */
            m = _mm256_max_ps(_mm256_andnot_ps(sign, load8(x, k0 + j, bf16)), m);
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        float scale = amax > 0 ? amax / (float)QMAX : 0.0f, inv = amax > 0 ? (float)QMAX / amax : 0.0f;
        __m256 vinv = _mm256_set1_ps(inv);
        __m256i total = _mm256_setzero_si256();
        for (int j = 0; j < QBLOCK; j += 16) {
            __m256i q[2];
            for (int u = 0; u < 2; u++) {
                __m256 f = _mm256_round_ps(_mm256_mul_ps(load8(x, k0 + j + 8 * u, bf16), vinv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                f = _mm256_and_ps(f, _mm256_cmp_ps(f, f, _CMP_ORD_Q)); /* NaN: 0 */
                q[u] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(f, lo), hi));
                total = _mm256_add_epi32(total, q[u]);
            }
            /* packs interleaves 128-bit lanes: the permute puts the 16 values back in order */
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
            _mm256_storeu_si256((__m256i *)(v + k0 + j), p);
        }
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        xs[b] = scale;
        if (vsum) vsum[b] = _mm_cvtsi128_si32(t);
    }
}
#else
static void quantize_row(const void *x, long K, int bf16, int16_t *v, float *xs, long *vsum) {
    float xb[QBLOCK];
    for (long b = 0; b < K / QBLOCK; b++) {
        float amax = 0;
        for (int j = 0; j < QBLOCK; j++) {
            xb[j] = get(x, b * QBLOCK + j, bf16);
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax; /* a NaN is skipped, as fmaxf would */
        }
        float scale = amax > 0 ? amax / (float)QMAX : 0.0f, inv = amax > 0 ? (float)QMAX / amax : 0.0f;
        int s = 0;
        for (int j = 0; j < QBLOCK; j++) {
            float q = rintf(xb[j] * inv); /* round half to even, as lrintf did */
            q = q > (float)QMAX ? (float)QMAX : (q < -(float)QMAX ? -(float)QMAX : q);
            q = q == q ? q : 0.0f; /* NaN: a defined value, not an undefined conversion */
            v[b * QBLOCK + j] = (int16_t)q;
            s += (int16_t)q;
        }
        xs[b] = scale;
        if (vsum) vsum[b] = s;
    }
}
#endif

/* The activations of M rows, quantized: v (M, K), xs (M, K / QBLOCK), vsum (M, K / QBLOCK). */
typedef struct {
    int16_t *v;
    float *xs;
    long *vsum;
} qacts;

static void qacts_free(qacts *a) {
    free(a->v);
    free(a->xs);
    free(a->vsum);
}

/* Returns 0 with a filled, or -1 when out of memory (a freed). */
static int qacts_make(qacts *a, const void *x, long M, long K, int bf16) {
    long nb = K / QBLOCK;
    a->v = malloc(sizeof(int16_t) * M * K);
    a->xs = malloc(sizeof(float) * M * nb);
    a->vsum = malloc(sizeof(long) * M * nb);
    if (!a->v || !a->xs || !a->vsum) {
        qacts_free(a);
        return -1;
    }
    for (long m = 0; m < M; m++)
        quantize_row((const char *)x + m * K * (bf16 ? 2 : 4), K, bf16, a->v + m * K, a->xs + m * nb,
                     a->vsum + m * nb);
    return 0;
}

#endif
