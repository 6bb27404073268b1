/* Few-row matrix products for CPU decoding on x86-64: y (M, N) = x (M, K) @ w (N, K)^T (+ bias), with
 * int8 weights (times per-row scales) or fp32 weights.
 *
 * Decoding multiplies every weight matrix by one row per running sequence, so its time should be the
 * time to stream the weights from memory. PyTorch's int8 kernel for that shape
 * (aten._weight_int8pack_mm) converts each weight byte to float and cannot keep up with memory on one
 * core; these kernels multiply integers instead. fp32 weights at 2-16 rows (a server's decode batch)
 * are nearly compute-bound, so that kernel must both keep the FMA units busy and have the weights arrive
 * in time (software prefetches into L2 ahead of each weight stream).
 *
 * One source, three builds (flags in neoj/rowmatmul.py, chosen at run time by the CPU's features):
 *   avx2         -mavx2 -mfma: 8-lane fp32 FMAs; int8 weights widened to 16 bits and multiplied with
 *                the 15-bit activations by vpmaddwd.
 *   avx512       + AVX-512F/BW/VL/DQ: the same at 16 lanes (32 weights per multiply-add).
 *   avx512_vnni  + AVX512-VNNI: int8 weights multiplied as bytes by vpdpbusd (see the VNNI section).
 * Their OpenMP loops run on the libgomp PyTorch has already loaded, so they share PyTorch's threads.
 */
#include <immintrin.h>

#include "rowmatmul_common.c" /* shared code, included: not a library of its own */

#if !defined(__AVX2__) || !defined(__FMA__)
#error "rowmatmul_x86.c needs at least -mavx2 -mfma"
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VARIANT "avx512_vnni"
#elif defined(__AVX512F__) && defined(__AVX512BW__)
#define VARIANT "avx512"
#else
#define VARIANT "avx2"
#endif

const char *neoj_rowmatmul_variant(void) { return VARIANT; }
int neoj_rowmatmul_abi(void) { return NEOJ_ROWMATMUL_ABI; }

/* The sum of 8 fp32 lanes, always in the same order, so a row's sum depends on nothing but its inputs. */
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- vectors: fp32 lanes of the widest registers this build has ---- */

#if defined(__AVX512F__)
#define VF 16
typedef __m512 vf;
#define vf_zero() _mm512_setzero_ps()
#define vf_load(p) _mm512_loadu_ps(p)
#define vf_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vf_set1(s) _mm512_set1_ps(s)
#define vf_store(p, v) _mm512_storeu_ps(p, v)
static inline float vf_sum(vf v) { return _mm512_reduce_add_ps(v); }
#else
#define VF 8
typedef __m256 vf;
#define vf_zero() _mm256_setzero_ps()
#define vf_load(p) _mm256_loadu_ps(p)
#define vf_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vf_set1(s) _mm256_set1_ps(s)
#define vf_store(p, v) _mm256_storeu_ps(p, v)
static inline float vf_sum(vf v) { return sum8(v); }
#endif

/* =============================== fp32 ===============================
 * F32_NR weight rows x up to F32_MR activation rows of accumulators (AVX-512: 3 x 8 = 24 of its 32
 * registers; AVX2: 3 x 4 = 12 of 16), so each weight vector loaded feeds F32_MR FMAs and each activation
 * vector F32_NR; the sums are reduced once per tile. The hardware prefetcher alone lets the FMAs and the
 * memory reads take turns; software prefetches into L2, 16 KB ahead of each weight stream, overlap them
 * (BENCHMARKS.md, bench_f32_kernel). */
#define F32_NR 3
#if VF == 16
#define F32_MR 8
#else
#define F32_MR 4
#endif
#define F32_AHEAD 4096 /* floats: 16 KB */

static inline __attribute__((always_inline)) void f32_tile(const float *x, int mc, int nr, long K,
                                                           const float *w, float *s) {
    vf acc[F32_NR][F32_MR];
    for (int r = 0; r < F32_NR; r++)
        for (int m = 0; m < F32_MR; m++)
            if (r < nr && m < mc) acc[r][m] = vf_zero();
    for (long k = 0; k < K; k += VF) {
        vf u[F32_NR];
        for (int r = 0; r < F32_NR; r++)
            if (r < nr) {
                if (VF == 16 || (k & 15) == 0) _mm_prefetch((const char *)(w + r * K + k + F32_AHEAD), _MM_HINT_T1);
                u[r] = vf_load(w + r * K + k);
            }
        for (int m = 0; m < F32_MR; m++)
            if (m < mc) {
                vf xv = vf_load(x + m * K + k);
                for (int r = 0; r < F32_NR; r++)
                    if (r < nr) acc[r][m] = vf_fma(u[r], xv, acc[r][m]);
            }
    }
    for (int r = 0; r < F32_NR; r++)
        for (int m = 0; m < F32_MR; m++)
            if (r < nr && m < mc) s[r * F32_MR + m] = vf_sum(acc[r][m]);
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
        F32_CASE(1) F32_CASE(2) F32_CASE(3)
#if F32_MR == 8
        F32_CASE(4) F32_CASE(5) F32_CASE(6) F32_CASE(7)
        default: F32_CASE(8)
#else
        default: F32_CASE(4)
#endif
    }
