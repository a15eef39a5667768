/*
 * peerinfer's output head: the model's last matrix product (hidden state -> one logit per vocabulary
 * entry) for q8_0 weights, computed outside llama.cpp's graph.
 *
 * Why: Gemma 3 has 262k vocabulary entries, so this one product is most of a decode step. llama.cpp
 * computes it for several rows at once with a kernel that costs about as much per row as one row
 * alone (and an odd row count makes a second pass over the weights). Here each block of weights is
 * loaded once and multiplied with up to 8 rows.
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
 * Two kernels give the same logits: AVX2 (ggml's own instructions, one hidden row per register) and,
 * where the CPU has AVX-512 with VNNI, one that holds two hidden rows per 512-bit register and gets
 * each lane's integer sum from one dpbusd. Gemma 3 270M's product on 2 threads of this project's build
 * machine (an AMD EPYC with AVX-512), measured with a C harness: AVX2 2.9 / 5.4 / 9.7 ms for 1 / 4 /
 * 8 rows, AVX-512 3.0 / 3.5 / 5.6 ms (one pass over the 178 MB of weights is ~3 to 4 ms of memory
 * reads). Tried and left out: 256-bit VNNI (at most 6% faster than AVX2), tiles of 2 vocabulary rows
 * (3x slower: two interleaved weight streams defeat the prefetcher).
 *
 * Built by scripts/setup.sh with: cc -O3 -fPIC -shared -fopenmp output_head.c -o _output_head.so
 * The SIMD code carries its own target attributes and only runs where po_kernels() says so.
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
#define PO_COLUMNS 8 /* hidden rows multiplied per pass over the weights */

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

enum { PO_KERNEL_AVX2 = 1, PO_KERNEL_AVX512 = 2 };

/* The kernels this CPU runs, as a bit mask of PO_KERNEL_* (0 where po_supported() is false). */
int po_kernels(void) {
    if (!po_supported()) {
        return 0;
    }
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512vnni");
    return PO_KERNEL_AVX2 | (avx512 ? PO_KERNEL_AVX512 : 0);
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

/*
 * One vocabulary row's logits for a constant number of hidden rows (columns <= PO_COLUMNS), so that the
 * accumulators stay in registers: ggml's AVX2 vec_dot_q8_0_q8_0 per column, each block's weights
 * loaded once. x[c][b] is hidden row c's block b (32 values, 32-aligned); scales[b][c] its fp16 scale as
 * a float, PO_COLUMNS per block, so that one vector multiply gives every column's w.d * x.d.
 */
PO_SIMD static inline __attribute__((always_inline)) void tile(const block_q8_0 * row, int blocks, const int8_t * x,
                                                              const float * scales, const int columns, float ** out,
                                                              int64_t v) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[PO_COLUMNS];
    float d[PO_COLUMNS] __attribute__((aligned(32)));
    _Pragma("GCC unroll 8") for (int c = 0; c < columns; c++) { acc[c] = _mm256_setzero_ps(); }
    for (int b = 0; b < blocks; b++) {
        _mm256_store_ps(d, _mm256_mul_ps(_mm256_set1_ps(fp16_to_fp32(row[b].d)), _mm256_load_ps(scales + b * PO_COLUMNS)));
        const __m256i w = _mm256_loadu_si256((const __m256i *) row[b].qs);
        const __m256i w_abs = _mm256_sign_epi8(w, w);
        _Pragma("GCC unroll 8") for (int c = 0; c < columns; c++) {
            const __m256i xc = _mm256_load_si256((const __m256i *) (x + ((size_t) c * blocks + b) * 32));
            const __m256i pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xc, w));
            const __m256 q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, pairs));
            acc[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&d[c]), q, acc[c]);
        }
    }
    _Pragma("GCC unroll 8") for (int c = 0; c < columns; c++) { out[c][v] = sum_lanes(acc[c]); }
}

/* out[c][v] for columns c < columns and vocabulary rows v in [first, last): one vocabulary row at a time,
 * since interleaving two rows' weight streams defeats the hardware prefetcher (measured 3x slower) */
