/* Matrix-vector products straight from GGUF block-quantised weights, fp32 arithmetic.
 *
 * The embedded model ships as Q4_1 (and its token embedding as Q8_0). Reading those blocks
 * instead of dequantised fp32 weights moves ~6x fewer bytes per token, which is what bounds
 * decoding on a CPU. Every weight is the one the dequantised model holds, w = d*q + m (Q4_1)
 * or w = d*q (Q8_0), rounded the same way (a multiply, then an add), so outputs match it up
 * to fp32 summation order.
 *
 * Layouts (row n of an (N, K) weight, G = 32 weights per block, B = K / G blocks):
 *   q4_1: qs (N, K/2) uint8, block b holds bytes [16b, 16b+16): low nibble = element j,
 *         high nibble = element j+16 (llama.cpp's order); d, m (N, B) float32.
 *   q8_0: qs (N, K) int8; d (N, B) float32.
 * x is (M, K) float32 with small M (decode: 1, speculative verify: K+1); y is (M, N).
 * Each block is dequantised once into registers and shared by all M rows; M is a compile-time
 * constant per variant (1..8) so the row accumulators stay in registers. Larger M runs in
 * chunks of 8 rows.
 * Built by labkit/kernels/cpu_quant.py with -O3 -march=native -fopenmp; its PyTorch reference
 * is labkit.kernels.reference.quant_linear_ref.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define G 32
#define MAX_M 16  /* rows one call takes; the caller goes dense beyond */
#define CHUNK 8

/* The weights stream from memory once a token (80 MB for the embedded model): a row's blocks are
 * asked for AHEAD rows before they are needed. With the hardware's prefetcher alone a 2-core
 * Sapphire Rapids VM streamed them at 7.7 GB/s, a third of the product's speed with the weights in
 * cache; so asked, at 23 GB/s (docs/cpu.md). Prefetches change no arithmetic. */
#define AHEAD 8
static inline void prefetch_span(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 3);
}
/* row n + AHEAD of an (N, K) weight: its quants (bytes_per_row), its scales d and (Q4_1) mins m */
#define PREFETCH_ROW(n, bytes_per_row, m_or_null)                                                        \
    do {                                                                                                 \
        if ((n) + AHEAD < N) {                                                                           \
            prefetch_span((const char *)qs + ((n) + AHEAD) * (bytes_per_row), bytes_per_row);            \
            prefetch_span(d + ((n) + AHEAD) * (K / G), (int64_t)sizeof(float) * (K / G));                \
            if (m_or_null) prefetch_span((const float *)(m_or_null) + ((n) + AHEAD) * (K / G), (int64_t)sizeof(float) * (K / G)); \
        }                                                                                                \
    } while (0)

#ifdef __AVX512F__
#define PATH "avx512"

/* Q4_1's sixteen weights of a block, w = d*q then + m for q = 0..15, as one vector: each block's 32
 * weights are then two lane permutes of it by their nibbles (vpermps reads an index's low 4 bits),
 * not two int-to-float conversions, two multiplies and two adds: the same weights to the bit
 * (each is the same fp32 multiply, then add), and a one-row product 1.25x as fast on a 2-core
 * AMD EPYC (Zen 4; 1.04x at four rows, where the rows' FMAs dominate: docs/cpu.md). */
#define NIBBLES _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

#define Q4_VARIANT(MM)                                                                                   \
static void q4_1_m##MM(const float *x, const uint8_t *qs, const float *d, const float *m, float *y,     \
                       int64_t N, int64_t K, int64_t ystride) {                                          \
    const int64_t B = K / G;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        PREFETCH_ROW(n, K / 2, m);                                                                       \
        const uint8_t *row = qs + n * (K / 2);                                                           \
        __m512 a0[MM], a1[MM];                                                                           \
        for (int r = 0; r < MM; r++) a0[r] = a1[r] = _mm512_setzero_ps();                                \
        for (int64_t b = 0; b < B; b++) {                                                                \
            const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + b * 16)));  \
            const __m512 table = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(d[n * B + b]), NIBBLES), _mm512_set1_ps(m[n * B + b])); \
            const __m512 wlo = _mm512_permutexvar_ps(raw, table);  /* lane j: byte j's low nibble (bits 3:0 index) */ \
            const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(raw, 4), table);  /* its high nibble */     \
            for (int r = 0; r < MM; r++) {                                                               \
                const float *xb = x + r * K + b * G;                                                     \
                a0[r] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xb), a0[r]);                                \
                a1[r] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xb + 16), a1[r]);                           \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < MM; r++) y[r * ystride + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])); \
    }                                                                                                    \
}