#undef F32_CASE
}

/* One activation row (batch-1 decode) is bound by memory alone. There the tile above (3 rows, a prefetch
 * 16 KB ahead in each row's stream) read 0.80-0.85 of a plain sequential read of the same weights. A tile of
 * weight rows whose prefetches walk the weights in address order, two tiles ahead, does better; 4 rows with
 * the prefetches into L2 read 0.96-0.98 of it, 6 rows into L1 0.91-0.94 (AMD EPYC, 2 threads, A/B over one
 * decode step's worth of GPT-J-arch weights out of cache, AVX2 and AVX-512 builds; per layer shape against
 * oneDNN and a plain read: BENCHMARKS.md, bench_f32_kernel).
 * Each sum is the tile's, term for term (one accumulator per output, the same vf_sum), so a row's values do
 * not depend on M. */
#define F32_ROW_NR 4
#define F32_ROW_AHEAD (2 * F32_ROW_NR) /* weight rows: the prefetches run two tiles ahead */

static inline __attribute__((always_inline)) void f32_row_tile(const float *x, int nr, long K, const float *w,
                                                               const float *ahead, float *s) {
    vf acc[F32_ROW_NR];
    for (int r = 0; r < F32_ROW_NR; r++)
        if (r < nr) acc[r] = vf_zero();
    for (long k = 0; k < K; k += VF) {
        if (ahead) /* the lines this step reads, F32_ROW_AHEAD rows further on, in address order */
            for (int line = 0; line < F32_ROW_NR * VF / 16; line++)
                _mm_prefetch((const char *)(ahead + k * F32_ROW_NR + 16 * line), _MM_HINT_T1);
        vf xv = vf_load(x + k);
        for (int r = 0; r < F32_ROW_NR; r++)
            if (r < nr) acc[r] = vf_fma(vf_load(w + r * K + k), xv, acc[r]);
    }
    for (int r = 0; r < F32_ROW_NR; r++)
        if (r < nr) s[r] = vf_sum(acc[r]);
}

static void f32_one_row(const float *x, long K, const float *w, long N, const float *bias, float *y) {
    long tiles = (N + F32_ROW_NR - 1) / F32_ROW_NR;
    #pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (long t = 0; t < tiles; t++) {
        long n0 = t * F32_ROW_NR;
        int nr = N - n0 < F32_ROW_NR ? (int)(N - n0) : F32_ROW_NR;
        float s[F32_ROW_NR];
        if (nr == F32_ROW_NR) {
            const float *ahead = n0 + F32_ROW_AHEAD + F32_ROW_NR <= N ? w + (n0 + F32_ROW_AHEAD) * K : 0;
            f32_row_tile(x, F32_ROW_NR, K, w + n0 * K, ahead, s);
        } else {
            for (int r = 0; r < nr; r++) f32_row_tile(x, 1, K, w + (n0 + r) * K, 0, s + r);
        }
        for (int r = 0; r < nr; r++) y[n0 + r] = s[r] + (bias ? bias[n0 + r] : 0.0f);
    }
}

/* y (M, N) = x (M, K) @ w (N, K)^T + bias, all fp32 and contiguous; K a multiple of 16. Each row of y
 * is summed in the same order whatever M is, so a sequence gets the same values alone or in a batch. */
