/* A Llama decoder layer's fused operations on the CPU, fp32, reading GGUF blocks: the same five
 * operations as the Triton layer kernels, with labkit/kernels/layer_reference.py as the PyTorch
 * reference they are tested against (labkit/kernels/layer_cpu.py calls them).
 *
 *   norm_qkv_rope    RMSNorm, the fused q/k/v product, RoPE on q and k, k and v written to the cache
 *   attention        each query row against the cache's keys up to its position (sliding window kept)
 *   linear_residual  residual + W x
 *   norm_gate_up     RMSNorm, the fused gate/up product, silu(gate) * up
 *   norm_head        the final RMSNorm and the LM head
 *   decode_layers    the first four for every layer of a stack, in one call (the same functions, in
 *                    the same order, so the same bits): a step pays one crossing from Python, not
 *                    five per layer, which was a fifth of a decode step
 *
 * One call per operation instead of about twenty PyTorch operations: at batch 1 a decode step's
 * arithmetic is small, and the per-operation cost of the PyTorch layers dominated it. Batch 1:
 * rows are the step's tokens. The products are gemv_q4_1 / gemv_q8_0 (cpu_quant_gemv.c, built
 * into the same library), threaded with OpenMP on the pool PyTorch sizes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void gemv_q4_1(const float *x, const uint8_t *qs, const float *d, const float *m, float *y, int64_t M, int64_t N, int64_t K);
void gemv_q8_0(const float *x, const int8_t *qs, const float *d, float *y, int64_t M, int64_t N, int64_t K);
void gemv_q4_1_q8(const float *x, const uint8_t *qs, const float *d, const float *m, float *y, int64_t M, int64_t N, int64_t K);
void gemv_q8_0_q8(const float *x, const int8_t *qs, const float *d, float *y, int64_t M, int64_t N, int64_t K);
void gemv_q4_1_q8_tiles(const float *x, const uint8_t *qt, const uint16_t *dt, const uint16_t *mt, float *y, int64_t M, int64_t N, int64_t K);
void gemv_q8_0_q8_tiles(const float *x, const int8_t *qt, const uint16_t *dt, const int16_t *wt, float *y, int64_t M, int64_t N, int64_t K);

typedef struct {  /* one linear layer's GGUF blocks (layer_cpu.BlockWeight mirrors it) */
    int64_t kind;  /* 0: Q4_1, 1: Q8_0; 2, 3: the same with 8-bit activations (cpu_q8_gemv.c); 4, 5: those over tiles (cpu_q8_tiles.c) */
    const void *qs;  /* kinds 4, 5: the tiles' quants */
    const float *d;  /* kinds 4, 5: the tiles' scales, float16 */
    const float *m;  /* Q4_1 only (kind 4: float16; kind 5: the tiles' block sums of quants, int16) */
    const float *bias;  /* NULL when none */
    int64_t N, K;
} block_weight;

static void linear(const block_weight *w, const float *x, int64_t M, float *y) {  /* y (M, N) = x (M, K) W^T + bias */
    if (w->kind == 0) gemv_q4_1(x, (const uint8_t *)w->qs, w->d, w->m, y, M, w->N, w->K);
    else if (w->kind == 1) gemv_q8_0(x, (const int8_t *)w->qs, w->d, y, M, w->N, w->K);
    else if (w->kind == 2) gemv_q4_1_q8(x, (const uint8_t *)w->qs, w->d, w->m, y, M, w->N, w->K);
    else if (w->kind == 3) gemv_q8_0_q8(x, (const int8_t *)w->qs, w->d, y, M, w->N, w->K);
    else if (w->kind == 4) gemv_q4_1_q8_tiles(x, (const uint8_t *)w->qs, (const uint16_t *)(const void *)w->d, (const uint16_t *)(const void *)w->m, y, M, w->N, w->K);
    else gemv_q8_0_q8_tiles(x, (const int8_t *)w->qs, (const uint16_t *)(const void *)w->d, (const int16_t *)(const void *)w->m, y, M, w->N, w->K);
    if (w->bias)
        for (int64_t r = 0; r < M; r++)
            for (int64_t n = 0; n < w->N; n++) y[r * w->N + n] += w->bias[n];
}

static void rms_norm(const float *x, const float *w, float eps, int64_t M, int64_t K, float *out) {
    for (int64_t r = 0; r < M; r++) {
        const float *xr = x + r * K;
        float ss = 0.f;
        for (int64_t k = 0; k < K; k++) ss += xr[k] * xr[k];
        const float inv = 1.f / sqrtf(ss / (float)K + eps);
        for (int64_t k = 0; k < K; k++) out[r * K + k] = xr[k] * inv * w[k];
    }
}

