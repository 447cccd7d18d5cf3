/* --weights gguf-q8's products on CPUs with AVX-512 VNNI, over weights tiled sixteen rows at a time.
 *
 * cpu_q8_gemv.c takes a weight row at a time: a block's integer dot product sums 32 lanes, and its
 * eight 32-bit partial sums are scaled apart, so each row of activations costs about as many vector
 * operations a block as fp32's fused multiply-adds (a 4-token verify still cost 1.7-2.4 one-token
 * steps: docs/cpu.md). Here a tile holds sixteen weight rows, one per 32-bit lane, four consecutive
 * quants of each lane's row in its four bytes, so one vpdpbusd multiplies four of a row of
 * activations' quants (broadcast to every lane) by four of each of sixteen weight rows and adds
 * them into each lane's block sum: per block and row of activations, eight such instructions give
 * sixteen exact block sums, scaled once. A call's rows are quantised up to 64 at a time, and each tile
 * takes them eight at a time while its bytes are in cache: a prompt reads the weights once a group.
 * On a 2-core Zen 4 (docs/cpu.md): a 4-token verify 1.4-1.5 one-token steps (1.5-1.7 before the prefetches
 * below, 2.0 on fp32 activations), a prompt's prefill 1.5-2.3x the dense weights' GEMM.
 *
 * Tiles (made by labkit.kernels.cpu_quant.tile_q8 from the GGUF's blocks; N a multiple of 16, G = 32):
 *   Q4_1: qt (N/16, B, 4, 16, 4) uint8: tile g, block b, quad p, lane i: bytes 4p..4p+3 of row 16g+i's
 *         block b, whose low nibbles are the block's elements 4p..4p+3 and high ones 16+4p..16+4p+3;
 *         dt, mt (N/16, B, 16) float16: d and m by lane, as the GGUF keeps them (read as fp32 exactly).
 *   Q8_0: qt (N/16, B, 8, 16, 4) int8: quad j holds elements 4j..4j+3 of each lane's row; dt as
 *         above; wt (N/16, B, 16) int16: each lane's block sum of quants (vpdpbusd multiplies an
 *         unsigned byte by a signed one: the activations go in as xq + 128, and 128 times that sum
 *         comes off).
 * The arithmetic is cpu_q8_gemv.c's (its header; reference.quant_linear_q8_ref): per block the exact
 * integer dot of the weights' quants and xq, times d_b dx_b rounded in fp32, summed over blocks in
 * fp32, Q4_1's m_b sx_b summed apart and added last; only the order of fp32 sums differs. A row's
 * result is the same bits whatever rows share the call (its own quantised row, the same operations
 * in the same order), so speculation stays lossless against plain steps of this mode.
 * Built only where the compiler targets AVX-512 VNNI (q8_tile_rows() says 16, else 0: the callers
 * keep row-at-a-time products).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void quantize_rows_q8(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *sx);  /* cpu_q8_gemv.c */

/* No fused multiply-adds but the written ones (cpu_q8_gemv.c says why) */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define G 32
#define CHUNK 8
#define TILE 16

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

int q8_tile_rows(void) { return TILE; }