int neoj_rowmatmul_f32(const float *x, long M, long K, const float *w, long N, const float *bias, float *y) {
    if (K % 16 || M < 1) return -1;
    if (M == 1) {
        f32_one_row(x, K, w, N, bias, y);
        return 0;
    }
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

/* =============================== int8 ===============================
 * neoj_rowmatmul_i8: y (M, N) = x (M, K) @ (w (N, K) int8 * scale (N,))^T + bias; x, bias and y all
 * fp32 or all bf16; K a multiple of QBLOCK. Returns 0, or -1 where it cannot take the product. */

/* Weight bytes prefetched into L2 ahead of the products, at every row count: with the hardware prefetcher
 * alone, 8192-wide rows read 20 GB/s at one row, with this 23-29; and at 8 rows, where the kernels are
 * compute-bound, the weights still arrive late without it (AMD EPYC, 2 threads, 50400x2048 at 8 rows: VNNI
 * int8 8.0 -> 3.1 ms, AVX2 int8 5.9 -> 5.4 ms, int4 7.0 -> 4.9 ms). */
#define I8_AHEAD 16384

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* int8 weights with AVX512-VNNI: the 15-bit activations are split as v = xh * 128 + xl (xh signed, xl in
 * 0..127) and multiplied with the weight bytes by vpdpbusd, which needs one unsigned operand: the
 * weights are read as q ^ 0x80 = q + 128, and the 128 * sum(v) that adds is taken off at the end. 2-3x
 * fewer instructions per weight byte than converting every weight to float, which is what bounds a
 * core below the memory bandwidth. */
#define MAX_ROWS 4 /* activation rows per pass over a weight row */

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
            _mm_prefetch((const char *)(w + k + I8_AHEAD), _MM_HINT_T1);
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

int neoj_rowmatmul_i8(const void *x, long M, long K, const int8_t *w, long N, const float *scale,
                      const void *bias, void *y, int bf16) {
    if (K % QBLOCK || M < 1) return -1;
    long nb = K / QBLOCK;
    qacts a;
    if (qacts_make(&a, x, M, K, bf16)) return -1;
    int8_t *xh = malloc(2 * M * K);
    double *corr = malloc(sizeof(double) * M);
    if (!xh || !corr) { free(xh); free(corr); qacts_free(&a); return -1; }
    int8_t *xl = xh + M * K;
    const float *xs = a.xs;
    for (long m = 0; m < M; m++) {
        double c = 0;
        for (long j = 0; j < K; j++) {
            int v = a.v[m * K + j];
            xh[m * K + j] = (int8_t)(v >> 7); /* arithmetic shift: floor(v / 128) */
            xl[m * K + j] = (int8_t)(v & 127);
        }
        for (long b = 0; b < nb; b++) c += 128.0 * (double)a.vsum[m * nb + b] * xs[m * nb + b];
        corr[m] = c;
    }
    if (M == 1 && K > 4096) { /* wide rows: see vnni_pair */
        #pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
        for (long p = 0; p < (N + 1) / 2; p++) {
            long n0 = 2 * p, n1 = n0 + 1 < N ? n0 + 1 : n0; /* an odd last row is done twice */
            float s0, s1;
            vnni_pair(w + n0 * K, w + n1 * K, K, xh, xl, xs, &s0, &s1);
            put(y, n0, (float)((s0 - corr[0]) * scale[n0]) + (bias ? get(bias, n0, bf16) : 0.0f), bf16);
            put(y, n1, (float)((s1 - corr[0]) * scale[n1]) + (bias ? get(bias, n1, bf16) : 0.0f), bf16);
        }
        free(xh); free(corr); qacts_free(&a);
        return 0;
    }
    #pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
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
    free(xh); free(corr); qacts_free(&a);
    return 0;
}

#else
/* int8 weights without VNNI: each weight byte is sign-extended to 16 bits in the register and multiplied
 * with the 15-bit activations by vpmaddwd (16-bit products summed in pairs to 32 bits, no saturation),
 * so a block's integer sum is exact, the same as the VNNI kernel's. One widening serves a group of activation
 * rows, so rows beyond the first cost one multiply-add and one add per vector each. I8_NR weight rows share
 * each activation load (which matters once the activations, 2 bytes per value, no longer fit in L1 beside
 * the streaming weights); I8_G activation rows share each weight widening. */
#if defined(__AVX512BW__)
#define IV 32 /* weights per multiply-add */
typedef __m512i vi;
#define vi_zero() _mm512_setzero_si512()
#define vi_widen(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define vi_load16(p) _mm512_loadu_si512((const void *)(p))
#define vi_madd(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#define vf_from_vi(a) _mm512_cvtepi32_ps(a)
#else
#define IV 16
typedef __m256i vi;
#define vi_zero() _mm256_setzero_si256()
#define vi_widen(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define vi_load16(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi_madd(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define vf_from_vi(a) _mm256_cvtepi32_ps(a)
#endif
/* A tile is `nr` weight rows x all M activation rows (up to I8_MAXM per pass). Block by block (QBLOCK
 * weights of each row), the activation rows go in groups of I8_G: a group's integer sums (nr x g registers)
 * take each widened weight vector g times and each activation load nr times, and the block's weights
 * (nr x 256 bytes) come from memory once and stay in L1 for the other groups. Reading the weights once per
 * tile rather than once per group of rows made 8 rows 1.2-1.5x faster on AVX2 (BENCHMARKS.md, int8 decode
 * kernel, avx2). The fp32 sums across blocks stay in memory, touched once per block and group, so nothing
 * spills inside the loop. One activation row takes I8_NR1 weight rows at a time (more weight streams in
 * flight for the memory-bound product). A row's sums are exact integers per block added in block order, so
 * its result is the same for every tile shape and group, alone or in a batch. */
#define I8_NR1 4
#define I8_MAXM 16
#if IV == 32
#define I8_NR 4 /* AVX-512's 32 registers: 4 x 4 sums */
#define I8_G 4
#else
#define I8_NR 3 /* AVX2's 16 registers: 3 x 3 sums, 3 widened weights, 1 activation vector */
#define I8_G 3
#endif
#define I8_MAX_NR 4
#define VL (IV / 2) /* int32 (and fp32) lanes of a vector */

/* One block's integer sums of `g` activation rows (v, row stride K) against `nr` weight rows, from k0. */
static inline __attribute__((always_inline)) void i8_group(const int8_t *w, long K, int nr, int g, long k0,
                                                           const int16_t *v, vi t[I8_MAX_NR][I8_G]) {
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < g; m++) t[r][m] = vi_zero();
    _Pragma("GCC unroll 4")
    for (int c = 0; c < QBLOCK; c += IV) {
        long k = k0 + c;
        vi u[I8_MAX_NR];
        for (int r = 0; r < nr; r++) u[r] = vi_widen(w + r * K + k);
        for (int m = 0; m < g; m++) {
            vi xv = vi_load16(v + m * K + k);
            for (int r = 0; r < nr; r++) t[r][m] = vi_madd(t[r][m], u[r], xv);
        }
    }
}