#define Q8_VARIANT(MM)                                                                                   \
static void q8_0_m##MM(const float *x, const int8_t *qs, const float *d, float *y,                      \
                       int64_t N, int64_t K, int64_t ystride) {                                          \
    const int64_t B = K / G;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        PREFETCH_ROW(n, K, (const float *)NULL);                                                         \
        const int8_t *row = qs + n * K;                                                                  \
        __m512 a0[MM], a1[MM];                                                                           \
        for (int r = 0; r < MM; r++) a0[r] = a1[r] = _mm512_setzero_ps();                                \
        for (int64_t b = 0; b < B; b++) {                                                                \
            const __m512 vd = _mm512_set1_ps(d[n * B + b]);                                              \
            const __m512 w0 = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + b * G))))); \
            const __m512 w1 = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + b * G + 16))))); \
            for (int r = 0; r < MM; r++) {                                                               \
                const float *xb = x + r * K + b * G;                                                     \
                a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), a0[r]);                                 \
                a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), a1[r]);                            \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < MM; r++) y[r * ystride + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])); \
    }                                                                                                    \
}

#elif defined(__AVX2__) && defined(__FMA__)
#define PATH "avx2"

/* Eight lanes: a block's 32 weights are four vectors (Q4_1: low nibbles 0-15 in w0, w1, high
 * nibbles 16-31 in w2, w3). Same arithmetic as the AVX-512 path: w = d*q then + m, each row's
 * dot product kept in four accumulators. */
#define Q4_VARIANT(MM)                                                                                   \
static void q4_1_m##MM(const float *x, const uint8_t *qs, const float *d, const float *m, float *y,     \
                       int64_t N, int64_t K, int64_t ystride) {                                          \
    const int64_t B = K / G;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        PREFETCH_ROW(n, K / 2, m);                                                                       \
        const uint8_t *row = qs + n * (K / 2);                                                           \
        __m256 acc[MM][4];                                                                               \
        for (int r = 0; r < MM; r++) for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_ps();        \
        for (int64_t b = 0; b < B; b++) {                                                                \
            const __m128i raw = _mm_loadu_si128((const __m128i *)(row + b * 16));                        \
            const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));                                  \
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));               \
            const __m256 vd = _mm256_set1_ps(d[n * B + b]);                                              \
            const __m256 vm = _mm256_set1_ps(m[n * B + b]);                                              \
            __m256 w[4];                                                                                 \
            w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));                                         \
            w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));                      \
            w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));                                         \
            w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));                      \
            for (int v = 0; v < 4; v++) w[v] = _mm256_add_ps(_mm256_mul_ps(vd, w[v]), vm);               \
            for (int r = 0; r < MM; r++) {                                                               \
                const float *xb = x + r * K + b * G;                                                     \
                for (int v = 0; v < 4; v++) acc[r][v] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xb + 8 * v), acc[r][v]); \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < MM; r++) y[r * ystride + n] = hsum8(acc[r]);                                 \
    }                                                                                                    \
}

#define Q8_VARIANT(MM)                                                                                   \
static void q8_0_m##MM(const float *x, const int8_t *qs, const float *d, float *y,                      \
                       int64_t N, int64_t K, int64_t ystride) {                                          \
    const int64_t B = K / G;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        PREFETCH_ROW(n, K, (const float *)NULL);                                                         \
        const int8_t *row = qs + n * K;                                                                  \
        __m256 acc[MM][4];                                                                               \
        for (int r = 0; r < MM; r++) for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_ps();        \
        for (int64_t b = 0; b < B; b++) {                                                                \
            const __m256 vd = _mm256_set1_ps(d[n * B + b]);                                              \
            __m256 w[4];                                                                                 \
            for (int v = 0; v < 4; v++)                                                                  \
                w[v] = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + b * G + 8 * v))))); \
            for (int r = 0; r < MM; r++) {                                                               \
                const float *xb = x + r * K + b * G;                                                     \
                for (int v = 0; v < 4; v++) acc[r][v] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xb + 8 * v), acc[r][v]); \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < MM; r++) y[r * ystride + n] = hsum8(acc[r]);                                 \
    }                                                                                                    \
}

