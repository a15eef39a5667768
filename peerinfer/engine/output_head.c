/*
 * peerinfer's output head: the model's last matrix product (hidden state -> one logit per vocabulary
 * entry) for q8_0 weights, computed outside llama.cpp's graph.
 *
 * Why: Gemma 3 has 262k vocabulary entries, so this one product is most of a decode step. llama.cpp
 * computes it for several rows at once with a kernel that costs about as much per row as one row
 * alone (and an odd row count makes a second pass over the weights). Here each block of weights is
 * loaded once and multiplied with every row, so 4 rows cost about 2.5x one row instead of 3.5x.
 *
 * Exactness: each logit is computed with the same operations in the same order as ggml's AVX2
 * vec_dot_q8_0_q8_0 (and its tinyBLAS twin), after quantizing the hidden state exactly as ggml's
 * x86 quantize_row_q8_0 does, so the logits are bit for bit llama.cpp's. The worker checks this at
 * load and does not use the head if a single logit differs.
 *
 * How it plugs in: llama.cpp's graph-evaluation callback (po_eval) asks for the node named
 * "result_norm" (the normalised hidden state that feeds the output product), copies its rows out,
 * and returns false, which makes ggml's scheduler skip the rest of the graph: the product itself.
 *
 * Built by scripts/setup.sh with: cc -O3 -fPIC -shared -fopenmp output_head.c -o _output_head.so
 * The SIMD code carries its own target attribute and only runs where po_supported() says so.
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>
#include <omp.h>

#define PO_MAX_ROWS 64
#define PO_MAX_BLOCKS 1024 /* hidden rows of up to 32768 values */
#define PO_COLUMNS 4      /* rows multiplied per pass over the weights */

typedef struct {
    uint16_t d; /* fp16 scale */
    int8_t qs[32];
} __attribute__((packed)) block_q8_0;

/* ggml's accessors, from the libggml-base that llama_cpp loaded (made global before this library) */
struct ggml_tensor;
extern const char * ggml_get_name(const struct ggml_tensor * tensor);
extern void * ggml_get_data(const struct ggml_tensor * tensor);
extern int64_t ggml_nrows(const struct ggml_tensor * tensor);
extern int64_t ggml_nelements(const struct ggml_tensor * tensor);

enum { PO_OFF = 0, PO_SKIP = 1, PO_CAPTURE = 2 };

/* Shared with Python (output_head.py mirrors this layout). */
typedef struct {
    int32_t mode;     /* PO_OFF: not involved; PO_SKIP: capture, then skip the product; PO_CAPTURE: capture only */
    int32_t n_embd;   /* values per hidden row */
    int32_t max_rows; /* rows that fit in hidden */
    int32_t rows;     /* rows captured since Python last reset it */
    int32_t overflow; /* a capture did not fit: the hidden rows are incomplete */
    float * hidden;   /* max_rows x n_embd */
} po_capture;

bool po_eval(struct ggml_tensor * tensor, bool ask, void * user_data) {
    po_capture * capture = (po_capture *) user_data;
    if (ask) {
        return capture->mode != PO_OFF && strcmp(ggml_get_name(tensor), "result_norm") == 0;
    }
    const int64_t rows = ggml_nrows(tensor);
    const int64_t width = rows > 0 ? ggml_nelements(tensor) / rows : 0;
    if (rows > 0 && (width != capture->n_embd || capture->rows + rows > capture->max_rows)) {
        capture->overflow = 1;
    } else if (rows > 0) {
        memcpy(capture->hidden + (size_t) capture->rows * (size_t) width, ggml_get_data(tensor),
               (size_t) (rows * width) * sizeof(float));
        capture->rows += (int32_t) rows;
    }
    return capture->mode != PO_SKIP; /* false stops the scheduler before the output product */
}

int po_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#define PO_SIMD __attribute__((target("avx2,fma,f16c")))

PO_SIMD static inline float fp16_to_fp32(uint16_t value) { return _cvtsh_ss(value); }