/* scratch: M * (dim + (nh + 2 nkv) D) floats. cos, sin: (S_rope, D) tables, sin's first half
 * negated, so rotate_half(x) * sin == roll(x, D/2) * sin. Caches: (nkv, S, D). q_out: (M, nh, D).
 * Row t is written at cache slot pos[t] and rotated by rope_pos[t] (a token tree's depth), or by
 * pos[t] when rope_pos is NULL. Batched rows: row t belongs to batch row t / T (T rows each), whose
 * cache is the (nkv, S, D) block after the previous rows'; T = M is one batch row. */
void norm_qkv_rope(const float *x, int64_t M, int64_t dim, const float *norm_w, float eps, const block_weight *w,
                   const float *cos_t, const float *sin_t, const int64_t *pos, float *k_cache, float *v_cache,
                   int64_t S, int64_t nh, int64_t nkv, int64_t D, float *q_out, float *scratch, const int64_t *rope_pos,
                   int64_t T) {
    float *h = scratch, *qkv = scratch + M * dim;
    rms_norm(x, norm_w, eps, M, dim, h);
    linear(w, h, M, qkv);
    const int64_t width = (nh + 2 * nkv) * D, half = D / 2;
    for (int64_t t = 0; t < M; t++) {
        const int64_t r = rope_pos ? rope_pos[t] : pos[t], row = (t / T) * nkv * S * D;
        const float *c = cos_t + r * D, *s = sin_t + r * D;
        for (int64_t head = 0; head < nh + nkv; head++) {
            const float *src = qkv + t * width + head * D;
            float *dst = head < nh ? q_out + (t * nh + head) * D : k_cache + row + ((head - nh) * S + pos[t]) * D;
            for (int64_t j = 0; j < D; j++) dst[j] = src[j] * c[j] + src[(j + half) % D] * s[j];
        }
        for (int64_t kv = 0; kv < nkv; kv++) {
            const float *src = qkv + t * width + (nh + nkv + kv) * D;
            float *dst = v_cache + row + (kv * S + pos[t]) * D;
            for (int64_t j = 0; j < D; j++) dst[j] = src[j];
        }
    }
}

typedef float v8f __attribute__((vector_size(32)));  /* GCC/clang vectors: AVX, NEON (two halves) or SSE */

/* a . b over D floats, as eight lanes (lane i sums the products j = i mod 8 in order) added in a
 * fixed tree, then any tail in order: one order for a (row, head) whatever shares its step, and
 * eight multiply-adds at a time where a scalar chain took one (the attention's scores were most
 * of a long context's step). */
static float dot8(const float *a, const float *b, int64_t D) {
    v8f acc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t j = 0;
    for (; j + 8 <= D; j += 8) {
        v8f x, y;
        memcpy(&x, a + j, sizeof x);
        memcpy(&y, b + j, sizeof y);
        acc += x * y;
    }
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < D; j++) s += a[j] * b[j];
    return s;
}

/* e^x within 1 ulp of the rounded exact value on [-87, 88] (clamped beyond: e^-87 is 1.6e-38,
 * e^88 1.7e38), in operations the compiler vectorizes: libm's expf is a call per element, and at
 * 2,048 positions the softmax's exps were most of a CPU decode step (0.55 M a token; a verify of
 * T tokens T times as many). Cephes' expf: x = n ln 2 + r, e^r by a degree-7 polynomial, 2^n by
 * the exponent's bits; n by the round-to-nearest of adding and taking away 1.5 * 2^23. One
 * function for every row, so a row's bits do not depend on what shares its step. */
static inline float expv(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;  /* ln 2 in two parts: 0.693359375 - 2.12194440e-4 */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* p[0] + ... + p[n-1] as eight lanes added in dot8's fixed tree (one order whatever shares the step). */
static float sum8(const float *p, int64_t n) {
    v8f acc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        v8f x;
        memcpy(&x, p + j, sizeof x);
        acc += x;
    }
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < n; j++) s += p[j];
    return s;
}

/* The largest of p[0..n-1], eight lanes at a time (a maximum is the same in any order; NaNs are
 * skipped, as a chain of > skips them). */
