/* Few-row matrix products for CPU decoding: y (M, N) = x (M, K) @ w (N, K)^T (+ bias), with int8 weights
 * (times per-row scales) or fp32 weights.
 *
 * Decoding multiplies every weight matrix by one row per running sequence, so its time should be the
 * time to stream the weights from memory. PyTorch's int8 kernel for that shape
 * (aten._weight_int8pack_mm) converts each weight byte to float and stays at 9-18 GB/s out of cache
 * on the 2-core EPYC of BENCHMARKS.md, where a plain sum reads 25-50 GB/s: one core converting bytes
 * to floats cannot keep up with memory. This kernel multiplies bytes with AVX512-VNNI instead.
 *
 * fp32 weights at 2-16 rows (a server's decode batch): oneDNN's linear reads weights at 7-12 GB/s there.
 * Such a product is nearly compute-bound on this CPU (8 rows do 16 FLOPs per 4-byte weight; MKL's best
 * sgemm does 127 GFLOP/s on 2 cores), so the kernel must both keep the FMA units busy and have the
 * weights arrive in time: see neoj_rowmatmul_f32.
 *
 * Built on first use by neoj/rowmatmul.py with the system C compiler for the CPU it runs on; its
 * OpenMP loop runs on the libgomp PyTorch has already loaded, so it shares PyTorch's threads.
 */
#include <stdint.h>
#include <immintrin.h>

#define MAX_ROWS 4 /* activation rows per pass over a weight row */

/* int8 weights with AVX512-VNNI: each block of 256 activations is scaled to 15-bit integers
 * v = xh * 128 + xl (xh signed, xl in 0..127) and multiplied with the weight bytes by vpdpbusd, which
 * needs one unsigned operand: the weights are read as q ^ 0x80 = q + 128, and the 128 * sum(v) that
 * adds is taken off at the end. 15 bits per 256-value block keep activations about 100x finer than
 * the bf16 that aten._weight_int8pack_mm takes, with 2-3x fewer instructions per weight byte than
 * converting every weight to float, which is what bounds a core below the memory bandwidth.
 * Returns 0, or -1 where this CPU (or K not a multiple of 256) cannot take it. */
#define QBLOCK 256
/* Weight bytes prefetched into L2 ahead of one- and two-row products: with the hardware prefetcher alone,
 * 8192-wide rows read 20 GB/s, with this 23-29 (at 3+ rows the kernel is compute-bound and it only hurts). */
#define I8_AHEAD 16384
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