/* Dispatches a group to the variant specialised for its row count, so its sums stay in registers. */
static inline __attribute__((always_inline)) void i8_group_any(const int8_t *w, long K, int nr, int g, long k0,
                                                               const int16_t *v, vi t[I8_MAX_NR][I8_G]) {
    switch (g) {
    case 1: i8_group(w, K, nr, 1, k0, v, t); break;
    case 2: i8_group(w, K, nr, 2, k0, v, t); break;
#if I8_G > 3
    case 3: i8_group(w, K, nr, 3, k0, v, t); break;
#endif
    default: i8_group(w, K, nr, I8_G, k0, v, t); break;
    }
}

/* s[r * I8_MAXM + m] = the sum over K of weight row r times activation row m (scaled per block by xs), for
 * nr weight rows and mc <= I8_MAXM activation rows. */
static inline __attribute__((always_inline)) void i8_tile(const int8_t *w, long K, int nr, int mc,
                                                          const int16_t *v, const float *xs, float *s) {
    long nb = K / QBLOCK;
    float sums[I8_MAX_NR][I8_MAXM][VL] __attribute__((aligned(64)));
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++)
            for (int l = 0; l < VL; l++) sums[r][m][l] = 0;
    for (long b = 0; b < nb; b++) {
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < QBLOCK; c += 64)
                _mm_prefetch((const char *)(w + r * K + b * QBLOCK + c + I8_AHEAD), _MM_HINT_T1);
        for (int m0 = 0; m0 < mc; m0 += I8_G) {
            int g = mc - m0 < I8_G ? mc - m0 : I8_G;
            vi t[I8_MAX_NR][I8_G];
            i8_group_any(w, K, nr, g, b * QBLOCK, v + m0 * K, t);
            for (int m = 0; m < g; m++) {
                vf sc = vf_set1(xs[(m0 + m) * nb + b]);
                for (int r = 0; r < nr; r++)
                    vf_store(sums[r][m0 + m], vf_fma(vf_from_vi(t[r][m]), sc, vf_load(sums[r][m0 + m])));
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) s[r * I8_MAXM + m] = vf_sum(vf_load(sums[r][m]));
}

/* Dispatches to a tile specialised for its weight row count (nr <= I8_MAX_NR). */
static void i8_tile_any(const int8_t *w, long K, int nr, int mc, const int16_t *v, const float *xs, float *s) {
    switch (nr) {
    case 4: i8_tile(w, K, 4, mc, v, xs, s); break;
    case 3: i8_tile(w, K, 3, mc, v, xs, s); break;
    case 2: i8_tile(w, K, 2, mc, v, xs, s); break;
    default: i8_tile(w, K, 1, mc, v, xs, s); break;
    }
}