static inline float hsum8(const __m256 *a) {  /* the sum of four 8-lane accumulators */
    const __m256 s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}

#else  /* portable: GCC/Clang vector types, which the compiler maps to NEON (aarch64), SSE (x86) or scalars */
#define PATH "portable"

/* Four lanes, the width every SIMD unit has (NEON, SSE): a block's 32 weights are eight vectors
 * (Q4_1: low nibbles 0-15, then high nibbles 16-31), w = d*q then + m, each row's dot product
 * kept in eight accumulators. */
typedef float v4f __attribute__((vector_size(16)));

static inline v4f ld4(const float *p) { v4f v; memcpy(&v, p, sizeof v); return v; }
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
static const v16u8 ZERO16 = {0};

/* Bytes at..at+3 of a 16-byte vector as four floats, by a byte shuffle into 32-bit lanes and one
 * int-to-float conversion (SSE's pshufb and cvtdq2ps, NEON's tbl and scvtf): GCC converted a byte
 * at a time before, and a decode step took 2.7x as long. Unsigned: each byte in a lane's low byte, zeros above
 * (index 16 is a byte of ZERO16). Signed: each byte in a lane's top byte, then an arithmetic shift.
 * Little-endian lanes (x86, aarch64). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the portable block path shuffles bytes into little-endian lanes"
#endif
#if defined(__clang__)
#define SHUF16(v, ...) __builtin_shufflevector(v, ZERO16, __VA_ARGS__)
#else
#define SHUF16(v, ...) __builtin_shuffle(v, ZERO16, (v16u8){__VA_ARGS__})
#endif
#define U8X4(v, at) __builtin_convertvector((v4i)SHUF16(v, at, 16, 16, 16, at + 1, 16, 16, 16, at + 2, 16, 16, 16, at + 3, 16, 16, 16), v4f)
#define I8X4(v, at) __builtin_convertvector(((v4i)SHUF16(v, 16, 16, 16, at, 16, 16, 16, at + 1, 16, 16, 16, at + 2, 16, 16, 16, at + 3)) >> 24, v4f)

static inline float hsum4(const v4f *a) {  /* the sum of eight 4-lane accumulators */
    const v4f s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    return (s[0] + s[1]) + (s[2] + s[3]);
}

#define Q4_VARIANT(MM)                                                                                   \
static void q4_1_m##MM(const float *x, const uint8_t *qs, const float *d, const float *m, float *y,     \
                       int64_t N, int64_t K, int64_t ystride) {                                          \
    const int64_t B = K / G;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        PREFETCH_ROW(n, K / 2, m);                                                                       \
        const uint8_t *row = qs + n * (K / 2);                                                           \
        v4f acc[MM][8];                                                                                  \
        for (int r = 0; r < MM; r++) for (int v = 0; v < 8; v++) acc[r][v] = (v4f){0.f, 0.f, 0.f, 0.f};  \
        for (int64_t b = 0; b < B; b++) {                                                                \
            const uint8_t *blk = row + b * 16;                                                           \
            const float db = d[n * B + b], mb = m[n * B + b];                                            \
            v16u8 raw;                                                                                   \
            memcpy(&raw, blk, sizeof raw);                                                               \
            const v16u8 lo = raw & 0x0F, hi = raw >> 4;  /* weights 0-15, 16-31 */                       \
            v4f w[8] = {U8X4(lo, 0), U8X4(lo, 4), U8X4(lo, 8), U8X4(lo, 12),                             \
                        U8X4(hi, 0), U8X4(hi, 4), U8X4(hi, 8), U8X4(hi, 12)};                            \
            for (int v = 0; v < 8; v++) w[v] = w[v] * db + mb;                                           \
            for (int r = 0; r < MM; r++) {                                                               \
                const float *xb = x + r * K + b * G;                                                     \
                for (int v = 0; v < 8; v++) acc[r][v] += w[v] * ld4(xb + 4 * v);                         \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < MM; r++) y[r * ystride + n] = hsum4(acc[r]);                                 \
    }                                                                                                    \
}

