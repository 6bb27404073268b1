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

/* Scales one row of K activations (K a multiple of QBLOCK) block by block: v gets the 15-bit values,
 * xs the scale of each block (x ~ v * xs), and vsum (if not NULL) each block's sum of v. */
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