int neoj_rowmatmul_i8(const void *x, long M, long K, const int8_t *w, long N, const float *scale,
                      const void *bias, void *y, int bf16) {
    if (K % QBLOCK || M < 1) return -1;
    long nb = K / QBLOCK;
    qacts a;
    if (qacts_make(&a, x, M, K, bf16)) return -1;
    int tile_nr = M == 1 ? I8_NR1 : I8_NR;
    long tiles = (N + tile_nr - 1) / tile_nr;
    #pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (long t = 0; t < tiles; t++) {
        long n0 = t * tile_nr;
        int nr = N - n0 < tile_nr ? (int)(N - n0) : tile_nr;
        for (long m0 = 0; m0 < M; m0 += I8_MAXM) {
            float s[I8_MAX_NR * I8_MAXM];
            int mc = M - m0 < I8_MAXM ? (int)(M - m0) : I8_MAXM;
            i8_tile_any(w + n0 * K, K, nr, mc, a.v + m0 * K, a.xs + m0 * nb, s);
            for (int m = 0; m < mc; m++)
                for (int r = 0; r < nr; r++)
                    put(y, (m0 + m) * N + n0 + r,
                        s[r * I8_MAXM + m] * scale[n0 + r] + (bias ? get(bias, n0 + r, bf16) : 0.0f), bf16);
        }
    }
    qacts_free(&a);
    return 0;
}
#endif

/* =============================== int4 ===============================
 * neoj_rowmatmul_i4: y (M, N) = x (M, K) @ w^T + bias for int4 weights in neoj's portable form: w (N, K / 2)
 * bytes, each holding two 4-bit values q (the even column in the high nibble), and per group of `gs` columns
 * a scale and a min, weight = q * scale + min. x, bias and y all fp32 or all bf16; K a multiple of QBLOCK,
 * gs (32..256) a divisor of QBLOCK.
 *
 * Activations are scaled per weight group to 8 bits, v = round(x * 127 / max|x|) (x ~ v * xs). A group's sum
 * of q * x is taken as (q - 8) * x + 8 * x: the first part is (exact integer sum of q * v - 8 * sum of v) * weight
 * scale * xs, the second 8 * the group's fp32 sum of x, so the 8-bit rounding meets only the centred
 * nibbles (|q - 8| <= 8, half the error of meeting q itself). Its sum of min * x is min * that fp32 sum. Per
 * row the per-group terms apart from the integer sum, min * xsum + scale * 8 * (xsum - xs * sum of v), are
 * added once at the end. The nibbles (0..15) are unsigned bytes and the
 * activations signed ones, so one instruction multiplies 32 pairs of them: vpmaddubsw on AVX2 (16-bit pair
 * sums, at most 2 * 15 * 127, kept in 16 bits for a group: 256 columns sum to at most 30480 < 2^15), vpdpbusd
 * (32-bit sums of 4) on AVX512-VNNI. That is half the multiply-adds per weight of the int8 kernel, whose
 * 15-bit activations need 16-bit multiplies: int4 is already 16 levels a weight, and 8-bit activations per
 * group add an error several times smaller than the weights' own rounding (bench_int4_kernel's error
 * columns).
 *
 * Activations are laid out per 64 columns as their 32 even columns, then their 32 odd ones, to meet the
 * high and the low nibbles of 32 weight bytes. A group of 32 columns is half such a step: it is the low
 * 128-bit half of the registers, the next group the high half, so the flush scales each half by its own
 * group's factor. Tiles as the int8 kernel's (see above): I4_NR weight rows x groups of I4_G activation rows,
 * every row of the batch per weight block, the fp32 sums per group added in group order, so a row's result
 * is the same alone or in a batch. */
#define I4_NR1 4
#if defined(__AVX512VL__)
#define I4_NR 4 /* 32 registers: 4 x 4 sums, 8 nibble vectors */
#else
#define I4_NR 2 /* 16 registers: 2 x 4 sums, 4 nibble vectors, 2 activation vectors, the nibble mask */
#endif
#define I4_G 4 /* activation rows a weight load serves: one fold of four (i4_fold4) */
#define I4_MAXM 16
#define I4_MAX_NR 4
#define I4_STEP 64 /* columns per step: 32 weight bytes */

