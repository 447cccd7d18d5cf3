/* The block kernel built for another instruction set (an aarch64 cross build run under qemu, in
 * tests/test_kernels.py): its products against a double-precision dequantise-then-multiply
 * reference, every row count 1..11, Q4_1 and Q8_0. Prints "ok <path>" or the first mismatch. */
#include <math.h>
#include <stdio.h>
#include "../../kernels/cpu_quant_gemv.c"

static uint32_t state = 12345u;
static uint32_t next(void) { state = state * 1664525u + 1013904223u; return state >> 8; }
static float unit(void) { return (float)(next() % 2000001) / 1000000.0f - 1.0f; }

int main(void) {
    enum { N = 67, K = 96, B = K / G };
    static uint8_t q4[N * K / 2];
    static int8_t q8[N * K];
    static float d[N * B], mm[N * B], x[11 * K], y[11 * N];
    for (int i = 0; i < N * K / 2; i++) q4[i] = (uint8_t)(next() & 0xFF);
    for (int i = 0; i < N * K; i++) q8[i] = (int8_t)(next() & 0xFF);
    for (int i = 0; i < N * B; i++) { d[i] = 0.05f * unit(); mm[i] = 0.1f * unit(); }
    for (int i = 0; i < 11 * K; i++) x[i] = unit();
    for (int kind = 0; kind < 2; kind++) {
        for (int M = 1; M <= 11; M++) {
            if (kind == 0) gemv_q4_1(x, q4, d, mm, y, M, N, K); else gemv_q8_0(x, q8, d, y, M, N, K);
            for (int r = 0; r < M; r++) for (int n = 0; n < N; n++) {
                double ref = 0.0;
                for (int k = 0; k < K; k++) {
                    const int b = k / G, j = k % G;
                    double w;
                    if (kind == 0) {
                        const uint8_t byte = q4[n * K / 2 + b * 16 + (j % 16)];
                        w = (double)d[n * B + b] * (double)(j < 16 ? byte & 0x0F : byte >> 4) + (double)mm[n * B + b];
                    } else {
                        w = (double)d[n * B + b] * (double)q8[n * K + k];
                    }
                    ref += w * (double)x[r * K + k];
                }
                if (fabs(ref - (double)y[r * N + n]) > 1e-4 * (1.0 + fabs(ref))) {
                    printf("mismatch %s M=%d r=%d n=%d: %g vs %g\n", kind ? "q8_0" : "q4_1", M, r, n, (double)y[r * N + n], ref);
                    return 1;
                }
            }
        }
    }
    printf("ok %s\n", kernel_path());
    return 0;
}