static inline __m512i quad(const int8_t *p) {  /* four bytes broadcast to every lane */
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* The weights stream from memory once a token. Each block of a tile asks for the same block of the next tile
 * (its quants' 4 or 8 cache lines, its two scale lines) while its own rows are multiplied, so the memory's
 * work and the arithmetic overlap: asked for a whole tile at once, at the tile's start, the requests queued
 * behind each other and the rows' arithmetic came on top of the stream (2-core Zen 4, the model's 121
 * products: one row 4.35 -> 3.9 ms, four 5.9 -> 4.6, eight 9.0 -> 6.6). Prefetches change no arithmetic. */

/* Tile g against MM rows. KIND 0: Q4_1 (mt: its mins), 1: Q8_0 (wt: its block sums). xq: MM rows of quantised
 * activations (xu: the same plus 128, for Q8_0), dx, sx: their scales and block sums. y: MM rows of ystride.
 * ahead: ask for tile g + 1 meanwhile (the first chunk of rows of a tile that has a next). */
#define TILE_VARIANT(KIND, MM)                                                                           \
static void tile_k##KIND##_m##MM(int64_t g, const int8_t *xq, const uint8_t *xu, const float *dx, const float *sx, \
                        const void *qt, const uint16_t *dt, const uint16_t *mt, const int16_t *wt,       \
                        float *y, int64_t K, int64_t ystride, int ahead) {                               \
    const int kind = KIND;  /* a constant per variant, as MM: its branches fold and the rows unroll into registers */ \
    const int64_t B = K / G, tile_bytes = B * TILE * (kind == 0 ? G / 2 : G);                            \
    const char *tile = (const char *)qt + g * tile_bytes;                                                \
    __m512 acc[MM], macc[MM];                                                                            \
    for (int r = 0; r < MM; r++) acc[r] = macc[r] = _mm512_setzero_ps();                                 \
    for (int64_t b = 0; b < B; b++) {                                                                    \
        if (ahead) {  /* block b of tile g + 1 */                                                        \
            const char *next = tile + tile_bytes + b * (tile_bytes / B);                                 \
            for (int64_t off = 0; off < tile_bytes / B; off += 64) __builtin_prefetch(next + off, 0, 3); \
            __builtin_prefetch(dt + ((g + 1) * B + b) * TILE, 0, 3);                                     \
            __builtin_prefetch((kind == 0 ? (const char *)mt : (const char *)wt) + ((g + 1) * B + b) * TILE * 2, 0, 3); \
        }                                                                                                \
        __m512i w[8];                                                                                    \
        if (kind == 0) {                                                                                 \
            const __m512i low = _mm512_set1_epi8(0x0F);                                                  \
            for (int p = 0; p < 4; p++) {                                                                \
                const __m512i raw = _mm512_loadu_si512(tile + (b * 4 + p) * 64);                         \
                w[p] = _mm512_and_si512(raw, low);  /* elements 4p..4p+3 */                              \
                w[p + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);  /* 16+4p..16+4p+3 */        \
            }                                                                                            \
        } else {                                                                                         \
            for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512(tile + (b * 8 + j) * 64);              \
        }                                                                                                \
        const __m512 vd = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dt + (g * B + b) * TILE))); \
        const __m512 vm = kind == 0 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mt + (g * B + b) * TILE))) : vd; \
        const __m512i vw = kind == 1 ? _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(wt + (g * B + b) * TILE))), 7) \
                                     : _mm512_setzero_si512();                                           \
        _Pragma("GCC unroll 8")                                                                          \
        for (int r = 0; r < MM; r++) {                                                                   \
            __m512i s = _mm512_setzero_si512();                                                          \
            if (kind == 0) {                                                                             \
                const int8_t *xb = xq + r * K + b * G;                                                   \
                for (int p = 0; p < 4; p++) s = _mm512_dpbusd_epi32(s, w[p], quad(xb + 4 * p));          \
                for (int p = 0; p < 4; p++) s = _mm512_dpbusd_epi32(s, w[p + 4], quad(xb + 16 + 4 * p));  \
            } else {                                                                                     \
                const int8_t *xb = (const int8_t *)(xu + r * K + b * G);                                 \
                for (int j = 0; j < 8; j++) s = _mm512_dpbusd_epi32(s, quad(xb + 4 * j), w[j]);          \
                s = _mm512_sub_epi32(s, vw);                                                             \
            }                                                                                            \
            const __m512 scale = _mm512_mul_ps(vd, _mm512_set1_ps(dx[r * B + b]));                       \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);                              \
            if (kind == 0) macc[r] = _mm512_fmadd_ps(vm, _mm512_set1_ps(sx[r * B + b]), macc[r]);           \
        }                                                                                                \
    }                                                                                                    \
    for (int r = 0; r < MM; r++) _mm512_storeu_ps(y + r * ystride + g * TILE, kind == 0 ? _mm512_add_ps(acc[r], macc[r]) : acc[r]); \
}

TILE_VARIANT(0, 1) TILE_VARIANT(0, 2) TILE_VARIANT(0, 3) TILE_VARIANT(0, 4) TILE_VARIANT(0, 5) TILE_VARIANT(0, 6) TILE_VARIANT(0, 7) TILE_VARIANT(0, 8)
TILE_VARIANT(1, 1) TILE_VARIANT(1, 2) TILE_VARIANT(1, 3) TILE_VARIANT(1, 4) TILE_VARIANT(1, 5) TILE_VARIANT(1, 6) TILE_VARIANT(1, 7) TILE_VARIANT(1, 8)

typedef void (*tile_fn)(int64_t, const int8_t *, const uint8_t *, const float *, const float *, const void *, const uint16_t *,
                        const uint16_t *, const int16_t *, float *, int64_t, int64_t, int);