#define Q8_VARIANT(MM)                                                                                   \
static void q8_0_m##MM(const float *x, const int8_t *qs, const float *d, float *y,                      \
                       int64_t N, int64_t K, int64_t ystride) {                                          \
    const int64_t B = K / G;                                                                             \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        PREFETCH_ROW(n, K, (const float *)NULL);                                                         \
        const int8_t *row = qs + n * K;                                                                  \
        v4f acc[MM][8];                                                                                  \
        for (int r = 0; r < MM; r++) for (int v = 0; v < 8; v++) acc[r][v] = (v4f){0.f, 0.f, 0.f, 0.f};  \
        for (int64_t b = 0; b < B; b++) {                                                                \
            const float db = d[n * B + b];                                                               \
            v16u8 raw[2];                                                                                \
            memcpy(raw, row + b * G, sizeof raw);                                                        \
            v4f w[8] = {I8X4(raw[0], 0), I8X4(raw[0], 4), I8X4(raw[0], 8), I8X4(raw[0], 12),             \
                        I8X4(raw[1], 0), I8X4(raw[1], 4), I8X4(raw[1], 8), I8X4(raw[1], 12)};            \
            for (int v = 0; v < 8; v++) w[v] = w[v] * db;                                                \
            for (int r = 0; r < MM; r++) {                                                               \
                const float *xb = x + r * K + b * G;                                                     \
                for (int v = 0; v < 8; v++) acc[r][v] += w[v] * ld4(xb + 4 * v);                         \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < MM; r++) y[r * ystride + n] = hsum4(acc[r]);                                 \
    }                                                                                                    \
}

#endif

Q4_VARIANT(1) Q4_VARIANT(2) Q4_VARIANT(3) Q4_VARIANT(4) Q4_VARIANT(5) Q4_VARIANT(6) Q4_VARIANT(7) Q4_VARIANT(8)
Q8_VARIANT(1) Q8_VARIANT(2) Q8_VARIANT(3) Q8_VARIANT(4) Q8_VARIANT(5) Q8_VARIANT(6) Q8_VARIANT(7) Q8_VARIANT(8)

typedef void (*q4_fn)(const float *, const uint8_t *, const float *, const float *, float *, int64_t, int64_t, int64_t);
typedef void (*q8_fn)(const float *, const int8_t *, const float *, float *, int64_t, int64_t, int64_t);
static const q4_fn Q4[CHUNK + 1] = {0, q4_1_m1, q4_1_m2, q4_1_m3, q4_1_m4, q4_1_m5, q4_1_m6, q4_1_m7, q4_1_m8};
static const q8_fn Q8[CHUNK + 1] = {0, q8_0_m1, q8_0_m2, q8_0_m3, q8_0_m4, q8_0_m5, q8_0_m6, q8_0_m7, q8_0_m8};

void gemv_q4_1(const float *x, const uint8_t *qs, const float *d, const float *m,
               float *y, int64_t M, int64_t N, int64_t K) {
    for (int64_t r0 = 0; r0 < M; r0 += CHUNK) {
        const int64_t rows = M - r0 < CHUNK ? M - r0 : CHUNK;
        Q4[rows](x + r0 * K, qs, d, m, y + r0 * N, N, K, N);
    }
}

void gemv_q8_0(const float *x, const int8_t *qs, const float *d,
               float *y, int64_t M, int64_t N, int64_t K) {
    for (int64_t r0 = 0; r0 < M; r0 += CHUNK) {
        const int64_t rows = M - r0 < CHUNK ? M - r0 : CHUNK;
        Q8[rows](x + r0 * K, qs, d, y + r0 * N, N, K, N);
    }
}



int max_rows(void) { return MAX_M; }

const char *kernel_path(void) { return PATH; }  /* which of the paths above this build took */

int kernel_threads(void) { return omp_get_max_threads(); }  /* the OpenMP pool's size as this kernel sees it */
