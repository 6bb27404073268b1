/* Few-row matrix products for CPU decoding on ARM64 (Graviton, Ampere, Apple silicon under Linux):
 * y (M, N) = x (M, K) @ w (N, K)^T (+ bias), with int8 weights (times per-row scales) or fp32 weights.
 * The same products, tiles and results as rowmatmul_x86.c (see there and rowmatmul_common.c); two builds,
 * chosen at run time by neoj/rowmatmul.py from the CPU's features:
 *   neon          -march=armv8-a: 4-lane fp32 FMAs; int8 weights widened to 16 bits and multiplied with
 *                 the 15-bit activations by smlal (16-bit products accumulated in 32 bits).
 *   neon_dotprod  -march=armv8.2-a+dotprod: int8 weights multiplied as bytes by sdot, with the activations
 *                 split as v = xh * 128 + xl (both signed bytes, so no correction term is needed).
 */
#include <arm_neon.h>

#include "rowmatmul_common.c" /* shared code, included: not a library of its own */

#if !defined(__aarch64__)
#error "rowmatmul_arm.c is for ARM64"
#endif

#if defined(__ARM_FEATURE_DOTPROD)
#define VARIANT "neon_dotprod"
#else
#define VARIANT "neon"
#endif

const char *neoj_rowmatmul_variant(void) { return VARIANT; }
int neoj_rowmatmul_abi(void) { return NEOJ_ROWMATMUL_ABI; }

/* Always the same order of additions, so a row's sum does not depend on anything but its inputs. */
static inline float sum4(float32x4_t v) { return vaddvq_f32(v); }

/* =============================== fp32 =============================== */
#define F32_NR 3
#define F32_MR 4
#define F32_AHEAD 1024 /* floats: 4 KB ahead of each weight stream */

static inline __attribute__((always_inline)) void f32_tile(const float *x, int mc, int nr, long K,
                                                           const float *w, float *s) {
    float32x4_t acc[F32_NR][F32_MR];
    for (int r = 0; r < F32_NR; r++)
        for (int m = 0; m < F32_MR; m++)
            if (r < nr && m < mc) acc[r][m] = vdupq_n_f32(0.0f);
    for (long k = 0; k < K; k += 4) {
        float32x4_t u[F32_NR];
        for (int r = 0; r < F32_NR; r++)
            if (r < nr) {
                if ((k & 15) == 0) __builtin_prefetch(w + r * K + k + F32_AHEAD, 0, 2);
                u[r] = vld1q_f32(w + r * K + k);
            }
        for (int m = 0; m < F32_MR; m++)
            if (m < mc) {
                float32x4_t xv = vld1q_f32(x + m * K + k);
                for (int r = 0; r < F32_NR; r++)
                    if (r < nr) acc[r][m] = vfmaq_f32(acc[r][m], u[r], xv);
            }
    }
    for (int r = 0; r < F32_NR; r++)
        for (int m = 0; m < F32_MR; m++)
            if (r < nr && m < mc) s[r * F32_MR + m] = sum4(acc[r][m]);
}

static void f32_tile_any(const float *x, int mc, int nr, long K, const float *w, float *s) {
#define F32_CASE(M) \
    case M: \
        if (nr == 3) f32_tile(x, M, 3, K, w, s); \
        else if (nr == 2) f32_tile(x, M, 2, K, w, s); \
        else f32_tile(x, M, 1, K, w, s); \
        break;
    switch (mc) {
        F32_CASE(1) F32_CASE(2) F32_CASE(3)
        default: F32_CASE(4)
    }
#undef F32_CASE
}