static void quantize_row(const void *x, long K, int bf16, int8_t *xh, int8_t *xl, float *xs, double *corr) {
    double c = 0;
    float xb[QBLOCK];
    for (long b = 0; b < K / QBLOCK; b++) {
        for (int j = 0; j < QBLOCK; j++) xb[j] = get(x, b * QBLOCK + j, bf16);
        float amax = 0;
        for (int j = 0; j < QBLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float scale = amax > 0 ? amax / 16383.0f : 0.0f, inv = amax > 0 ? 16383.0f / amax : 0.0f;
        long vsum = 0;
        for (int j = 0; j < QBLOCK; j++) {
            int v = (int)lrintf(xb[j] * inv);
            v = v > 16383 ? 16383 : (v < -16383 ? -16383 : v);
            xh[b * QBLOCK + j] = (int8_t)(v >> 7); /* arithmetic shift: floor(v / 128) */
            xl[b * QBLOCK + j] = (int8_t)(v & 127);
            vsum += v;
        }
        xs[b] = scale;
        c += 128.0 * (double)vsum * scale;
    }
    *corr = c;
}

/* Sums over activation blocks [b0, b1) of `mc` rows against one weight row; out[m] gets the sums. */
static inline __attribute__((always_inline)) void vnni_rows(
    const int8_t *w, long K, long b0, long b1, int mc, const int8_t *xh, const int8_t *xl, const float *xs,
    float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[MAX_ROWS];
    for (int m = 0; m < mc; m++) acc[m] = _mm512_setzero_ps();
    for (long b = b0; b < b1; b++) {
        __m512i hi[MAX_ROWS], lo[MAX_ROWS];
        for (int m = 0; m < mc; m++) hi[m] = lo[m] = _mm512_setzero_si512();
        for (int c = 0; c < QBLOCK; c += 64) {
            long k = b * QBLOCK + c;
            if (mc <= 2) _mm_prefetch((const char *)(w + k + I8_AHEAD), _MM_HINT_T1);
            __m512i u = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + k)), flip);
            for (int m = 0; m < mc; m++) {
                hi[m] = _mm512_dpbusd_epi32(hi[m], u, _mm512_loadu_si512((const void *)(xh + m * K + k)));
                lo[m] = _mm512_dpbusd_epi32(lo[m], u, _mm512_loadu_si512((const void *)(xl + m * K + k)));
            }
        }
        for (int m = 0; m < mc; m++) {
            __m512i t = _mm512_add_epi32(_mm512_slli_epi32(hi[m], 7), lo[m]);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(xs[m * (K / QBLOCK) + b]), acc[m]);
        }
    }
    for (int m = 0; m < mc; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

/* One activation row against two weight rows at once: each activation load serves both rows, which
 * matters once the activations (2 bytes per value) no longer fit in L1 beside the streaming weights. */
static void vnni_pair(const int8_t *w0, const int8_t *w1, long K, const int8_t *xh, const int8_t *xl,
                      const float *xs, float *out0, float *out1) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (long b = 0; b < K / QBLOCK; b++) {
        __m512i hi0 = _mm512_setzero_si512(), lo0 = hi0, hi1 = hi0, lo1 = hi0;
        for (int c = 0; c < QBLOCK; c += 64) {
            long k = b * QBLOCK + c;
            _mm_prefetch((const char *)(w0 + k + I8_AHEAD), _MM_HINT_T1);
            _mm_prefetch((const char *)(w1 + k + I8_AHEAD), _MM_HINT_T1);
            __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w0 + k)), flip);
            __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w1 + k)), flip);
            __m512i h = _mm512_loadu_si512((const void *)(xh + k)), l = _mm512_loadu_si512((const void *)(xl + k));
            hi0 = _mm512_dpbusd_epi32(hi0, u0, h);
            lo0 = _mm512_dpbusd_epi32(lo0, u0, l);
            hi1 = _mm512_dpbusd_epi32(hi1, u1, h);
            lo1 = _mm512_dpbusd_epi32(lo1, u1, l);
        }
        __m512 sc = _mm512_set1_ps(xs[b]);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi0, 7), lo0)), sc, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi1, 7), lo1)), sc, acc1);
    }
    *out0 = _mm512_reduce_add_ps(acc0);
    *out1 = _mm512_reduce_add_ps(acc1);
}

int neoj_rowmatmul_i8_vnni(const void *x, long M, long K, const int8_t *w, long N, const float *scale,
                           const void *bias, void *y, int bf16) {
    if (K % QBLOCK) return -1;
    long nb = K / QBLOCK;
    int8_t *xh = malloc(2 * M * K);
    float *xs = malloc(sizeof(float) * M * nb);
    double *corr = malloc(sizeof(double) * M);
    if (!xh || !xs || !corr) { free(xh); free(xs); free(corr); return -1; }
    int8_t *xl = xh + M * K;
    for (long m = 0; m < M; m++) quantize_row((const char *)x + m * K * (bf16 ? 2 : 4), K, bf16, xh + m * K, xl + m * K, xs + m * nb, corr + m);
    if (M == 1 && K > 4096) { /* wide rows: see vnni_pair */
        #pragma omp parallel for schedule(static) if (N * K >= 32768)
        for (long p = 0; p < (N + 1) / 2; p++) {
            long n0 = 2 * p, n1 = n0 + 1 < N ? n0 + 1 : n0; /* an odd last row is done twice */
            float s0, s1;
            vnni_pair(w + n0 * K, w + n1 * K, K, xh, xl, xs, &s0, &s1);
            put(y, n0, (float)((s0 - corr[0]) * scale[n0]) + (bias ? get(bias, n0, bf16) : 0.0f), bf16);
            put(y, n1, (float)((s1 - corr[0]) * scale[n1]) + (bias ? get(bias, n1, bf16) : 0.0f), bf16);
        }
        free(xh); free(xs); free(corr);
        return 0;
    }
    #pragma omp parallel for schedule(static) if (N * K >= 32768)
    for (long n = 0; n < N; n++) {
        for (long m0 = 0; m0 < M; m0 += MAX_ROWS) {
            float s[MAX_ROWS];
            const int8_t *h = xh + m0 * K, *l = xl + m0 * K;
            const float *sc = xs + m0 * nb;
            long mc = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
            switch (mc) {
            case 1: vnni_rows(w + n * K, K, 0, nb, 1, h, l, sc, s); break;
            case 2: vnni_rows(w + n * K, K, 0, nb, 2, h, l, sc, s); break;
            case 3: vnni_rows(w + n * K, K, 0, nb, 3, h, l, sc, s); break;
            default: vnni_rows(w + n * K, K, 0, nb, 4, h, l, sc, s); break;
            }
            for (long m = 0; m < mc; m++)
                put(y, (m0 + m) * N + n,
                    (float)((s[m] - corr[m0 + m]) * scale[n]) + (bias ? get(bias, n, bf16) : 0.0f), bf16);
        }
    }
    free(xh); free(xs); free(corr);
    return 0;
}
int neoj_rowmatmul_has_vnni(void) { return 1; }
#else
int neoj_rowmatmul_has_vnni(void) { return 0; }
int neoj_rowmatmul_i8_vnni(const void *x, long M, long K, const int8_t *w, long N, const float *scale,
                           const void *bias, void *y, int bf16) {
    (void)x; (void)M; (void)K; (void)w; (void)N; (void)scale; (void)bias; (void)y; (void)bf16;
    return -1;
}
#endif


