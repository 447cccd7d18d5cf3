/* Matrix-vector products from GGUF blocks with 8-bit activations (--weights gguf-q8), as llama.cpp runs them.
 *
 * cpu_quant_gemv.c multiplies fp32 activations by weights dequantised in registers: at a verify's
 * 4-5 rows on two AVX2 cores that arithmetic bounds the step (a 5-row product cost 2.4x a 1-row one,
 * scripts/cpu_paths.py), so a speculative step costs nearly twice a plain one and drafting barely
 * pays. Here each row's activations are quantised per block of 32 (x ~ dx * xq, xq int8 in
 * [-127, 127], dx = max|x| / 127, xq = round-to-nearest-even of x / dx as x * (1 / dx)), and a block's
 * dot product is integer arithmetic (AVX2: maddubs of the weights' unsigned nibbles and the signed
 * xq, then madd into 32-bit lanes), scaled once per block:
 *
 *   Q4_1 (w = d q + m):  sum_b  d_b dx_b sum_j q_j xq_j  +  m_b sx_b     (sx_b = dx_b sum_j xq_j)
 *   Q8_0 (w = d q):      sum_b  d_b dx_b sum_j q_j xq_j
 *
 * Not the dequantised model's values (the activations are rounded: greedy text can differ from
 * --weights gguf's), but each row's result is the same bits whatever rows share the call (its own
 * xq, dx, sx, and the same operations in the same order for every row count), so a verify's row
 * is a decode step's and speculation stays lossless against plain steps of this mode.
 * Its PyTorch reference: labkit.kernels.reference.quant_linear_q8_ref.
 */
/* No fused multiply-adds but the written ones: a*b + c contracted in one row-count variant and not in another
 * (inlined differently) gave a row other bits at 5 rows than alone (Q4_1 at K = 128). */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define G 32
#define CHUNK 8

/* x (M, K) -> xq (M, K) int8, dx and sx (M, K/32): each row's blocks quantised (the header). sx is the quantised
 * block's sum, as llama.cpp's Q8_1 keeps it, not x's own: Q4_1's d q ranges over [0, 15 d] while w = d q + m sits
 * near 0, so with x's exact sum for the m term the rounding errors of x met d q alone and did not cancel
 * (per linear 2-4x the error of the same product on the rounded x; greedy tokens 88% those of gguf, not 96%). */
void quantize_rows_q8(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *sx) {
    const int64_t B = K / G;
    for (int64_t r = 0; r < M; r++) {
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + r * K + b * G;
            float amax = 0.f;
            for (int j = 0; j < G; j++) amax = fmaxf(amax, fabsf(xb[j]));
            const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int32_t sum = 0;
            for (int j = 0; j < G; j++) {
                xq[r * K + b * G + j] = (int8_t)nearbyintf(xb[j] * id);
                sum += xq[r * K + b * G + j];
            }
            dx[r * B + b] = d;
            sx[r * B + b] = d * (float)sum;
        }
    }
}

#if defined(__AVX2__)
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define Q8_PATH "avx2-int8-vnni"
#else
#define Q8_PATH "avx2-int8"
#endif
static inline float hsum_ps(__m256 s) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}
/* one block of 32 unsigned weights (u) against a row's 32 signed activations (s): eight 32-bit lane sums
 * (VNNI's one instruction where the CPU has it, else maddubs into 16-bit pairs, then madd into 32 bits: exact either way) */
#if defined(__AVXVNNI__)
#define DOT_LANES(u, s) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (u), (s))
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT_LANES(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#else
#define DOT_LANES(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1))
#endif
/* Q4_1's m term, sum_b m[b] sx[b] over B blocks: eight at a time, then the rest (once a row and weight row) */
static inline float dot_ms(const float *m, const float *sx, int64_t B) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= B; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(m + b), _mm256_loadu_ps(sx + b), acc);
    float out = hsum_ps(acc);
    for (; b < B; b++) out += m[b] * sx[b];
    return out;
}
/* weight row n's block b as 32 unsigned bytes for the dot (Q8_0: |w|; its signs move to x, sign_x) */
static inline __m256i block_u(int kind, const void *qs, int64_t n, int64_t b, int64_t K, __m256i *sign_x) {
    if (kind == 0) {  /* Q4_1: low nibbles are elements 0-15, high ones 16-31 */
        const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)qs + n * (K / 2) + b * 16));
        const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F)), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
        return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    }
    *sign_x = _mm256_loadu_si256((const __m256i *)((const int8_t *)qs + n * K + b * G));
    return _mm256_sign_epi8(*sign_x, *sign_x);
}

/* rows [0, MM) of a chunk against every weight row (kind 0: Q4_1, 1: Q8_0): per block, each row's exact
 * integer dot product, converted and scaled by d_b dx_b into eight lanes; Q4_1's m term after */
