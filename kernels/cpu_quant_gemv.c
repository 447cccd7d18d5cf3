/* Matrix-vector products straight from GGUF block-quantised weights, fp32 arithmetic.
 *
 * The embedded model ships as Q4_1 (and its token embedding as Q8_0). Reading those blocks
 * instead of dequantised fp32 weights moves ~6x fewer bytes per token, which is what bounds
 * decoding on a CPU. Every weight is the one the GGUF holds, w = d*q + m (Q4_1) or w = d*q
 * (Q8_0), so outputs match the dequantised model up to fp32 summation order.
 *
 * Layouts (row n of an (N, K) weight, G = 32 weights per block, B = K / G blocks):
 *   q4_1: qs (N, K/2) uint8, block b holds bytes [16b, 16b+16): low nibble = element j,
 *         high nibble = element j+16 (llama.cpp's order); d, m (N, B) float32.
 *   q8_0: qs (N, K) int8; d (N, B) float32.
 * x is (M, K) float32 with small M (decode: 1, speculative verify: K+1); y is (M, N).
 * Built by labkit/kernels/cpu_quant.py with -O3 -march=native -fopenmp; its PyTorch reference
 * is labkit.kernels.reference.quant_linear_ref.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define G 32
#define MAX_M 16

/* xsum[r*B + b] = sum of x[r, 32b : 32b+32], shared by every output row. */
#ifndef __AVX512F__
static void block_sums(const float *x, int64_t M, int64_t K, float *xsum) {
    const int64_t B = K / G;
    for (int64_t r = 0; r < M; r++)
        for (int64_t b = 0; b < B; b++) {
            float s = 0.f;
            for (int j = 0; j < G; j++) s += x[r * K + b * G + j];
            xsum[r * B + b] = s;
        }
}
#endif

void gemv_q4_1(const float *x, const uint8_t *qs, const float *d, const float *m,
               float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t B = K / G;
#ifndef __AVX512F__
    float *xsum = (float *)malloc(sizeof(float) * M * B);
    block_sums(x, M, K, xsum);
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = qs + n * (K / 2);
#ifdef __AVX512F__
        /* Dequantise each block once into registers, w = d*q + m rounded as the dequantised
           model has it (a multiply, then an add); then every row is a plain fp32 dot product.
           Four accumulators per row (low/high half, even/odd block) keep four FMA chains in
           flight: one chain would wait on each FMA's latency. */
        __m512 acc0[MAX_M], acc1[MAX_M], acc2[MAX_M], acc3[MAX_M];
        for (int64_t r = 0; r < M; r++) acc0[r] = acc1[r] = acc2[r] = acc3[r] = _mm512_setzero_ps();
        for (int64_t b = 0; b < B; b += 2) {
            const int two = b + 1 < B;
            __m512 w[4];
            for (int h = 0; h < 1 + two; h++) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(row + (b + h) * 16));
                const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
                const __m512 vd = _mm512_set1_ps(d[n * B + b + h]);
                const __m512 vm = _mm512_set1_ps(m[n * B + b + h]);
                w[2 * h] = _mm512_add_ps(_mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), vm);      /* 0..15 */
                w[2 * h + 1] = _mm512_add_ps(_mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), vm);  /* 16..31 */
            }
            for (int64_t r = 0; r < M; r++) {
                const float *xb = x + r * K + b * G;
                acc0[r] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xb), acc0[r]);
                acc1[r] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xb + 16), acc1[r]);
                if (two) {
                    acc2[r] = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(xb + 32), acc2[r]);
                    acc3[r] = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(xb + 48), acc3[r]);
                }
            }
        }
        for (int64_t r = 0; r < M; r++)
            y[r * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0[r], acc1[r]), _mm512_add_ps(acc2[r], acc3[r])));
#else
        float acc[MAX_M] = {0};
        for (int64_t b = 0; b < B; b++) {
            const uint8_t *blk = row + b * 16;
            float w[G];
            for (int j = 0; j < 16; j++) {
                w[j] = (float)(blk[j] & 0x0F);
                w[j + 16] = (float)(blk[j] >> 4);
            }
            const float db = d[n * B + b], mb = m[n * B + b];
            for (int64_t r = 0; r < M; r++) {
                const float *xb = x + r * K + b * G;
                float dot = 0.f;
                #pragma omp simd reduction(+:dot)
                for (int j = 0; j < G; j++) dot += xb[j] * w[j];
                acc[r] += db * dot + mb * xsum[r * B + b];
            }
        }
        for (int64_t r = 0; r < M; r++) y[r * N + n] = acc[r];
#endif
    }
#ifndef __AVX512F__
    free(xsum);
#endif
}

void gemv_q8_0(const float *x, const int8_t *qs, const float *d,
               float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t B = K / G;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = qs + n * K;
#ifdef __AVX512F__
        __m512 vacc[MAX_M], vacc1[MAX_M];
        for (int64_t r = 0; r < M; r++) vacc[r] = vacc1[r] = _mm512_setzero_ps();
        for (int64_t b = 0; b < B; b++) {
            const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + b * G))));
            const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + b * G + 16))));
            const __m512 vd = _mm512_set1_ps(d[n * B + b]);
            const __m512 dw0 = _mm512_mul_ps(vd, w0), dw1 = _mm512_mul_ps(vd, w1);  /* w = d*q */
            for (int64_t r = 0; r < M; r++) {
                const float *xb = x + r * K + b * G;
                vacc[r] = _mm512_fmadd_ps(dw0, _mm512_loadu_ps(xb), vacc[r]);
                vacc1[r] = _mm512_fmadd_ps(dw1, _mm512_loadu_ps(xb + 16), vacc1[r]);
            }
        }
        for (int64_t r = 0; r < M; r++) y[r * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(vacc[r], vacc1[r]));
#else
        float acc[MAX_M] = {0};
        for (int64_t b = 0; b < B; b++) {
            float w[G];
            for (int j = 0; j < G; j++) w[j] = (float)row[b * G + j];
            const float db = d[n * B + b];
            for (int64_t r = 0; r < M; r++) {
                const float *xb = x + r * K + b * G;
                float dot = 0.f;
                #pragma omp simd reduction(+:dot)
                for (int j = 0; j < G; j++) dot += xb[j] * w[j];
                acc[r] += db * dot;
            }
        }
        for (int64_t r = 0; r < M; r++) y[r * N + n] = acc[r];
#endif
    }
}

int max_rows(void) { return MAX_M; }
