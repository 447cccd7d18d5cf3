/* kernels/cpu_layer.c's attention timed alone: 30 layers of the embedded model's shape (9 heads
 * over 3 kv heads, head 64), random cache, best of 40 passes; prints microseconds per layer and a
 * checksum of the outputs (equal checksums: the same bits). Before and after a change, one binary
 * each:
 *   git show <commit>:kernels/cpu_layer.c > /tmp/old_layer.c
 *   gcc -O3 -march=native -fopenmp scripts/cpu_attention_bench.c /tmp/old_layer.c kernels/cpu_quant_gemv.c -o /tmp/old -lm
 *   gcc -O3 -march=native -fopenmp scripts/cpu_attention_bench.c kernels/cpu_layer.c kernels/cpu_quant_gemv.c -o /tmp/new -lm
 *   for c in 100 1000 4000; do for m in 1 4; do /tmp/old $c $m; /tmp/new $c $m; done; done
 * arguments: positions in the cache, rows (a verify of that many tokens of one request). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
void attention(const float *q, int64_t M, const float *k_cache, const float *v_cache, int64_t S, const int64_t *pos,
               int64_t nh, int64_t nkv, int64_t D, float scale, int64_t window, float *out, float *scratch,
               const int8_t *tree_mask, int64_t tree_base, int64_t n_tree, int64_t T);
static double now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    int64_t ctx = atoi(argv[1]), M = atoi(argv[2]), L = 30, nh = 9, nkv = 3, D = 64, S = ctx + 16;
    float *K = malloc(sizeof(float) * L * nkv * S * D), *V = malloc(sizeof(float) * L * nkv * S * D);
    srand(1);
    for (int64_t i = 0; i < L * nkv * S * D; i++) { K[i] = (rand() / (float)RAND_MAX) - 0.5f; V[i] = (rand() / (float)RAND_MAX) - 0.5f; }
    float *q = malloc(sizeof(float) * M * nh * D), *o = malloc(sizeof(float) * M * nh * D), *sc = malloc(sizeof(float) * M * nh * (S + 1));
    for (int64_t i = 0; i < M * nh * D; i++) q[i] = (rand() / (float)RAND_MAX) - 0.5f;
    int64_t pos[64]; for (int i = 0; i < M; i++) pos[i] = ctx + i;
    double best = 1e9;
    for (int rep = 0; rep < 40; rep++) {
        double t0 = now();
        for (int64_t l = 0; l < L; l++) attention(q, M, K + l * nkv * S * D, V + l * nkv * S * D, S, pos, nh, nkv, D, 0.125f, 0, o, sc, NULL, 0, 0, M);
        double dt = (now() - t0) / L * 1e6; if (dt < best) best = dt;
    }
    double h = 0; for (int64_t i = 0; i < M * nh * D; i++) h = h * 1.0000001 + o[i];
    printf("%.1f us/layer checksum %.9g\n", best, h);
}