/* fp32: three weight rows x up to eight activation rows of accumulators (24 of the 32 registers), so each
 * weight vector loaded feeds 8 FMAs and each activation vector 3; the 24 sums are reduced once per tile.
 * The hardware prefetcher alone lets the FMAs and the memory reads take turns (about 10 GB/s at 8 rows,
 * 2 cores); software prefetches into L2, 16 KB ahead of each weight stream, overlap them (18-28 GB/s at
 * 8 rows, 25-31 at one; prefetching into L1 instead reached only 16-20). */
#if defined(__AVX512F__)
#define F32_NR 3
#define F32_MR 8
#define F32_AHEAD 4096 /* floats: 16 KB */
static inline __attribute__((always_inline)) void f32_tile(const float *x, int mc, int nr, long K,
                                                           const float *w, float *s) {
    __m512 acc[F32_NR][F32_MR];
    for (int r = 0; r < F32_NR; r++)
        for (int m = 0; m < F32_MR; m++)
            if (r < nr && m < mc) acc[r][m] = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16) {
        __m512 u[F32_NR];
        for (int r = 0; r < F32_NR; r++)
            if (r < nr) {
                _mm_prefetch((const char *)(w + r * K + k + F32_AHEAD), _MM_HINT_T1);
                u[r] = _mm512_loadu_ps(w + r * K + k);
            }
        for (int m = 0; m < F32_MR; m++)
            if (m < mc) {
                __m512 xv = _mm512_loadu_ps(x + m * K + k);
                for (int r = 0; r < F32_NR; r++)
                    if (r < nr) acc[r][m] = _mm512_fmadd_ps(u[r], xv, acc[r][m]);
            }
    }
    for (int r = 0; r < F32_NR; r++)
        for (int m = 0; m < F32_MR; m++)
            if (r < nr && m < mc) s[r * F32_MR + m] = _mm512_reduce_add_ps(acc[r][m]);
}

/* Dispatches to a tile specialised for its row counts, so the accumulators stay in registers. */
static void f32_tile_any(const float *x, int mc, int nr, long K, const float *w, float *s) {
#define F32_CASE(M) \
    case M: \
        if (nr == 3) f32_tile(x, M, 3, K, w, s); \
        else if (nr == 2) f32_tile(x, M, 2, K, w, s); \
        else f32_tile(x, M, 1, K, w, s); \
        break;
    switch (mc) {
        F32_CASE(1) F32_CASE(2) F32_CASE(3) F32_CASE(4) F32_CASE(5) F32_CASE(6) F32_CASE(7)
        default: F32_CASE(8)
    }
#undef F32_CASE
}

/* y (M, N) = x (M, K) @ w (N, K)^T + bias, all fp32 and contiguous; K a multiple of 16. Each row of y
 * is summed in the same order whatever M is, so a sequence gets the same values alone or in a batch. */
int neoj_rowmatmul_f32(const float *x, long M, long K, const float *w, long N, const float *bias, float *y) {
    if (K % 16 || M < 1) return -1;
    long tiles = (N + F32_NR - 1) / F32_NR;
    #pragma omp parallel for schedule(static) if (N * K >= 32768)
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
int neoj_rowmatmul_has_f32(void) { return 1; }
#else
int neoj_rowmatmul_has_f32(void) { return 0; }
int neoj_rowmatmul_f32(const float *x, long M, long K, const float *w, long N, const float *bias, float *y) {
    (void)x; (void)M; (void)K; (void)w; (void)N; (void)bias; (void)y;
    return -1;
}
#endif