#define Q8ACT_VARIANT(MM)                                                                                \
static void q8act_m##MM(int kind, const int8_t *xq, const float *dx, const float *sx, const void *qs,   \
                        const float *d, const float *m, float *y, int64_t N, int64_t K, int64_t ystride) { \
    const int64_t B = K / G;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        __m256 acc[MM];                                                                                  \
        for (int r = 0; r < MM; r++) acc[r] = _mm256_setzero_ps();                                       \
        for (int64_t b = 0; b < B; b++) {                                                                \
            __m256i sign_x = _mm256_setzero_si256();                                                     \
            const __m256i u = block_u(kind, qs, n, b, K, &sign_x);                                       \
            const float db = d[n * B + b];                                                               \
            for (int r = 0; r < MM; r++) {                                                               \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * G));                  \
                if (kind == 1) xv = _mm256_sign_epi8(xv, sign_x);                                        \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT_LANES(u, xv)), _mm256_set1_ps(db * dx[r * B + b]), acc[r]); \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < MM; r++)                                                                     \
            y[r * ystride + n] = kind == 0 ? hsum_ps(acc[r]) + dot_ms(m + n * B, sx + r * B, B) : hsum_ps(acc[r]); \
    }                                                                                                    \
}

#else  /* portable: a block's integer dot product in C (the compiler vectorises it where it can) */
#define Q8_PATH "portable-int8"

static inline float dot_ms(const float *m, const float *sx, int64_t B) {  /* Q4_1's m term, sum_b m[b] sx[b] */
    float out = 0.f;
    for (int64_t b = 0; b < B; b++) out += m[b] * sx[b];
    return out;
}
/* weight row n's block b (kind 0: Q4_1's quants, 1: Q8_0's) against a row's 32 activations: the exact integer dot */
static inline int32_t block_dot(int kind, const void *qs, int64_t n, int64_t b, int64_t K, const int8_t *xb) {
    int32_t s = 0;
    if (kind == 0) {
        const uint8_t *blk = (const uint8_t *)qs + n * (K / 2) + b * 16;
        for (int j = 0; j < 16; j++) s += (int32_t)(blk[j] & 0x0F) * xb[j] + (int32_t)(blk[j] >> 4) * xb[j + 16];
    } else {
        const int8_t *blk = (const int8_t *)qs + n * K + b * G;
        for (int j = 0; j < G; j++) s += (int32_t)blk[j] * xb[j];
    }
    return s;
}

#define Q8ACT_VARIANT(MM)                                                                                \
static void q8act_m##MM(int kind, const int8_t *xq, const float *dx, const float *sx, const void *qs,   \
                        const float *d, const float *m, float *y, int64_t N, int64_t K, int64_t ystride) { \
    const int64_t B = K / G;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        float acc[MM];                                                                                   \
        for (int r = 0; r < MM; r++) acc[r] = 0.f;                                                       \
        for (int64_t b = 0; b < B; b++)                                                                  \
            for (int r = 0; r < MM; r++)                                                                 \
                acc[r] += (float)block_dot(kind, qs, n, b, K, xq + r * K + b * G) * (d[n * B + b] * dx[r * B + b]); \
        for (int r = 0; r < MM; r++) y[r * ystride + n] = kind == 0 ? acc[r] + dot_ms(m + n * B, sx + r * B, B) : acc[r]; \
    }                                                                                                    \
}
#endif

Q8ACT_VARIANT(1) Q8ACT_VARIANT(2) Q8ACT_VARIANT(3) Q8ACT_VARIANT(4) Q8ACT_VARIANT(5) Q8ACT_VARIANT(6) Q8ACT_VARIANT(7) Q8ACT_VARIANT(8)

typedef void (*q8act_fn)(int, const int8_t *, const float *, const float *, const void *, const float *, const float *, float *, int64_t, int64_t, int64_t);
static const q8act_fn Q8ACT[CHUNK + 1] = {0, q8act_m1, q8act_m2, q8act_m3, q8act_m4, q8act_m5, q8act_m6, q8act_m7, q8act_m8};

/* y (M, N) = x (M, K) W^T with x quantised per block first, eight rows at a time (kind 0: Q4_1 with mins m; 1: Q8_0).
 * A chunk's quantised rows live on the stack (8 K bytes and 64 K / 32 floats): nothing to allocate, nothing to fail. */
static void gemv_q8act(int kind, const float *x, const void *qs, const float *d, const float *m, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t B = K / G;
    int8_t xq[CHUNK * K];
    float dx[CHUNK * B], sx[CHUNK * B];
    for (int64_t r0 = 0; r0 < M; r0 += CHUNK) {
        const int64_t rows = M - r0 < CHUNK ? M - r0 : CHUNK;
        quantize_rows_q8(x + r0 * K, rows, K, xq, dx, sx);
        Q8ACT[rows](kind, xq, dx, sx, qs, d, m, y + r0 * N, N, K, N);
    }
}

void gemv_q4_1_q8(const float *x, const uint8_t *qs, const float *d, const float *m, float *y, int64_t M, int64_t N, int64_t K) {
    gemv_q8act(0, x, qs, d, m, y, M, N, K);
}

void gemv_q8_0_q8(const float *x, const int8_t *qs, const float *d, float *y, int64_t M, int64_t N, int64_t K) {
    gemv_q8act(1, x, qs, d, NULL, y, M, N, K);
}

const char *q8_kernel_path(void) { return Q8_PATH; }  /* which of the paths above this build took */
