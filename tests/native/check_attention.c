/* The layer library's attention built for another instruction set (tests/test_layer_cpu.py: x86
 * without AVX, which takes the narrow path, and aarch64 cross builds run under qemu): against a
 * double-precision softmax(q k^T) v, over GQA groups of 1 to 6, head sizes that leave the eight
 * lanes or an output slice short, keys across several blocks, a window and a token tree; and each
 * row's output bit for bit the one it gets alone. Prints "ok" or the first mismatch. */
#include <math.h>
#include <stdio.h>
#include "../../kernels/cpu_layer.c"
#include "../../kernels/cpu_quant_gemv.c"
#include "../../kernels/cpu_q8_gemv.c"
#include "../../kernels/cpu_q8_tiles.c"

static uint32_t state = 2024u;
static uint32_t next(void) { state = state * 1664525u + 1013904223u; return state >> 8; }
static float unit(void) { return (float)(next() % 2000001) / 1000000.0f - 1.0f; }

enum { S = 200, T = 4, MAXH = 12, MAXD = 72, NTREE = 4 };
static float kc[MAXH * S * MAXD], vc[MAXH * S * MAXD], q[T * MAXH * MAXD], out[T * MAXH * MAXD], alone[MAXH * MAXD];
static float scratch[T * MAXH * (S + 1)];

static int check(int64_t nh, int64_t nkv, int64_t D, int64_t window, int tree) {
    const int64_t pos[T] = {150, 151, 152, 153};  /* one batch row's verify of T tokens */
    const int8_t mask[T * NTREE] = {1, 0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1};  /* tree slots 150..153 */
    const float scale = 0.125f;
    for (int64_t i = 0; i < nkv * S * D; i++) { kc[i] = unit(); vc[i] = unit(); }
    for (int64_t i = 0; i < T * nh * D; i++) q[i] = unit();
    attention(q, T, kc, vc, S, pos, nh, nkv, D, scale, window, out, scratch, tree ? mask : NULL, 150, NTREE, T);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < nh; h++) {
            const int64_t kv = h / (nh / nkv), lo = window > 0 && pos[t] - window + 1 > 0 ? pos[t] - window + 1 : 0;
            double w[S], mx = -INFINITY, sum = 0.0;
            for (int64_t s = lo; s <= pos[t]; s++) {
                const int seen = !tree || s < 150 || mask[t * NTREE + (s - 150)];
                double dot = 0.0;
                for (int64_t j = 0; j < D; j++) dot += (double)q[(t * nh + h) * D + j] * kc[(kv * S + s) * D + j];
                w[s] = seen ? dot * scale : -INFINITY;
                if (w[s] > mx) mx = w[s];
            }
            for (int64_t s = lo; s <= pos[t]; s++) { w[s] = exp(w[s] - mx); sum += w[s]; }
            for (int64_t j = 0; j < D; j++) {
                double ref = 0.0;
                for (int64_t s = lo; s <= pos[t]; s++) ref += w[s] * vc[(kv * S + s) * D + j];
                ref /= sum;
                const float got = out[(t * nh + h) * D + j];
                if (fabs(got - ref) > 1e-5 + 1e-5 * fabs(ref)) {
                    printf("mismatch nh %ld nkv %ld D %ld window %ld tree %d: row %ld head %ld dim %ld: %.9g vs %.9g\n",
                           (long)nh, (long)nkv, (long)D, (long)window, tree, (long)t, (long)h, (long)j, got, ref);
                    return 0;
                }
            }
        }
        attention(q + t * nh * D, 1, kc, vc, S, pos + t, nh, nkv, D, scale, window, alone, scratch,
                  tree ? mask + t * NTREE : NULL, 150, NTREE, 1);
        if (memcmp(alone, out + t * nh * D, sizeof(float) * nh * D) != 0) {
            printf("row %ld alone differs: nh %ld nkv %ld D %ld window %ld tree %d\n", (long)t, (long)nh, (long)nkv, (long)D, (long)window, tree);
            return 0;
        }
    }
    return 1;
}

int main(void) {
    const int64_t shapes[][3] = {{9, 3, 64}, {4, 4, 48}, {8, 2, 32}, {12, 2, 20}, {6, 3, 72}};
    for (int i = 0; i < 5; i++)
        for (int window = 0; window <= 70; window += 70)
            for (int tree = 0; tree <= 1; tree++)
                if (!check(shapes[i][0], shapes[i][1], shapes[i][2], window, tree)) return 1;
    printf("ok\n");
    return 0;
}
