/* Prints a hash of neoj_rowmatmul's activation quantizer (quantize_row in csrc/rowmatmul_common.c) over rows
 * with NaNs, infinities, zeros, tiny values and rounding ties, as fp32 and as bf16. tests/test_rowmatmul.py
 * compiles it with and without -mavx2 and checks that the AVX2 form and the C form agree bit for bit. */
#include <stdio.h>

#include "../src/neoj/csrc/rowmatmul_common.c"

#define K 4096

int main(void) {
    static float x[K];
    static uint16_t xb[K];
    static int16_t v[K];
    float xs[K / QBLOCK];
    long vsum[K / QBLOCK];
    uint32_t s = 12345;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
#define MIX(value) (h = (h ^ (uint64_t)(value)) * 1099511628211ull)
    for (int trial = 0; trial < 200; trial++) {
        for (long i = 0; i < K; i++) {
            s = s * 1103515245u + 12345u;
            float f = ((int)(s >> 8) % 200001 - 100000) / (float)(1 + (s % 7) * 1000);
            if (trial % 5 == 1 && i % 97 == 3) f = NAN;
            if (trial % 7 == 2 && i % 301 == 5) f = INFINITY;
            if (trial % 11 == 3 && i < QBLOCK) f = 0.0f; /* an all-zero block */
            if (trial % 13 == 4) f *= 1e-30f;
            if (trial % 3 == 0 && i % 2) f = (s & 1) ? 0.5f : -1.5f; /* halves: ties after scaling */
            x[i] = f;
            uint32_t u;
            memcpy(&u, &f, 4);
            xb[i] = (uint16_t)(u >> 16);
        }
        for (int bf16 = 0; bf16 < 2; bf16++) {
            quantize_row(bf16 ? (const void *)xb : (const void *)x, K, bf16, v, xs, vsum);
            for (long i = 0; i < K; i++) MIX((uint16_t)v[i]);
            for (int b = 0; b < K / QBLOCK; b++) {
                uint32_t u;
                memcpy(&u, &xs[b], 4);
                MIX(u);
                MIX(vsum[b]);
            }
        }
    }
    printf("%016llx\n", (unsigned long long)h);
    return 0;
}