/* One step's sums of a weight group: `nr` weight rows (row stride kb bytes) x `g` activation rows of v (the
 * laid-out 8-bit activations, row stride K), columns [k0, k0 + span), span a multiple of I4_STEP. AVX2 keeps
 * 16-bit pair sums (vpmaddubsw), VNNI 32-bit sums (vpdpbusd). */
static inline __attribute__((always_inline)) void i4_group(const uint8_t *w, long kb, int nr, int g, long k0,
                                                           long span, const int8_t *v, long K,
                                                           __m256i t[I4_MAX_NR][I4_G]) {
    const __m256i low = _mm256_set1_epi8(15);
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < g; m++) t[r][m] = _mm256_setzero_si256();
    for (long c = 0; c < span; c += I4_STEP) {
        long k = k0 + c;
        __m256i hi[I4_MAX_NR], lo[I4_MAX_NR];
        for (int r = 0; r < nr; r++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(w + r * kb + k / 2));
            hi[r] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            lo[r] = _mm256_and_si256(b, low);
        }
        for (int m = 0; m < g; m++) {
            __m256i even = _mm256_loadu_si256((const __m256i *)(v + m * K + k));
            __m256i odd = _mm256_loadu_si256((const __m256i *)(v + m * K + k + 32));
            for (int r = 0; r < nr; r++) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                t[r][m] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(t[r][m], hi[r], even), lo[r], odd);
#else
                t[r][m] = _mm256_add_epi16(t[r][m], _mm256_add_epi16(_mm256_maddubs_epi16(hi[r], even),
                                                                     _mm256_maddubs_epi16(lo[r], odd)));
#endif
            }
        }
    }
}

/* Four accumulators' sums (as i4_group leaves them) folded into one fp32 vector: lanes i and i + 4 hold
 * accumulator i's sums over the registers' low and high halves. Integers until the conversion, so exact. */
static inline __m256 i4_fold4(__m256i a, __m256i b, __m256i c, __m256i d) {
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
    const __m256i one = _mm256_set1_epi16(1); /* 16-bit pair sums to 32 bits */
    a = _mm256_madd_epi16(a, one);
    b = _mm256_madd_epi16(b, one);
    c = _mm256_madd_epi16(c, one);
    d = _mm256_madd_epi16(d, one);
#endif
    return _mm256_cvtepi32_ps(_mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d)));
}

static inline __attribute__((always_inline)) void i4_group_any(const uint8_t *w, long kb, int nr, int g, long k0,
                                                               long span, const int8_t *v, long K,
                                                               __m256i t[I4_MAX_NR][I4_G]) {
    switch (g) {
    case 1: i4_group(w, kb, nr, 1, k0, span, v, K, t); break;
    case 2: i4_group(w, kb, nr, 2, k0, span, v, K, t); break;
    case 3: i4_group(w, kb, nr, 3, k0, span, v, K, t); break;
    default: i4_group(w, kb, nr, I4_G, k0, span, v, K, t); break;
    }
}

/* The activations' side of an int4 product, made once per call. */
typedef struct {
    int8_t *v;      /* (M, K) 8-bit activations, each 64 columns laid out as their 32 even, then 32 odd ones */
    float *xsq;     /* each group's activation scale (x ~ v * xs) by quads of rows: (M / 4 rounded up, K / gs, 4),
                     * 0 past row M, so a fold's four rows' scales are one load */
    float *xsum;    /* (M, K / gs): each group's fp32 sum of x */
    float *xfix;    /* (M, K / gs): 8 * (xsum - xs * the group's sum of v), what the centred nibbles leave */
} i4acts;

static void i4acts_free(i4acts *a) {
    free(a->v);
    free(a->xsq);
    free(a->xsum);
    free(a->xfix);
}

/* Scales one row of activations to 8 bits per group of gs (a NaN is skipped for the scale and becomes 0, as in
 * quantize_row; the group's fp32 sum keeps it). Group g's scale goes to xs[g * 4] (the quad layout). */
static void i4_quantize_row(const void *x, long K, long gs, int bf16, int8_t *v, float *xs, float *xsum,
                            float *xfix) {
    float xb[QBLOCK];
    for (long g = 0; g < K / gs; g++) {
        float amax = 0, sum = 0;
        for (long j = 0; j < gs; j++) {
            xb[j] = get(x, g * gs + j, bf16);
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
            sum += xb[j];
        }
        float inv = amax > 0 ? 127.0f / amax : 0.0f;
        xs[g * 4] = amax > 0 ? amax / 127.0f : 0.0f;
        xsum[g] = sum;
        long vsum = 0;
        for (long j = 0; j < gs; j++) {
            float q = rintf(xb[j] * inv);
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            q = q == q ? q : 0.0f;
            long k = g * gs + j, c = k % I4_STEP;
            v[k - c + (c & 1 ? 32 : 0) + c / 2] = (int8_t)q;
            vsum += (long)q;
        }
        xfix[g] = (float)(8.0 * ((double)sum - (double)xs[g * 4] * (double)vsum));
    }
}