typedef int32_t v8i __attribute__((vector_size(32)));
static float max8(const float *p, int64_t n) {
    const float ninf = -INFINITY;
    v8f m = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        v8f x;
        memcpy(&x, p + j, sizeof x);
        const v8i gt = x > m;
        m = (v8f)(((v8i)x & gt) | ((v8i)m & ~gt));
    }
    float mx = -INFINITY;
    for (int i = 0; i < 8; i++)
        if (m[i] > mx) mx = m[i];
    for (; j < n; j++)
        if (p[j] > mx) mx = p[j];
    return mx;
}

/* With 256-bit registers (AVX and up) eight positions' scores come out of one pass, each in dot8's
 * order, and a slice of the outputs stays in registers; elsewhere (SSE, NEON) GCC spills such
 * vectors, so those builds take dot8 a position at a time and the outputs through memory (the
 * same bits either way). */
#if defined(__AVX__)
#define WIDE_LANES 1
static inline v8f load8(const float *p) {
    v8f x;
    memcpy(&x, p, sizeof x);
    return x;
}
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif
/* Lane u of the result is a[u]'s eight lanes summed in dot8's tree, ((0+4)+(1+5))+((2+6)+(3+7)):
 * the halves added, then even and odd lanes twice (a transpose folded into the adds). */
