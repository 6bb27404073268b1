/* A standalone check of one rowmatmul variant, for ISAs the test machine cannot run natively (ARM64 under
 * qemu-user): tests/test_rowmatmul.py compiles it with a variant's source and flags and runs it.
 *
 * For tile remainders of M, N and K it checks, against a double-precision product: fp32 outputs within a
 * few ulps of the largest partial sums; int8 outputs within the 15-bit activation rounding bound; a row's
 * values bit-identical alone and in a batch; bf16 activations giving the fp32 result rounded to bf16.
 * Prints the variant and "ok" and exits 0, or prints the first failure and exits 1.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *neoj_rowmatmul_variant(void);
int neoj_rowmatmul_f32(const float *x, long M, long K, const float *w, long N, const float *bias, float *y);
int neoj_rowmatmul_i8(const void *x, long M, long K, const int8_t *w, long N, const float *scale,
                      const void *bias, void *y, int bf16);

static uint64_t seed = 88172645463325252ull;
static double uniform(void) { /* xorshift64: the same numbers on every machine */
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return (double)(seed >> 11) / 9007199254740992.0;
}
static float gauss(void) { return (float)(sqrt(-2 * log(uniform() + 1e-12)) * cos(6.283185307179586 * uniform())); }

static uint16_t to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static int fail(const char *what, long M, long N, long K, long i, double got, double want, double bound) {
    printf("FAIL %s M=%ld N=%ld K=%ld at %ld: got %.9g want %.9g bound %.3g\n", what, M, N, K, i, got, want, bound);
    return 1;
}

static int check_f32(long M, long N, long K) {
    float *x = malloc(4 * M * K), *w = malloc(4 * N * K), *b = malloc(4 * N), *y = malloc(4 * M * N), *y1 = malloc(4 * N);
    for (long i = 0; i < M * K; i++) x[i] = gauss();
    for (long i = 0; i < N * K; i++) w[i] = gauss();
    for (long i = 0; i < N; i++) b[i] = gauss();
    int bad = neoj_rowmatmul_f32(x, M, K, w, N, b, y) != 0;
    for (long m = 0; m < M && !bad; m++) {
        for (long n = 0; n < N && !bad; n++) {
            double want = b[n], mag = fabs(b[n]);
            for (long k = 0; k < K; k++) {
                want += (double)x[m * K + k] * w[n * K + k];
                mag += fabs((double)x[m * K + k] * w[n * K + k]);
            }
            double bound = 1e-6 * sqrt((double)K) * mag + 1e-6;
            if (fabs(y[m * N + n] - want) > bound) bad = fail("f32", M, N, K, m * N + n, y[m * N + n], want, bound);
        }
        neoj_rowmatmul_f32(x + m * K, 1, K, w, N, b, y1); /* alone: the same bits */
        if (!bad && memcmp(y1, y + m * N, 4 * N)) bad = fail("f32 batch independence", M, N, K, m, 0, 0, 0);
    }
    free(x); free(w); free(b); free(y); free(y1);
    return bad;
}

static int check_i8(long M, long N, long K) {
    float *x = malloc(4 * M * K), *s = malloc(4 * N), *b = malloc(4 * N), *y = malloc(4 * M * N), *y1 = malloc(4 * N);
    int8_t *w = malloc(N * K);
    uint16_t *xb = malloc(2 * M * K), *bb = malloc(2 * N), *yb = malloc(2 * M * N);
    for (long i = 0; i < M * K; i++) x[i] = gauss();
    for (long i = 0; i < N * K; i++) w[i] = (int8_t)((long)(uniform() * 255) - 127);
    for (long i = 0; i < N; i++) { s[i] = (float)uniform() / 100; b[i] = gauss(); }
    int bad = neoj_rowmatmul_i8(x, M, K, w, N, s, b, y, 0) != 0;
    for (long m = 0; m < M && !bad; m++) {
        double amax = 0;
        for (long k = 0; k < K; k++) amax = fmax(amax, fabs(x[m * K + k]));
        for (long n = 0; n < N && !bad; n++) {
            double want = b[n], wsum = 0;
            for (long k = 0; k < K; k++) {
                want += (double)x[m * K + k] * w[n * K + k] * s[n];
                wsum += fabs((double)w[n * K + k] * s[n]);
            }
            /* each activation is rounded to 1/32766 of its block's largest magnitude, plus fp32 rounding */
            double bound = amax * wsum / 32766 + 1e-5 * fabs(want) + 1e-6;
            if (fabs(y[m * N + n] - want) > bound) bad = fail("int8", M, N, K, m * N + n, y[m * N + n], want, bound);
        }
        neoj_rowmatmul_i8(x + m * K, 1, K, w, N, s, b, y1, 0);
        if (!bad && memcmp(y1, y + m * N, 4 * N)) bad = fail("int8 batch independence", M, N, K, m, 0, 0, 0);
    }
    /* bf16 in and out: the fp32 result for the bf16-rounded inputs, rounded to bf16 */
    for (long i = 0; i < M * K; i++) { xb[i] = to_bf16(x[i]); x[i] = from_bf16(xb[i]); }
    for (long i = 0; i < N; i++) { bb[i] = to_bf16(b[i]); b[i] = from_bf16(bb[i]); }
    if (!bad) bad = neoj_rowmatmul_i8(xb, M, K, w, N, s, bb, yb, 1) || neoj_rowmatmul_i8(x, M, K, w, N, s, b, y, 0);
    for (long i = 0; i < M * N && !bad; i++)
        if (yb[i] != to_bf16(y[i])) bad = fail("int8 bf16", M, N, K, i, from_bf16(yb[i]), y[i], 0);
    free(x); free(s); free(b); free(y); free(y1); free(w); free(xb); free(bb); free(yb);
    return bad;
}

int main(void) {
    static const long Ms[] = {1, 2, 3, 4, 5, 8, 9, 17}, Ns[] = {1, 2, 3, 4, 5, 77};
    static const long Kf[] = {16, 48, 784}, Ki[] = {256, 768, 4352};
    int bad = 0;
    for (unsigned a = 0; a < sizeof Ms / sizeof *Ms; a++)
        for (unsigned c = 0; c < sizeof Ns / sizeof *Ns; c++)
            for (unsigned k = 0; k < 3; k++) {
                bad |= check_f32(Ms[a], Ns[c], Kf[k]);
                bad |= check_i8(Ms[a], Ns[c], Ki[k]);
                if (bad) return 1;
            }
    int8_t w[256] = {0};
    float x[256] = {0}, scale = 1, y = 1;
    if (neoj_rowmatmul_i8(x, 1, 200, w, 1, &scale, 0, &y, 0) != -1) { /* K not a multiple of 256 */
        printf("FAIL int8 took K=200\n");
        return 1;
    }
    printf("%s ok\n", neoj_rowmatmul_variant());
    return 0;
}