/* ggml's x86 quantize_row_q8_0: scale amax/127 stored as fp16, values round(x * 127/amax), ties to even */
PO_SIMD static void quantize_row(const float * x, block_q8_0 * out, int blocks) {
    for (int b = 0; b < blocks; b++) {
        const float * values = x + b * 32;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float magnitude = fabsf(values[i]);
            amax = magnitude > amax ? magnitude : amax;
        }
        out[b].d = _cvtss_sh(amax / 127.f, 0);
        const float inverse = amax != 0.0f ? 127.f / amax : 0.0f;
        for (int i = 0; i < 32; i++) {
            out[b].qs[i] = (int8_t) nearbyintf(values[i] * inverse);
        }
    }
}

/* ggml's hsum_float_8 */
PO_SIMD static inline float sum_lanes(__m256 x) {
    __m128 r = _mm256_extractf128_ps(x, 1);
    r = _mm_add_ps(r, _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* out[c][v] for columns c < columns <= PO_COLUMNS and vocabulary rows v in [first, last) */
PO_SIMD static void product(const block_q8_0 * weights, int blocks, const block_q8_0 * hidden,
                            const float * hidden_scales, int columns, float ** out, int64_t first, int64_t last) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t v = first; v < last; v++) {
        const block_q8_0 * row = weights + v * blocks;
        __m256 acc[PO_COLUMNS];
        for (int c = 0; c < PO_COLUMNS; c++) {
            acc[c] = _mm256_setzero_ps();
        }
        for (int b = 0; b < blocks; b++) {
            const float scale = fp16_to_fp32(row[b].d);
            const __m256i w = _mm256_loadu_si256((const __m256i *) row[b].qs);
            const __m256i w_abs = _mm256_sign_epi8(w, w);
            for (int c = 0; c < columns; c++) {
                const block_q8_0 * x = hidden + c * blocks + b;
                const __m256 d = _mm256_set1_ps(scale * hidden_scales[c * blocks + b]);
                const __m256i x_signed = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *) x->qs), w);
                const __m256i pairs = _mm256_maddubs_epi16(w_abs, x_signed);
                const __m256 q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, pairs));
                acc[c] = _mm256_fmadd_ps(d, q, acc[c]);
            }
        }
        for (int c = 0; c < columns; c++) {
            out[c][v] = sum_lanes(acc[c]);
        }
    }
}

/*
 * logits[r][v] = dot(weights[v], hidden[r]) for rows r < rows, into out[r] (n_vocab floats each).
 * weights: q8_0, n_vocab rows of n_embd values. Returns 0, or -1 for sizes it does not handle (or no memory).
 */
PO_SIMD int po_logits(const void * weights, int64_t n_vocab, int32_t n_embd, const float * hidden, int32_t rows,
                      float ** out, int32_t threads) {
    if (rows < 1 || rows > PO_MAX_ROWS || n_embd % 32 != 0 || n_embd / 32 > PO_MAX_BLOCKS || threads < 1) {
        return -1;
    }
    const int blocks = n_embd / 32;
    block_q8_0 * quantized = malloc(sizeof(block_q8_0) * (size_t) (rows * blocks));
    float * scales = malloc(sizeof(float) * (size_t) (rows * blocks));
    if (quantized == NULL || scales == NULL) {
        free(quantized);
        free(scales);
        return -1;
    }
    for (int r = 0; r < rows; r++) {
        quantize_row(hidden + (size_t) r * (size_t) n_embd, quantized + r * blocks, blocks);
        for (int b = 0; b < blocks; b++) {
            scales[r * blocks + b] = fp16_to_fp32(quantized[r * blocks + b].d);
        }
    }
    const block_q8_0 * matrix = (const block_q8_0 *) weights;
    const block_q8_0 * xq = quantized;
    const float * xs = scales;
#pragma omp parallel num_threads(threads)
    {
        const int64_t team = omp_get_num_threads();
        const int64_t share = (n_vocab + team - 1) / team;
        const int64_t first = omp_get_thread_num() * share;
        const int64_t last = first + share < n_vocab ? first + share : n_vocab;
        for (int r = 0; r < rows; r += PO_COLUMNS) {
            const int columns = rows - r < PO_COLUMNS ? rows - r : PO_COLUMNS;
            product(matrix, blocks, xq + r * blocks, xs + r * blocks, columns, out + r, first, last);
        }
    }
    free(quantized);
    free(scales);
    return 0;
}