int neoj_rowmatmul_f32(const float *x, long M, long K, const float *w, long N, const float *bias, float *y) {
    if (K % 16 || M < 1) return -1;
    long tiles = (N + F32_NR - 1) / F32_NR;
    #pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (long t = 0; t < tiles; t++) {
        long n0 = t * F32_NR;
        int nr = N - n0 < F32_NR ? (int)(N - n0) : F32_NR;
        for (long m0 = 0; m0 < M; m0 += F32_MR) {
            float s[F32_NR * F32_MR];
            int mc = M - m0 < F32_MR ? (int)(M - m0) : F32_MR;
            f32_tile_any(x + m0 * K, mc, nr, K, w + n0 * K, s);
            for (int m = 0; m < mc; m++)
                for (int r = 0; r < nr; r++)
                    y[(m0 + m) * N + n0 + r] = s[r * F32_MR + m] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
    return 0;
}

/* =============================== int8 =============================== */
#define I8_NR 4
#define I8_MR 2
#define I8_AHEAD 4096

#if defined(__ARM_FEATURE_DOTPROD)
/* Activations as two signed byte planes per row: xh = v >> 7 (-128..127), xl = v & 127. */
typedef int8_t act_t;
#define ACT_PLANES 2

static inline void i8_block(const int8_t *const *wr, int nr, int mc, const int8_t *v, long K, long k0,
                            int32x4_t t[I8_NR][I8_MR]) {
    int32x4_t hi[I8_NR][I8_MR], lo[I8_NR][I8_MR];
    for (int r = 0; r < I8_NR; r++)
        for (int m = 0; m < I8_MR; m++)
            if (r < nr && m < mc) hi[r][m] = lo[r][m] = vdupq_n_s32(0);
    for (int c = 0; c < QBLOCK; c += 16) {
        long k = k0 + c;
        int8x16_t u[I8_NR];
        for (int r = 0; r < I8_NR; r++)
            if (r < nr) {
                if (mc <= 2 && (c & 63) == 0) __builtin_prefetch(wr[r] + k + I8_AHEAD, 0, 2);
                u[r] = vld1q_s8(wr[r] + k);
            }
        for (int m = 0; m < I8_MR; m++)
            if (m < mc) {
                int8x16_t h = vld1q_s8(v + (2 * m) * K + k), l = vld1q_s8(v + (2 * m + 1) * K + k);
                for (int r = 0; r < I8_NR; r++)
                    if (r < nr) {
                        hi[r][m] = vdotq_s32(hi[r][m], u[r], h);
                        lo[r][m] = vdotq_s32(lo[r][m], u[r], l);
                    }
            }
    }
    for (int r = 0; r < I8_NR; r++)
        for (int m = 0; m < I8_MR; m++)
            if (r < nr && m < mc) t[r][m] = vaddq_s32(vshlq_n_s32(hi[r][m], 7), lo[r][m]);
}
#else
/* Activations as one plane of 16-bit values per row. */
typedef int16_t act_t;
#define ACT_PLANES 1

static inline void i8_block(const int8_t *const *wr, int nr, int mc, const int16_t *v, long K, long k0,
                            int32x4_t t[I8_NR][I8_MR]) {
    for (int r = 0; r < I8_NR; r++)
        for (int m = 0; m < I8_MR; m++)
            if (r < nr && m < mc) t[r][m] = vdupq_n_s32(0);
    for (int c = 0; c < QBLOCK; c += 8) {
        long k = k0 + c;
        int16x8_t u[I8_NR];
        for (int r = 0; r < I8_NR; r++)
            if (r < nr) {
                if (mc <= 2 && (c & 63) == 0) __builtin_prefetch(wr[r] + k + I8_AHEAD, 0, 2);
                u[r] = vmovl_s8(vld1_s8(wr[r] + k));
            }
        for (int m = 0; m < I8_MR; m++)
            if (m < mc) {
                int16x8_t xv = vld1q_s16(v + m * K + k);
                for (int r = 0; r < I8_NR; r++)
                    if (r < nr) {
                        t[r][m] = vmlal_s16(t[r][m], vget_low_s16(u[r]), vget_low_s16(xv));
                        t[r][m] = vmlal_high_s16(t[r][m], u[r], xv);
                    }
            }
    }
}
#endif

/* Sums of `nr` weight rows (row stride K) against `mc` rows of activations; s[r * I8_MR + m]. */
static inline __attribute__((always_inline)) void i8_tile(const int8_t *w, long K, int nr, int mc,
                                                          const act_t *v, const float *xs, float *s) {
    long nb = K / QBLOCK;
    const int8_t *wr[I8_NR];
    for (int r = 0; r < I8_NR; r++) wr[r] = w + (r < nr ? r : 0) * K;
    float32x4_t acc[I8_NR][I8_MR];
    for (int r = 0; r < I8_NR; r++)
        for (int m = 0; m < I8_MR; m++)
            if (r < nr && m < mc) acc[r][m] = vdupq_n_f32(0.0f);
    for (long b = 0; b < nb; b++) {
        int32x4_t t[I8_NR][I8_MR];
        i8_block(wr, nr, mc, v, K, b * QBLOCK, t);
        for (int m = 0; m < I8_MR; m++)
            if (m < mc) {
                float32x4_t sc = vdupq_n_f32(xs[m * nb + b]);
                for (int r = 0; r < I8_NR; r++)
                    if (r < nr) acc[r][m] = vfmaq_f32(acc[r][m], vcvtq_f32_s32(t[r][m]), sc);
            }
    }
    for (int r = 0; r < I8_NR; r++)
        for (int m = 0; m < I8_MR; m++)
            if (r < nr && m < mc) s[r * I8_MR + m] = sum4(acc[r][m]);
}

static void i8_tile_any(const int8_t *w, long K, int nr, int mc, const act_t *v, const float *xs, float *s) {
#define I8_NR_CASE(M) \
    case M: \
        if (nr == 4) i8_tile(w, K, 4, M, v, xs, s); \
        else if (nr == 3) i8_tile(w, K, 3, M, v, xs, s); \
        else if (nr == 2) i8_tile(w, K, 2, M, v, xs, s); \
        else i8_tile(w, K, 1, M, v, xs, s); \
        break;
    switch (mc) {
        I8_NR_CASE(1)
        default: I8_NR_CASE(2)
    }
#undef I8_NR_CASE
}

int neoj_rowmatmul_i8(const void *x, long M, long K, const int8_t *w, long N, const float *scale,
                      const void *bias, void *y, int bf16) {
    if (K % QBLOCK || M < 1) return -1;
    long nb = K / QBLOCK;
    qacts a;
    if (qacts_make(&a, x, M, K, bf16)) return -1;
#if ACT_PLANES == 2
    int8_t *planes = malloc(2 * M * K);
    if (!planes) { qacts_free(&a); return -1; }
    for (long m = 0; m < M; m++)
        for (long j = 0; j < K; j++) {
            int q = a.v[m * K + j];
            planes[(2 * m) * K + j] = (int8_t)(q >> 7); /* arithmetic shift: floor(v / 128) */
            planes[(2 * m + 1) * K + j] = (int8_t)(q & 127);
        }
    const act_t *acts = planes;
#else
    const act_t *acts = a.v;
#endif
    long tiles = (N + I8_NR - 1) / I8_NR;
    #pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (long t = 0; t < tiles; t++) {
        long n0 = t * I8_NR;
        int nr = N - n0 < I8_NR ? (int)(N - n0) : I8_NR;
        for (long m0 = 0; m0 < M; m0 += I8_MR) {
            float s[I8_NR * I8_MR];
            int mc = M - m0 < I8_MR ? (int)(M - m0) : I8_MR;
            i8_tile_any(w + n0 * K, K, nr, mc, acts + ACT_PLANES * m0 * K, a.xs + m0 * nb, s);
            for (int m = 0; m < mc; m++)
                for (int r = 0; r < nr; r++)
                    put(y, (m0 + m) * N + n0 + r,
                        s[r * I8_MR + m] * scale[n0 + r] + (bias ? get(bias, n0 + r, bf16) : 0.0f), bf16);
        }
    }
#if ACT_PLANES == 2
    free(planes);
#endif
    qacts_free(&a);
    return 0;
}