PO_SIMD static void product(const block_q8_0 * weights, int blocks, const int8_t * x, const float * scales,
                            int columns, float ** out, int64_t first, int64_t last) {
    for (int64_t v = first; v < last; v++) {
        const block_q8_0 * row = weights + v * blocks;
        switch (columns) { /* each case a constant, or the tile's arrays go to memory (measured slower) */
        case 1: tile(row, blocks, x, scales, 1, out, v); break;
        case 2: tile(row, blocks, x, scales, 2, out, v); break;
        case 3: tile(row, blocks, x, scales, 3, out, v); break;
        case 4: tile(row, blocks, x, scales, 4, out, v); break;
        case 5: tile(row, blocks, x, scales, 5, out, v); break;
        case 6: tile(row, blocks, x, scales, 6, out, v); break;
        case 7: tile(row, blocks, x, scales, 7, out, v); break;
        default: tile(row, blocks, x, scales, 8, out, v); break;
        }
    }
}

#define PO_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define PO_PAIRS (PO_COLUMNS / 2)

/*
 * The AVX-512 kernel: the same logits, two hidden rows per instruction. Each 512-bit register holds
 * columns 2p and 2p+1 side by side (256 bits each), so every lane does exactly what the AVX2 kernel's
 * lane does: x2[p][b] is the two rows' block b shifted by +128 (unsigned, 64 bytes), and
 * dpbusd(-128 * lane sum of w, x + 128, w) is each lane's exact integer sum of w * x, the same as
 * ggml's sign/maddubs/madd. scales2[b][p] holds the two rows' scales, 8 each, so one multiply gives
 * ggml's w.d * x.d for both; the conversion and the fmadd are ggml's, in ggml's order.
 */
PO_AVX512 static inline __attribute__((always_inline)) void tile_avx512(const block_q8_0 * row, int blocks,
                                                                       const uint8_t * x2, const float * scales2,
                                                                       const int pairs, const int columns,
                                                                       float ** out, int64_t v) {
    const __m512i bias = _mm512_set1_epi8((char) 0x80);
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[PO_PAIRS];
    _Pragma("GCC unroll 4") for (int p = 0; p < pairs; p++) { acc[p] = _mm512_setzero_ps(); }
    for (int b = 0; b < blocks; b++) {
        const __m512 wd = _mm512_set1_ps(fp16_to_fp32(row[b].d));
        const __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) row[b].qs));
        const __m512i base = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, w));
        _Pragma("GCC unroll 4") for (int p = 0; p < pairs; p++) {
            const __m512i x = _mm512_load_si512((const void *) (x2 + ((size_t) p * blocks + b) * 64));
            const __m512 q = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(base, x, w));
            const __m512 d = _mm512_mul_ps(wd, _mm512_load_ps(scales2 + ((size_t) b * PO_PAIRS + p) * 16));
            acc[p] = _mm512_fmadd_ps(d, q, acc[p]);
        }
    }
    _Pragma("GCC unroll 4") for (int p = 0; p < pairs; p++) {
        out[2 * p][v] = sum_lanes(_mm512_castps512_ps256(acc[p]));
        if (2 * p + 1 < columns) {
            out[2 * p + 1][v] = sum_lanes(_mm512_extractf32x8_ps(acc[p], 1));
        }
    }
}

PO_AVX512 static void product_avx512(const block_q8_0 * weights, int blocks, const uint8_t * x2,
                                     const float * scales2, int columns, float ** out, int64_t first, int64_t last) {
    for (int64_t v = first; v < last; v++) {
        const block_q8_0 * row = weights + v * blocks;
        switch (columns) {
        case 1: tile_avx512(row, blocks, x2, scales2, 1, 1, out, v); break;
        case 2: tile_avx512(row, blocks, x2, scales2, 1, 2, out, v); break;
        case 3: tile_avx512(row, blocks, x2, scales2, 2, 3, out, v); break;
        case 4: tile_avx512(row, blocks, x2, scales2, 2, 4, out, v); break;
        case 5: tile_avx512(row, blocks, x2, scales2, 3, 5, out, v); break;
        case 6: tile_avx512(row, blocks, x2, scales2, 3, 6, out, v); break;
        case 7: tile_avx512(row, blocks, x2, scales2, 4, 7, out, v); break;
        default: tile_avx512(row, blocks, x2, scales2, 4, 8, out, v); break;
        }
    }
}

/*
 * logits[r][v] = dot(weights[v], hidden[r]) for rows r < rows, into out[r] (n_vocab floats each), with
 * ``kernel``, one of po_kernels(). weights: q8_0, n_vocab rows of n_embd values. Returns 0, or -1 for
 * sizes or a kernel it does not handle (or no memory).
 */