static int i4acts_make(i4acts *a, const void *x, long M, long K, long gs, int bf16) {
    long ng = K / gs;
    a->v = malloc((size_t)M * K);
    long quads = (M + 3) / 4;
    a->xsq = calloc(quads * ng * 4, sizeof(float));
    a->xsum = malloc(sizeof(float) * M * ng);
    a->xfix = malloc(sizeof(float) * M * ng);
    if (!a->v || !a->xsq || !a->xsum || !a->xfix) {
        i4acts_free(a);
        return -1;
    }
    #pragma omp parallel for schedule(static) if (M * K >= PARALLEL_MIN_WEIGHTS)
    for (long m = 0; m < M; m++)
        i4_quantize_row((const char *)x + m * K * (bf16 ? 2 : 4), K, gs, bf16, a->v + m * K,
                        a->xsq + (m / 4) * ng * 4 + m % 4,
                        a->xsum + m * ng, a->xfix + m * ng);
    return 0;
}

/* The fp32 factors of a fold over four rows of one weight row r: lane i (i + 4) is row r's weight scale times
 * activation row i's scale, for the group of the low (high) half (per: groups per step, 1 or 2). */
static inline __m256 i4_factors_rows(const float *sc, const float *xq, int per) {
    if (per == 1) return _mm256_mul_ps(_mm256_set1_ps(sc[0]), _mm256_broadcast_ps((const __m128 *)xq));
    return _mm256_mul_ps(_mm256_setr_m128(_mm_set1_ps(sc[0]), _mm_set1_ps(sc[1])), _mm256_loadu_ps(xq));
}

/* The same for a fold over nr <= 4 weight rows (scales row stride ng) of one activation row, whose group scales
 * xg holds 4 apart (the quad layout); 0 past nr. */
static inline __m256 i4_factors_weights(const float *sc, long ng, int nr, const float *xg, int per) {
    float f[8] __attribute__((aligned(32))) = {0};
    for (int r = 0; r < nr; r++) {
        f[r] = sc[r * ng];
        f[r + 4] = sc[r * ng + per - 1];
    }
    __m256 x = per == 1 ? _mm256_set1_ps(xg[0]) : _mm256_setr_m128(_mm_set1_ps(xg[0]), _mm_set1_ps(xg[4]));
    return _mm256_mul_ps(_mm256_load_ps(f), x);
}

/* A row's terms besides the integer sums, over its ng groups: min * xsum + scale * xfix, 8 groups a vector
 * (then one by one), in the same order for every row. */
static inline float i4_group_terms(const float *mins, const float *scales, const float *xsum, const float *xfix,
                                   long ng) {
    __m256 acc = _mm256_setzero_ps();
    long g = 0;
    for (; g + 8 <= ng; g += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(mins + g), _mm256_loadu_ps(xsum + g),
                              _mm256_fmadd_ps(_mm256_loadu_ps(scales + g), _mm256_loadu_ps(xfix + g), acc));
    float total = sum8(acc);
    for (; g < ng; g++) total += mins[g] * xsum[g] + scales[g] * xfix[g];
    return total;
}

/* s[r * I4_MAXM + m] = row r of the weight times activation row m, for nr weight rows, mc <= I4_MAXM rows.
 * Per step (a group, or two of 32) the integer sums of 4 pairs of rows fold into one fp32 vector, scaled and
 * added to that quad's sums: 4 rows of one weight row, or (one activation row) up to 4 weight rows. */