static const tile_fn TILES[2][CHUNK + 1] = {  /* [kind][rows] */
    {0, tile_k0_m1, tile_k0_m2, tile_k0_m3, tile_k0_m4, tile_k0_m5, tile_k0_m6, tile_k0_m7, tile_k0_m8},
    {0, tile_k1_m1, tile_k1_m2, tile_k1_m3, tile_k1_m4, tile_k1_m5, tile_k1_m6, tile_k1_m7, tile_k1_m8}};

/* `rows` quantised rows against every tile: the tiles split over the threads, each tile's rows eight at a time while
 * its bytes are in cache (a prompt's rows read the weights once a group, not once every eight rows) */
static void tiles_rows(int kind, int64_t rows, const int8_t *xq, const uint8_t *xu, const float *dx, const float *sx,
                       const void *qt, const uint16_t *dt, const uint16_t *mt, const int16_t *wt, float *y, int64_t N, int64_t K) {
    const int64_t B = K / G, tile_bytes = B * TILE * (kind == 0 ? G / 2 : G);
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < N / TILE; g++) {
        for (int64_t r0 = 0; r0 < rows; r0 += CHUNK) {
            const int64_t n = rows - r0 < CHUNK ? rows - r0 : CHUNK;
            TILES[kind][n](g, xq + r0 * K, xu + r0 * K, dx + r0 * B, sx + r0 * B, qt, dt, mt, wt, y + r0 * N, K, N, r0 == 0 && g + 1 < N / TILE);
        }
    }
}

/* y (M, N) = x (M, K) W^T over tiles, the rows quantised GROUP at a time into a buffer (eight on the stack where
 * the buffer cannot be had: the same bits, the weights read more often) */
#define GROUP 64
static void gemv_tiles(int kind, const float *x, const void *qt, const uint16_t *dt, const uint16_t *mt, const int16_t *wt,
                       float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t B = K / G;
    int8_t small_q[2 * CHUNK * K];
    float small_f[2 * CHUNK * B];
    int8_t *bq = small_q;
    float *bf = small_f;
    int64_t group = CHUNK;
    void *heap = M > CHUNK ? malloc((size_t)(GROUP * (2 * K + 2 * B * (int64_t)sizeof(float)))) : NULL;
    if (heap) {
        bq = (int8_t *)heap, bf = (float *)(bq + 2 * GROUP * K), group = GROUP;
    }
    int8_t *xq = bq;
    uint8_t *xu = (uint8_t *)(bq + group * K);
    float *dx = bf, *sx = bf + group * B;
    for (int64_t r0 = 0; r0 < M; r0 += group) {
        const int64_t rows = M - r0 < group ? M - r0 : group;
        quantize_rows_q8(x + r0 * K, rows, K, xq, dx, sx);
        if (kind == 1)
            for (int64_t i = 0; i < rows * K; i++) xu[i] = (uint8_t)((int32_t)xq[i] + 128);
        tiles_rows(kind, rows, xq, xu, dx, sx, qt, dt, mt, wt, y + r0 * N, N, K);
    }
    free(heap);
}

void gemv_q4_1_q8_tiles(const float *x, const uint8_t *qt, const uint16_t *dt, const uint16_t *mt, float *y, int64_t M, int64_t N, int64_t K) {
    gemv_tiles(0, x, qt, dt, mt, NULL, y, M, N, K);
}

void gemv_q8_0_q8_tiles(const float *x, const int8_t *qt, const uint16_t *dt, const int16_t *wt, float *y, int64_t M, int64_t N, int64_t K) {
    gemv_tiles(1, x, qt, dt, NULL, wt, y, M, N, K);
}

#else
int q8_tile_rows(void) { return 0; }  /* no AVX-512 VNNI in this build: no tiles */

void gemv_q4_1_q8_tiles(const float *x, const uint8_t *qt, const uint16_t *dt, const uint16_t *mt, float *y, int64_t M, int64_t N, int64_t K) {
    (void)x, (void)qt, (void)dt, (void)mt, (void)y, (void)M, (void)N, (void)K;  /* never called: q8_tile_rows() is 0 */
}

void gemv_q8_0_q8_tiles(const float *x, const int8_t *qt, const uint16_t *dt, const int16_t *wt, float *y, int64_t M, int64_t N, int64_t K) {
    (void)x, (void)qt, (void)dt, (void)wt, (void)y, (void)M, (void)N, (void)K;
}
#endif