PO_SIMD int po_logits(const void * weights, int64_t n_vocab, int32_t n_embd, const float * hidden, int32_t rows,
                      float ** out, int32_t threads, int32_t kernel) {
    const bool known = (kernel == PO_KERNEL_AVX2 || kernel == PO_KERNEL_AVX512) && (po_kernels() & kernel) != 0;
    if (rows < 1 || rows > PO_MAX_ROWS || n_embd % 32 != 0 || n_embd / 32 > PO_MAX_BLOCKS || threads < 1 || !known) {
        return -1;
    }
    const int blocks = n_embd / 32;
    const int passes = (rows + PO_COLUMNS - 1) / PO_COLUMNS;
    const size_t x_bytes = (size_t) passes * PO_COLUMNS * (size_t) blocks * 32;
    const size_t scale_floats = (size_t) passes * (size_t) blocks * PO_PAIRS * 16; /* >= the AVX2 layout's */
    block_q8_0 * quantized = malloc(sizeof(block_q8_0) * (size_t) blocks);
    uint8_t * x = aligned_alloc(64, x_bytes);
    float * scales = aligned_alloc(64, sizeof(float) * scale_floats);
    if (quantized == NULL || x == NULL || scales == NULL) {
        free(quantized);
        free(x);
        free(scales);
        return -1;
    }
    /* The kernels' layouts, PO_COLUMNS rows per pass; a pass with fewer rows is padded with zero
     * scales (and, for AVX-512, x = 0 shifted to 128), whose results are not written.
     * AVX2: x[r][b] (32 signed bytes), scales[pass][b][c] (PO_COLUMNS floats per block).
     * AVX-512: x[pass][p][b] (64 bytes: rows 2p and 2p+1 of the pass, +128), scales[pass][b][p] (16 floats). */
    const bool avx512 = kernel == PO_KERNEL_AVX512;
    memset(x, avx512 ? 128 : 0, x_bytes);
    memset(scales, 0, sizeof(float) * scale_floats);
    for (int r = 0; r < rows; r++) {
        quantize_row(hidden + (size_t) r * (size_t) n_embd, quantized, blocks);
        const size_t pass = (size_t) (r / PO_COLUMNS);
        const int c = r % PO_COLUMNS;
        for (int b = 0; b < blocks; b++) {
            const float scale = fp16_to_fp32(quantized[b].d);
            if (avx512) {
                const size_t pair = (pass * PO_PAIRS + (size_t) (c / 2)) * (size_t) blocks + (size_t) b;
                float * into = scales + ((pass * (size_t) blocks + (size_t) b) * PO_PAIRS + (size_t) (c / 2)) * 16;
                for (int i = 0; i < 8; i++) {
                    into[(c % 2) * 8 + i] = scale;
                }
                for (int i = 0; i < 32; i++) {
                    x[pair * 64 + (size_t) (c % 2) * 32 + (size_t) i] = (uint8_t) ((uint8_t) quantized[b].qs[i] + 128);
                }
            } else {
                scales[(pass * (size_t) blocks + (size_t) b) * PO_COLUMNS + (size_t) c] = scale;
                memcpy(x + ((size_t) r * (size_t) blocks + (size_t) b) * 32, quantized[b].qs, 32);
            }
        }
    }
    const block_q8_0 * matrix = (const block_q8_0 *) weights;
#pragma omp parallel num_threads(threads)
    {
        const int64_t team = omp_get_num_threads();
        const int64_t share = (n_vocab + team - 1) / team;
        const int64_t first = omp_get_thread_num() * share;
        const int64_t last = first + share < n_vocab ? first + share : n_vocab;
        for (int r = 0; r < rows; r += PO_COLUMNS) {
            const int columns = rows - r < PO_COLUMNS ? rows - r : PO_COLUMNS;
            const size_t pass = (size_t) (r / PO_COLUMNS);
            const uint8_t * xr = x + pass * PO_COLUMNS * (size_t) blocks * 32;
            if (avx512) {
                const float * sr = scales + pass * (size_t) blocks * PO_PAIRS * 16;
                product_avx512(matrix, blocks, xr, sr, columns, out + r, first, last);
            } else {
                const float * sr = scales + pass * (size_t) blocks * PO_COLUMNS;
                product(matrix, blocks, (const int8_t *) xr, sr, columns, out + r, first, last);
            }
        }
    }
    free(quantized);
    free(x);
    free(scales);
    return 0;
}