static inline v8f tree8(const v8f a[8]) {
    v8f P[4], Q[2];
    for (int u = 0; u < 4; u++)
        P[u] = SHUFFLE(a[u], a[u + 4], 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(a[u], a[u + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int u = 0; u < 2; u++)
        Q[u] = SHUFFLE(P[2 * u], P[2 * u + 1], 0, 2, 8, 10, 4, 6, 12, 14) + SHUFFLE(P[2 * u], P[2 * u + 1], 1, 3, 9, 11, 5, 7, 13, 15);
    return SHUFFLE(Q[0], Q[1], 0, 2, 8, 10, 4, 6, 12, 14) + SHUFFLE(Q[0], Q[1], 1, 3, 9, 11, 5, 7, 13, 15);
}
#else
#define WIDE_LANES 0
#endif

enum { KEY_BLOCK = 64, OUT_SLICE = 32 };  /* positions per scores item; head dims per outputs item */

/* Scores s.. of query row q against keys kc (D floats each), scaled, into p: eight at a time
 * where the build has the registers for it. Returns the first position not done. */
static int64_t scores8(const float *q, const float *kc, int64_t s, int64_t hi, int64_t D, float scale, float *p) {
#if WIDE_LANES
    if (D % 8 == 0)
        for (; s + 8 <= hi + 1; s += 8) {
            v8f a[8];
            for (int u = 0; u < 8; u++) a[u] = (v8f){0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int64_t j = 0; j < D; j += 8) {
                const v8f x = load8(q + j);
                for (int u = 0; u < 8; u++) a[u] += x * load8(kc + (s + u) * D + j);
            }
            const v8f r = tree8(a) * scale;
            memcpy(p + s, &r, sizeof r);
        }
#endif
    (void)q, (void)kc, (void)hi, (void)D, (void)scale, (void)p;
    return s;
}

#if WIDE_LANES
/* out[g] (OUT_SLICE floats of head g's output) = inv[g] * sum over s in lo..hi of w[g][s] v[s],
 * the sum in order of s, for G heads sharing the values; the accumulators in registers. */
static inline __attribute__((always_inline)) void weighted_values(const float *w, int64_t S, const float *vc, int64_t D, int64_t lo, int64_t hi,
                                   const int G, const float *inv, float *out, int64_t out_stride) {
    v8f acc[4][OUT_SLICE / 8];
    for (int g = 0; g < G; g++)
        for (int i = 0; i < OUT_SLICE / 8; i++) acc[g][i] = (v8f){0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t s = lo; s <= hi; s++) {
        v8f v[OUT_SLICE / 8];
        for (int i = 0; i < OUT_SLICE / 8; i++) v[i] = load8(vc + s * D + 8 * i);
        for (int g = 0; g < G; g++) {
            const float pw = w[g * S + s];
            for (int i = 0; i < OUT_SLICE / 8; i++) acc[g][i] += pw * v[i];
        }
    }
    for (int g = 0; g < G; g++)
        for (int i = 0; i < OUT_SLICE / 8; i++) {
            const v8f r = acc[g][i] * inv[g];
            memcpy(out + g * out_stride + 8 * i, &r, sizeof r);
        }
}
#endif

/* q: (M, nh, D); out: (M, nh*D). Row t sees keys lo..pos[t], lo = pos[t] - window + 1 with a
 * window, else 0; with a token tree (tree_mask (M, n_tree) int8, else NULL) of those in the
 * tree's slots tree_base..tree_base+n_tree-1 only the ones its mask row allows. Row t reads the
 * cache of batch row t / T (norm_qkv_rope's rule).
 * scratch: M * nh * (S + 1) floats (each (row, head) its scores, then every (row, head)'s 1 / sum).
 *
 * In three passes, so that each key and value row is read once for every query that shares it
 * (the kv head's group of query heads, and a verify's T rows): scores by (batch row, kv head,
 * block of positions); softmax weights by (row, head); outputs by (row, kv head, slice of the
 * head's dims). Each (row, head) keeps one order of its own: its scores in dot8's, its softmax
 * sum in sum8's, each output dim summed over positions in order; so a row's bits do not depend
 * on what shares its step, and are the ones a (row, head) at a time gave. */
void attention(const float *q, int64_t M, const float *k_cache, const float *v_cache, int64_t S, const int64_t *pos,
               int64_t nh, int64_t nkv, int64_t D, float scale, int64_t window, float *out, float *scratch,
               const int8_t *tree_mask, int64_t tree_base, int64_t n_tree, int64_t T) {
    const int64_t group = nh / nkv, n_slices = (D + OUT_SLICE - 1) / OUT_SLICE;
    /* the blocks of positions some row reads, not the cache's every block: items split evenly over the threads
     * only among blocks that hold work (with all of S's, at a 200-token context of an 8,192-slot cache one of two
     * threads took two kv heads' scores and the other one) */
    int64_t last_pos = 0;
    for (int64_t t = 0; t < M; t++) last_pos = pos[t] > last_pos ? pos[t] : last_pos;
    const int64_t n_blocks = last_pos / KEY_BLOCK + 1;
    float *inv_sum = scratch + M * nh * S;  /* (M, nh) */
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < (M / T) * nkv * n_blocks; item++) {
            const int64_t b = item / (nkv * n_blocks), kv = item / n_blocks % nkv, first = item % n_blocks * KEY_BLOCK;
            const float *kc = k_cache + (b * nkv + kv) * S * D;
            for (int64_t t = b * T; t < (b + 1) * T; t++) {
                const int64_t last = pos[t], from = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
                const int64_t lo = from > first ? from : first, hi = last < first + KEY_BLOCK - 1 ? last : first + KEY_BLOCK - 1;
                for (int64_t head = kv * group; head < (kv + 1) * group; head++) {
                    const float *qr = q + (t * nh + head) * D;
                    float *p = scratch + (t * nh + head) * S;
                    for (int64_t s = scores8(qr, kc, lo, hi, D, scale, p); s <= hi; s++) p[s] = dot8(qr, kc + s * D, D) * scale;
                }
            }
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < M * nh; item++) {
            const int64_t t = item / nh, hi = pos[t], lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;
            float *p = scratch + item * S;
            const int8_t *allowed = tree_mask ? tree_mask + t * n_tree : NULL;
            if (allowed)  /* a tree node that is not this row's ancestor */
                for (int64_t s = tree_base > lo ? tree_base : lo; s <= hi && s < tree_base + n_tree; s++)
                    if (!allowed[s - tree_base]) p[s] = -INFINITY;
            const float mx = max8(p + lo, hi - lo + 1);
            for (int64_t s = lo; s <= hi; s++) p[s] = p[s] == -INFINITY ? 0.f : expv(p[s] - mx);
            inv_sum[item] = 1.f / sum8(p + lo, hi - lo + 1);
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < M * nkv * n_slices; item++) {
            const int64_t t = item / (nkv * n_slices), kv = item / n_slices % nkv, j0 = item % n_slices * OUT_SLICE;
            const int64_t hi = pos[t], lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;
            const int64_t width = D - j0 < OUT_SLICE ? D - j0 : OUT_SLICE, head0 = t * nh + kv * group;
            const float *vc = v_cache + ((t / T) * nkv + kv) * S * D + j0, *w = scratch + head0 * S;
            float *o = out + head0 * D + j0;
#if WIDE_LANES
            if (width == OUT_SLICE && group <= 4) {  /* a constant G each, for registers */
                if (group == 3) weighted_values(w, S, vc, D, lo, hi, 3, inv_sum + head0, o, D);
                else if (group == 1) weighted_values(w, S, vc, D, lo, hi, 1, inv_sum + head0, o, D);
                else if (group == 2) weighted_values(w, S, vc, D, lo, hi, 2, inv_sum + head0, o, D);
                else weighted_values(w, S, vc, D, lo, hi, 4, inv_sum + head0, o, D);
                continue;
            }
#endif
            for (int64_t g = 0; g < group; g++) {
                float *og = o + g * D;
                for (int64_t j = 0; j < width; j++) og[j] = 0.f;
                for (int64_t s = lo; s <= hi; s++)
                    for (int64_t j = 0; j < width; j++) og[j] += w[g * S + s] * vc[s * D + j];
                for (int64_t j = 0; j < width; j++) og[j] *= inv_sum[head0 + g];
            }
        }
    }
}