static inline __attribute__((always_inline)) void i4_tile(const uint8_t *w, long K, long gs, int nr, int mc,
                                                          const i4acts *a, long m_first, const float *scales,
                                                          const float *mins, float *s) {
    long kb = K / 2, ng = K / gs;
    long span = gs < I4_STEP ? I4_STEP : gs; /* columns per step: one group, or two of 32 */
    int per = (int)(span / gs);
    const int8_t *v = a->v + m_first * K;
    const float *xsq = a->xsq + (m_first / 4) * ng * 4;
    int quads = mc == 1 ? 1 : (mc + 3) / 4;
    float sums[I4_MAX_NR][I4_MAXM / 4][8] __attribute__((aligned(32)));
    for (int r = 0; r < I4_MAX_NR; r++)
        for (int q = 0; q < quads; q++)
            for (int l = 0; l < 8; l++) sums[r][q][l] = 0;
    const __m256i zero = _mm256_setzero_si256();
    for (long k0 = 0; k0 < K; k0 += span) {
        long g = k0 / gs;
        for (int r = 0; r < nr; r++)
            for (long c = 0; c < span / 2; c += 64)
                _mm_prefetch((const char *)(w + r * kb + k0 / 2 + c + I8_AHEAD), _MM_HINT_T1);
        if (mc == 1) {
            __m256i t[I4_MAX_NR][I4_G];
            i4_group(w, kb, nr, 1, k0, span, v, K, t);
            __m256 f = i4_factors_weights(scales + g, ng, nr, xsq + g * 4, per);
            __m256 folded = i4_fold4(t[0][0], nr > 1 ? t[1][0] : zero, nr > 2 ? t[2][0] : zero,
                                     nr > 3 ? t[3][0] : zero);
            _mm256_store_ps(sums[0][0], _mm256_fmadd_ps(folded, f, _mm256_load_ps(sums[0][0])));
            continue;
        }
        for (int q = 0; q < quads; q++) {
            int gm = mc - 4 * q < I4_G ? mc - 4 * q : I4_G;
            __m256i t[I4_MAX_NR][I4_G];
            i4_group_any(w, kb, nr, gm, k0, span, v + 4 * q * K, K, t);
            for (int r = 0; r < nr; r++) {
                __m256 f = i4_factors_rows(scales + r * ng + g, xsq + (q * ng + g) * 4, per);
                __m256 folded = i4_fold4(t[r][0], gm > 1 ? t[r][1] : zero, gm > 2 ? t[r][2] : zero,
                                         gm > 3 ? t[r][3] : zero);
                _mm256_store_ps(sums[r][q], _mm256_fmadd_ps(folded, f, _mm256_load_ps(sums[r][q])));
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) {
            const float *lanes = mc == 1 ? sums[0][0] : sums[r][m / 4];
            int i = mc == 1 ? r : m % 4;
            s[r * I4_MAXM + m] = (lanes[i] + lanes[i + 4]) + i4_group_terms(mins + r * ng, scales + r * ng,
                                                                             a->xsum + (m_first + m) * ng,
                                                                             a->xfix + (m_first + m) * ng, ng);
        }
}

static void i4_tile_any(const uint8_t *w, long K, long gs, int nr, int mc, const i4acts *a, long m_first,
                        const float *scales, const float *mins, float *s) {
    switch (nr) {
    case 4: i4_tile(w, K, gs, 4, mc, a, m_first, scales, mins, s); break;
    case 3: i4_tile(w, K, gs, 3, mc, a, m_first, scales, mins, s); break;
    case 2: i4_tile(w, K, gs, 2, mc, a, m_first, scales, mins, s); break;
    default: i4_tile(w, K, gs, 1, mc, a, m_first, scales, mins, s); break;
    }
}

int neoj_rowmatmul_i4(const void *x, long M, long K, const uint8_t *w, long N, long gs, const float *scales,
                      const float *mins, const void *bias, void *y, int bf16) {
    if (K % QBLOCK || M < 1 || gs < 32 || gs > QBLOCK || QBLOCK % gs) return -1;
    long ng = K / gs;
    i4acts a;
    if (i4acts_make(&a, x, M, K, gs, bf16)) return -1;
    int tile_nr = M == 1 ? I4_NR1 : I4_NR;
    long tiles = (N + tile_nr - 1) / tile_nr;
    #pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (long t = 0; t < tiles; t++) {
        long n0 = t * tile_nr;
        int nr = N - n0 < tile_nr ? (int)(N - n0) : tile_nr;
        for (long m0 = 0; m0 < M; m0 += I4_MAXM) {
            float s[I4_MAX_NR * I4_MAXM];
            int mc = M - m0 < I4_MAXM ? (int)(M - m0) : I4_MAXM;
            i4_tile_any(w + n0 * (K / 2), K, gs, nr, mc, &a, m0, scales + n0 * ng, mins + n0 * ng, s);
            for (int m = 0; m < mc; m++)
                for (int r = 0; r < nr; r++)
                    put(y, (m0 + m) * N + n0 + r,
                        s[r * I4_MAXM + m] + (bias ? get(bias, n0 + r, bf16) : 0.0f), bf16);
        }
    }
    i4acts_free(&a);
    return 0;
}