void linear_residual(const float *x, int64_t M, const block_weight *w, const float *residual, float *out) {
    linear(w, x, M, out);
    for (int64_t i = 0; i < M * w->N; i++) out[i] += residual[i];
}

/* out: (M, hidden); scratch: M * (dim + 2 hidden) floats. */
void norm_gate_up(const float *x, int64_t M, int64_t dim, const float *norm_w, float eps, const block_weight *w,
                  float *out, float *scratch) {
    const int64_t hidden = w->N / 2;
    float *h = scratch, *gu = scratch + M * dim;
    rms_norm(x, norm_w, eps, M, dim, h);
    linear(w, h, M, gu);
    for (int64_t r = 0; r < M; r++)
        for (int64_t j = 0; j < hidden; j++) {
            const float g = gu[r * 2 * hidden + j];
            out[r * hidden + j] = g / (1.f + expv(-g)) * gu[r * 2 * hidden + hidden + j];
        }
}

/* logits: (M, vocab); normed: (M, dim), the RMSNorm output (kept for draft heads). */
void norm_head(const float *x, int64_t M, int64_t dim, const float *norm_w, float eps, const block_weight *w,
               float *logits, float *normed) {
    rms_norm(x, norm_w, eps, M, dim, normed);
    linear(w, normed, M, logits);
}

typedef struct {  /* one decoder layer's weights and cache (layer_cpu.LayerWeights mirrors it) */
    const float *attn_norm, *mlp_norm;
    block_weight qkv, o, gate_up, down;
    float *k_cache, *v_cache;  /* (nkv, S, D) each */
} layer_weights;

/* x: (M, dim), the residual stream, updated in place through n_layers layers; the other arguments
 * are norm_qkv_rope's and attention's (T rows a batch row). Scratch is allocated here, once a call.
 * Returns 0, or -1 when it could not be allocated. */
int decode_layers(float *x, int64_t M, int64_t dim, const layer_weights *layers, int64_t n_layers, float eps,
                  const float *cos_t, const float *sin_t, const int64_t *pos, const int64_t *rope_pos, int64_t S,
                  int64_t nh, int64_t nkv, int64_t D, float scale, int64_t window,
                  const int8_t *tree_mask, int64_t tree_base, int64_t n_tree, int64_t T) {
    const int64_t hidden = layers[0].gate_up.N / 2, qkv_w = (nh + 2 * nkv) * D;
    const int64_t y_w = hidden > nh * D ? hidden : nh * D;  /* y holds the attention's output, then silu(gate) * up */
    const int64_t sizes[6] = {M * nh * D, M * (dim + qkv_w), M * nh * (S + 1), M * y_w, M * (dim + 2 * hidden), M * dim};
    int64_t total = 0;
    for (int i = 0; i < 6; i++) total += sizes[i];
    float *buf = (float *)malloc((size_t)total * sizeof(float));
    if (!buf) return -1;
    float *q = buf, *qkv_scratch = q + sizes[0], *scores = qkv_scratch + sizes[1], *y = scores + sizes[2];
    float *mlp_scratch = y + sizes[3], *tmp = mlp_scratch + sizes[4];  /* tmp: the stream between the two halves */
    for (int64_t l = 0; l < n_layers; l++) {
        const layer_weights *L = layers + l;
        norm_qkv_rope(x, M, dim, L->attn_norm, eps, &L->qkv, cos_t, sin_t, pos, L->k_cache, L->v_cache, S, nh, nkv, D, q,
                      qkv_scratch, rope_pos, T);
        attention(q, M, L->k_cache, L->v_cache, S, pos, nh, nkv, D, scale, window, y, scores, tree_mask, tree_base, n_tree, T);
        linear_residual(y, M, &L->o, x, tmp);  /* tmp = x + W_o y, as the five-call path computes it */
        norm_gate_up(tmp, M, dim, L->mlp_norm, eps, &L->gate_up, y, mlp_scratch);  /* y: silu(gate) * up, (M, hidden) */
        linear_residual(y, M, &L->down, tmp, x);  /* x = tmp + W_down y */
    }
    free(buf);
    return 0;
}
