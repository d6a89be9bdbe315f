/* cnnlab's native CPU kernels: the papers' conv blocks ((ReLU →) (BatchNorm2d →) MaxPool2d(2)) in one pass
 * over the convolution's output forward and one backward, for channels-last (NHWC) tensors in float32 or
 * bfloat16. Compiled on first use by cnnlab/models/native.py (the C compiler the machine has, -O3
 * -march=native, OpenMP — the libgomp torch has already loaded) and called through ctypes; see that file
 * for why and for what it replaces. Every function here is checked against torch's modules in
 * tests/test_native.py.
 *
 * Layout: y is (N, H, W, C) dense; the pooled tensors (N, H/2, W/2, C) dense; idx one byte per pooled
 * value: which of the window's four positions (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)
 * holds the max, ties and NaN resolved as torch's CPU max-pool does (the first max in row order; a NaN
 * replaces what came before it).
 *
 * At the end, batch augmentation's flip and affine warp (cnnlab_warp_affine_f32, for data/augment.py).
 *
 * Every kernel returns 0, or 1 when its scratch memory could not be allocated (each thread then skips its
 * share of the work, so the outputs are unfinished): native.py turns that into a MemoryError.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static inline float bf16_load(const uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_store(const float f) {  /* round to nearest even, as torch's c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return (uint16_t)0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f32_load(const float v) { return v; }
static inline float f32_store(const float f) { return f; }

/* Every loop below runs over floats in contiguous memory, so the compiler vectorises it for whatever the
 * CPU has (AVX2, AVX-512…). The channels of one window are a block of C values; where a loop must go
 * block by block it works in chunks of 16 lanes (LANES), fixed so the compiler vectorises them, even when
 * C is smaller (the second paper's 10 channels): a chunk may spill into the next block, which a later
 * chunk then overwrites — the blocks go in increasing order, into scratch rows padded by a chunk. */
#define LANES 16

static float *scratch(int64_t n) {  /* n zeroed floats, 64-byte aligned, with room for a chunk's spill */
    const size_t bytes = (size_t)((n + 2 * LANES - 1) / LANES * LANES) * sizeof(float);
    float *p = (float *)aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);  /* the spill lanes are read but never used: zeros, not stray NaNs or denormals */
    return p;
}

static uint8_t *scratch_bytes(int64_t n) {
    return (uint8_t *)aligned_alloc(64, (size_t)((n + 2 * 64 - 1) / 64 * 64));
}

/* Inside a kernel's parallel region, after a thread's scratch allocations: `ok` says whether they all
 * succeeded; when not, the kernel's `failed` is set and the thread skips its share of the loop. */
#define SCRATCH_READY(allocated) int ok = (allocated); if (!ok) { _Pragma("omp atomic write") failed = 1; }

static inline void relu_row(float *restrict r, int64_t n) {
    for (int64_t j = 0; j < n; j++) r[j] = r[j] < 0.0f ? 0.0f : r[j];  /* NaN stays NaN, as torch's relu */
}

/* One chunk of LANES values, written with GCC's vector extensions (plain C loops over a chunk get
 * vectorised across chunks instead, into strided gathers): loads and stores may be unaligned. */
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint8_t vb __attribute__((vector_size(LANES)));

/* Loads and stores of a float vector F and a byte vector B, and a lane-wise select by an int32 mask I. */
#define VECTOR_OPS(F, I, B, LDF, STF, LDB, STB, PICK)                                                    \
    static inline F LDF(const float *p) { F v; memcpy(&v, p, sizeof v); return v; }                     \
    static inline void STF(float *p, F v) { memcpy(p, &v, sizeof v); }                                 \
    static inline B LDB(const uint8_t *p) { B v; memcpy(&v, p, sizeof v); return v; }                  \
    static inline void STB(uint8_t *p, B v) { memcpy(p, &v, sizeof v); }                               \
    static inline F PICK(I m, F a, F b) { return (F)(((I)a & m) | ((I)b & ~m)); }  /* m ? a : b */

VECTOR_OPS(vf, vi, vb, ldf, stf, ldb, stb, pick)

/* The row loops below (max-pool, statistics, spreading a gradient) go lane by lane, so they work in one
 * register's width, VL lanes — 16 with AVX-512, 8 with AVX2 — in steps of VL within the LANES-padded scratch
 * rows. Written with 16-lane vectors, they ran 2–8× slower than torch's ops on a Zen 3 (AVX2: a 16-lane
 * vector is two registers there, and GCC 12 kept such values on the stack and converted int32 lanes to bytes
 * one insert at a time; `benchmarks/block_bench.py`). */
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
typedef float rf __attribute__((vector_size(4 * VL)));
typedef int32_t ri __attribute__((vector_size(4 * VL)));
typedef uint8_t rb __attribute__((vector_size(VL)));

VECTOR_OPS(rf, ri, rb, ldr, str, ldrb, strb, pickr)
static inline ri widen(rb b) { return __builtin_convertvector(b, ri); }

/* int32 lanes to bytes, each within −128…127 (a 0/−1 mask, a 0/1 bit, a window position): GCC 12 narrows
 * lane by lane on AVX2, so packs there. */
#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
static inline rb narrow(ri t) {
    __m256i v;
    memcpy(&v, &t, sizeof v);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const __m128i b = _mm_packs_epi16(w, w);
    rb out;
    memcpy(&out, &b, sizeof out);
    return out;
}
#else
static inline rb narrow(ri t) { return __builtin_convertvector(t, rb); }
#endif

/* Horizontal max of one row: out[wo, c] = max(r[2wo, c], r[2wo+1, c]), bit[wo, c] = 1 when the right one
 * wins (greater, or NaN), so a tie goes left as in torch's scan. */
static inline void hmax_row(const float *restrict r, int64_t Wo, int64_t C, float *restrict out,
                            uint8_t *restrict bit) {
    for (int64_t wo = 0; wo < Wo; wo++)
        for (int64_t c0 = 0; c0 < C; c0 += VL) {
            const rf a = ldr(r + 2 * wo * C + c0), b = ldr(r + (2 * wo + 1) * C + c0);
            const ri t = (b > a) | (b != b);
            str(out + wo * C + c0, pickr(t, b, a));
            strb(bit + wo * C + c0, narrow(t & 1));
        }
}

/* The window max from the two rows' horizontal maxima (the bottom wins when greater or NaN): the position
 * 0–3 as torch's scan order gives it, contiguous over Wo·C. */
static inline void vmax_rows(const float *restrict h0, const uint8_t *restrict k0, const float *restrict h1,
                             const uint8_t *restrict k1, int64_t n, float *restrict out, uint8_t *restrict ix) {
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {  /* GCC left the loop below scalar, with a branch, on AVX2 */
        const rf a = ldr(h0 + j), b = ldr(h1 + j);
        const ri t = (b > a) | (b != b);
        str(out + j, pickr(t, b, a));
        const rb m = narrow(t);
        strb(ix + j, (m & (ldrb(k1 + j) + 2)) | (~m & ldrb(k0 + j)));
    }
    for (; j < n; j++) {
        const int t = (h1[j] > h0[j]) | (h1[j] != h1[j]);
        out[j] = t ? h1[j] : h0[j];
        ix[j] = (uint8_t)(t ? 2 + k1[j] : k0[j]);
    }
}

/* sum[c] += Σ_w r[w, c], sq[c] += Σ_w r[w, c]² over the W positions of a row (chunked: see above): float
 * within the row, double across rows (batch norm's variance is E[x²] − E[x]², so it needs the sums to
 * ~1e-7 of themselves; float sums over the whole tensor would not keep that). */
static inline void add_stats(const float *restrict r, int64_t W, int64_t C, double *restrict sum,
                             double *restrict sq) {
    for (int64_t c0 = 0; c0 < C; c0 += VL) {
        rf s = {0}, q = {0};
        for (int64_t w = 0; w < W; w++) {
            const rf v = ldr(r + w * C + c0);
            s += v;
            q += v * v;
        }
        for (int l = 0; l < VL && c0 + l < C; l++) { sum[c0 + l] += s[l]; sq[c0 + l] += q[l]; }
    }
}

/* sum[c] += Σ_w g[w, c], dot[c] += Σ_w g[w, c]·p[w, c] over the W positions of a row (chunked; float
 * within the row, double across rows, as add_stats). */
static inline void add_products(const float *restrict g, const float *restrict p, int64_t W, int64_t C,
                                double *restrict sum, double *restrict dot) {
    for (int64_t c0 = 0; c0 < C; c0 += VL) {
        rf s = {0}, d = {0};
        for (int64_t w = 0; w < W; w++) {
            const rf u = ldr(g + w * C + c0);
            s += u;
            d += u * ldr(p + w * C + c0);
        }
        for (int l = 0; l < VL && c0 + l < C; l++) { sum[c0 + l] += s[l]; dot[c0 + l] += d[l]; }
    }
}

/* sums[j] = Σ_t part[t·n + j]: the threads' partial sums, added in a fixed order. */
static void sum_parts(const double *part, int nthreads, int64_t n, double *sums) {
    for (int64_t j = 0; j < n; j++) {
        double s = 0.0;
        for (int t = 0; t < nthreads; t++) s += part[(size_t)t * n + j];
        sums[j] = s;
    }
}

/* The pooled gradient spread over one input row: g[w, c] = gp[w/2, c] where (row bit `bit`, w & 1) is the
 * window's max, else 0; 0 on an odd last column. ix and gp are padded scratch rows (chunks read past them). */
static inline void spread_row(const uint8_t *restrict ix, const float *restrict gp, int64_t W, int64_t C,
                              int32_t bit, float *restrict g) {
    const int64_t Wo = W / 2;
    const rf zero = {0};
    if (C % VL == 0) {  /* whole vectors: both sides from one load */
        for (int64_t wo = 0; wo < Wo; wo++)
            for (int64_t c0 = 0; c0 < C; c0 += VL) {
                const ri k = widen(ldrb(ix + wo * C + c0));
                const rf p = ldr(gp + wo * C + c0);
                str(g + 2 * wo * C + c0, pickr(k == bit, p, zero));
                str(g + (2 * wo + 1) * C + c0, pickr(k == bit + 1, p, zero));
            }
    } else {
        for (int64_t wo = 0; wo < Wo; wo++)
            for (int32_t side = 0; side < 2; side++)  /* the left block's vectors, then the right's, which */
                for (int64_t c0 = 0; c0 < C; c0 += VL) {  /* overwrite what the left ones spilt */
                    const ri k = widen(ldrb(ix + wo * C + c0));
                    str(g + (2 * wo + side) * C + c0, pickr(k == bit + side, ldr(gp + wo * C + c0), zero));
                }
    }
    for (int64_t j = 2 * Wo * C; j < W * C; j++) g[j] = 0.0f;
}

/* The pooled gradient row gp (already scaled) spread over input row h of image n, into sp (WC floats): via the
 * window positions of pooled row h/2, copied into the padded scratch kx first (chunks read past a row); zeros
 * for the odd last row, which the pool dropped. */
static inline void spread_input_row(const uint8_t *restrict idx, const float *restrict gp, int64_t n, int64_t h,
                                    int64_t Ho, int64_t W, int64_t C, uint8_t *restrict kx, float *restrict sp) {
    const int64_t PC = (W / 2) * C;
    if (h / 2 < Ho) {
        memcpy(kx, idx + (n * Ho + h / 2) * PC, (size_t)PC);
        spread_row(kx, gp, W, C, (int32_t)((h & 1) * 2), sp);
    } else {
        memset(sp, 0, sizeof(float) * W * C);
    }
}

/* pool_stats: pooled = max over each 2×2 window of v, idx = its position, where v = relu(y) when `relu`
 * (else y); when `stats`, also the per-channel sum and sum of squares of v over the whole tensor (odd
 * edge rows and columns included), into sums[0:C] and sums[C:2C] (double). */
#define DEFINE_POOL_STATS(NAME, T, LOAD, STORE)                                                          \
int NAME(const T *y, int64_t N, int64_t H, int64_t W, int64_t C, T *pooled, uint8_t *idx,           \
          double *sums, int relu, int stats, int nthreads) {                                             \
    const int64_t Ho = H / 2, Wo = W / 2, WC = W * C, PC = Wo * C;                                       \
    if (nthreads < 1) nthreads = 1;                                                                      \
    double *part = (double *)calloc((size_t)nthreads * 2 * C, sizeof(double));                           \
    int failed = !part;                                                                                  \
    if (failed) return 1;                                                                                \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        double *mine = part + (size_t)omp_get_thread_num() * 2 * C;                                      \
        float *r0 = scratch(WC), *r1 = scratch(WC), *h0 = scratch(PC), *h1 = scratch(PC);                \
        float *out = scratch(PC);                                                                        \
        uint8_t *k0 = scratch_bytes(PC), *k1 = scratch_bytes(PC);                                        \
        SCRATCH_READY(r0 && r1 && h0 && h1 && out && k0 && k1);                                          \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t row = 0; row < N * Ho; row++) {                                                     \
            if (!ok) continue;                                                                           \
            const int64_t n = row / Ho, ho = row % Ho;                                                   \
            const T *s0 = y + (n * H + 2 * ho) * WC, *s1 = s0 + WC;                                      \
            for (int64_t j = 0; j < WC; j++) { r0[j] = LOAD(s0[j]); r1[j] = LOAD(s1[j]); }              \
            if (relu) { relu_row(r0, WC); relu_row(r1, WC); }                                            \
            hmax_row(r0, Wo, C, h0, k0);                                                                 \
            hmax_row(r1, Wo, C, h1, k1);                                                                 \
            vmax_rows(h0, k0, h1, k1, PC, out, idx + (n * Ho + ho) * PC);                                \
            T *dst = pooled + (n * Ho + ho) * PC;                                                        \
            for (int64_t j = 0; j < PC; j++) dst[j] = STORE(out[j]);                                     \
            if (stats) {  /* whole rows (the odd last column included), still in cache */               \
                add_stats(r0, W, C, mine, mine + C);                                                     \
                add_stats(r1, W, C, mine, mine + C);                                                     \
                if ((H & 1) && ho == Ho - 1) {  /* and the odd last row, which max-pool drops */         \
                    const T *s2 = y + (n * H + H - 1) * WC;                                              \
                    for (int64_t j = 0; j < WC; j++) r0[j] = LOAD(s2[j]);                                 \
                    if (relu) relu_row(r0, WC);                                                          \
                    add_stats(r0, W, C, mine, mine + C);                                                 \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        free(r0); free(r1); free(h0); free(h1); free(out); free(k0); free(k1);                           \
    }                                                                                                    \
    if (stats && !failed) sum_parts(part, nthreads, 2 * C, sums);                                        \
    free(part);                                                                                          \
    return failed;                                                                                       \
}

/* A per-channel vector spread over a row of n = (positions)·C values: pattern[j] = v[j % C]. */
static inline void spread_channels(const float *restrict v, int64_t n, int64_t C, float *restrict pattern) {
    for (int64_t j = 0; j < n; j++) pattern[j] = v[j % C];
}

/* pool_affine: out = scale[c]·pooled + shift[c] over the pooled tensor (batch norm's affine, after the pool). */
#define DEFINE_POOL_AFFINE(NAME, T, LOAD, STORE)                                                         \
int NAME(const T *pooled, const float *scale, const float *shift, T *out, int64_t rows, int64_t PC,    \
          int64_t C, int nthreads) {                                                                     \
    if (nthreads < 1) nthreads = 1;                                                                      \
    int failed = 0;                                                                                      \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        float *ss = scratch(PC), *sh = scratch(PC);                                                      \
        SCRATCH_READY(ss && sh);                                                                         \
        if (ok) { spread_channels(scale, PC, C, ss); spread_channels(shift, PC, C, sh); }                \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t row = 0; row < rows; row++) {                                                       \
            if (!ok) continue;                                                                           \
            const T *p = pooled + row * PC;                                                              \
            T *q = out + row * PC;                                                                       \
            for (int64_t j = 0; j < PC; j++) q[j] = STORE(LOAD(p[j]) * ss[j] + sh[j]);                   \
        }                                                                                                \
        free(ss); free(sh);                                                                              \
    }                                                                                                    \
    return failed;                                                                                       \
}

/* pool_grad_sums: per channel, Σ g and Σ g·pooled over the pooled tensor, into sums[0:C] and sums[C:2C]
 * (double) — what batch norm's backward needs for its bias and weight gradients. */
#define DEFINE_POOL_GRAD_SUMS(NAME, T, LOAD)                                                             \
int NAME(const T *g, const T *pooled, int64_t rows, int64_t Wo, int64_t C, double *sums, int nthreads) { \
    const int64_t PC = Wo * C;                                                                           \
    if (nthreads < 1) nthreads = 1;                                                                      \
    double *part = (double *)calloc((size_t)nthreads * 2 * C, sizeof(double));                           \
    int failed = !part;                                                                                  \
    if (failed) return 1;                                                                                \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        double *mine = part + (size_t)omp_get_thread_num() * 2 * C;                                      \
        float *gr = scratch(PC), *pr = scratch(PC);                                                      \
        SCRATCH_READY(gr && pr);                                                                         \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t row = 0; row < rows; row++) {                                                       \
            if (!ok) continue;                                                                           \
            const T *gs = g + row * PC, *ps = pooled + row * PC;                                         \
            for (int64_t j = 0; j < PC; j++) { gr[j] = LOAD(gs[j]); pr[j] = LOAD(ps[j]); }               \
            add_products(gr, pr, Wo, C, mine, mine + C);                                                 \
        }                                                                                                \
        free(gr); free(pr);                                                                              \
    }                                                                                                    \
    if (!failed) sum_parts(part, nthreads, 2 * C, sums);                                                 \
    free(part);                                                                                          \
    return failed;                                                                                       \
}

/* sp = kk·y + bb + sp where y > 0, else 0 (NaN included), over n values of padded scratch rows: pool_backward's
 * row. In vectors: as a plain loop inside the kernel GCC left it scalar, with a branch, on AVX2. */
static inline void relu_affine_row(const float *restrict y, const float *restrict kk, const float *restrict bb,
                                   float *restrict sp, int64_t n) {
    const rf zero = {0};
    for (int64_t j = 0; j < n; j += VL) {
        const rf v = ldr(y + j);
        str(sp + j, pickr(v > zero, ldr(kk + j) * v + ldr(bb + j) + ldr(sp + j), zero));
    }
}

/* The block's backward terms spread over a row's positions: aa = a[c] over a pooled row, kk and bb = k[c] and b[c]
 * over a full row (pool_backward's and pool_backward_wgrad's per-thread scratch rows). */
static inline void block_grad_terms(const float *a, const float *k, const float *b, int64_t PC, int64_t WC,
                                    int64_t C, float *aa, float *kk, float *bb) {
    spread_channels(a, PC, C, aa);
    spread_channels(k, WC, C, kk);
    spread_channels(b, WC, C, bb);
}

/* One row of the block's gradient (pool_backward's formula below), row h of image n, into `out` (a padded scratch
 * row of W·C floats): the pooled gradient row scaled by aa (into gp), spread to its windows' maxima, then batch
 * norm's and ReLU's terms from y's row (read in place when it is float and whole vectors, else through yr). */
#define DEFINE_BLOCK_GRAD_ROW(NAME, T, LOAD)                                                             \
static inline void NAME(const T *y, const uint8_t *idx, const T *g, const float *aa, const float *kk,   \
                        const float *bb, int64_t n, int64_t h, int64_t H, int64_t W, int64_t C, float *gp, \
                        uint8_t *kx, float *yr, float *out) {                                           \
    const int64_t Ho = H / 2, WC = W * C, PC = (W / 2) * C;                                              \
    if (h / 2 < Ho) {                                                                                    \
        const T *gs = g + (n * Ho + h / 2) * PC;                                                         \
        for (int64_t j = 0; j < PC; j++) gp[j] = LOAD(gs[j]) * aa[j];                                    \
    }                                                                                                    \
    spread_input_row(idx, gp, n, h, Ho, W, C, kx, out);                                                  \
    const T *p = y + (n * H + h) * WC;                                                                   \
    const float *yf = yr;                                                                                \
    if (sizeof(T) == sizeof(float) && WC % VL == 0) yf = (const float *)p;                               \
    else for (int64_t j = 0; j < WC; j++) yr[j] = LOAD(p[j]);                                            \
    relu_affine_row(yf, kk, bb, out, WC);                                                                \
}
DEFINE_BLOCK_GRAD_ROW(block_grad_row_f32, float, f32_load)
DEFINE_BLOCK_GRAD_ROW(block_grad_row_bf16, uint16_t, bf16_load)

/* pool_backward: the gradient of ReLU → batch norm → max-pool with respect to y, for every element of y:
 *   dy = 0 where not y > 0 (ReLU's mask, as torch's threshold_backward), else
 *   dy = k[c]·y + b[c] + (a[c]·g[n, h/2, w/2, c] where (h, w) is its window's max, else 0)
 * a, k and b carry batch norm's backward; g is the gradient of the block's output, (N, H/2, W/2, C). */
#define DEFINE_POOL_BACKWARD(NAME, T, STORE, ROW)                                                        \
int NAME(const T *y, const uint8_t *idx, const T *g, const float *a, const float *k, const float *b,   \
          T *dy, int64_t N, int64_t H, int64_t W, int64_t C, int nthreads) {                             \
    const int64_t WC = W * C, PC = (W / 2) * C;                                                          \
    if (nthreads < 1) nthreads = 1;                                                                      \
    int failed = 0;                                                                                      \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        float *sp = scratch(WC), *gp = scratch(PC), *aa = scratch(PC), *kk = scratch(WC), *bb = scratch(WC); \
        float *yr = scratch(WC);                                                                         \
        uint8_t *kx = scratch_bytes(PC);                                                                 \
        SCRATCH_READY(sp && gp && aa && kk && bb && yr && kx);                                           \
        if (ok) block_grad_terms(a, k, b, PC, WC, C, aa, kk, bb);                                        \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t row = 0; row < N * H; row++) {                                                      \
            if (!ok) continue;                                                                           \
            ROW(y, idx, g, aa, kk, bb, row / H, row % H, H, W, C, gp, kx, yr, sp);                       \
            T *q = dy + row * WC;                                                                        \
            for (int64_t j = 0; j < WC; j++) q[j] = STORE(sp[j]);                                        \
        }                                                                                                \
        free(sp); free(gp); free(aa); free(kk); free(bb); free(yr); free(kx);                            \
    }                                                                                                    \
    return failed;                                                                                       \
}

/* pool_backward_wgrad: the weight and bias gradients of a first convolution (its input needs no gradient) that
 * ReLU → batch norm → max-pool follows (the first paper's net): pool_backward's dy, row by row into a scratch row
 * that stays in the cache, and at once into dw[c, t] += Σ_w dy[w, c]·x[h + kh, w + kw, ci] — instead of
 * pool_backward writing the full-sized dy (the first paper's 128×32×28×28 floats a batch) for torch's
 * convolution backward to read back (`benchmarks/stem_bench.py` times both). x is the convolution's input with
 * its zero padding applied, (N, Hp, Wp, Ci) float32, Hp = H + KH − 1, Wp = W + KW − 1 (stride 1); the taps
 * t = kh·KW·Ci + kw·Ci + ci. The row's product is a small matrix product: TB taps × 2 channel vectors of
 * accumulators in registers (TB up to 6 with AVX2's 16 registers, 13 with AVX-512's 32), one broadcast input
 * value per tap and position; dy's rows are laid out with C rounded up to whole vectors (zeros past C). */
#if defined(__AVX512F__)
#define WG_TAPS 13
#else
#define WG_TAPS 6
#endif

static inline __attribute__((always_inline)) void wgrad_taps(
        const float *restrict d, int64_t H, int64_t W, int64_t CP, const float *restrict xi, int64_t WpCi,
        int64_t Ci, const int64_t *restrict off, const int TB, int64_t c0, const int CV, float *restrict acc) {
    rf a[WG_TAPS][2];
    int64_t o[WG_TAPS];
    for (int t = 0; t < TB; t++) {
        o[t] = off[t];
        for (int v = 0; v < CV; v++) a[t][v] = ldr(acc + t * CP + c0 + v * VL);
    }
    for (int64_t h = 0; h < H; h++) {
        const float *dh = d + h * W * CP + c0, *xr = xi + h * WpCi;
        for (int64_t w = 0; w < W; w++) {
            const rf d0 = ldr(dh + w * CP), d1 = CV > 1 ? ldr(dh + w * CP + VL) : (rf){0};
            const float *xw = xr + w * Ci;
            for (int t = 0; t < TB; t++) {
                const rf xv = xw[o[t]] - (rf){0};  /* a broadcast (x − 0 is x; 0 + x is not, for x = −0) */
                a[t][0] += d0 * xv;
                if (CV > 1) a[t][1] += d1 * xv;
            }
        }
    }
    for (int t = 0; t < TB; t++)
        for (int v = 0; v < CV; v++) str(acc + t * CP + c0 + v * VL, a[t][v]);
}

#if WG_TAPS == 13
#define TAP_CASES(M) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13)
#else
#define TAP_CASES(M) M(1) M(2) M(3) M(4) M(5) M(6)
#endif
/* Over blocks of two channel vectors (cv: how many the block has, from c0) and even groups of at most WG_TAPS
 * taps (from t0; 25 taps: 13 + 12 with AVX-512, 5 × 5 with AVX2): CASE(K), the group of K taps in registers. */
#define FOR_TAP_GROUPS(KK, CP, CASE) do {                                                                \
        const int64_t groups_ = ((KK) + WG_TAPS - 1) / WG_TAPS;                                          \
        for (int64_t c0 = 0; c0 < (CP); c0 += 2 * VL) {                                                  \
            const int cv = (CP) - c0 >= 2 * VL ? 2 : 1;                                                  \
            for (int64_t t0 = 0, g = 0; g < groups_; g++) {                                              \
                const int64_t tb = ((KK) - t0 + (groups_ - g) - 1) / (groups_ - g);                      \
                switch (tb) { TAP_CASES(CASE) }                                                          \
                t0 += tb;                                                                                \
            }                                                                                            \
        }                                                                                                \
    } while (0)
#define WG_CASE(K) case K: { if (cv == 2) wgrad_taps(d, H, W, CP, xi, WpCi, Ci, off + t0, K, c0, 2, acc + t0 * CP); \
                             else wgrad_taps(d, H, W, CP, xi, WpCi, Ci, off + t0, K, c0, 1, acc + t0 * CP); } break;

/* The bias's gradient: an image's dy (HW positions × CP) summed into ab (CP). */
static void bias_sums_image(const float *restrict d, int64_t HW, int64_t CP, float *restrict ab) {
    for (int64_t c0 = 0; c0 < CP; c0 += VL) {
        rf s = ldr(ab + c0);
        for (int64_t j = 0; j < HW; j++) s += ldr(d + j * CP + c0);
        str(ab + c0, s);
    }
}

/* An image's dy (H × W × CP, CP = C rounded up to whole vectors) into the accumulators acc (KK + 1 rows of CP:
 * the taps', then the bias's); xi is the image's padded input. */
static void wgrad_dy_image(const float *restrict d, int64_t H, int64_t W, int64_t CP, const float *restrict xi,
                           int64_t WpCi, int64_t Ci, const int64_t *restrict off, int64_t KK, float *restrict acc) {
    FOR_TAP_GROUPS(KK, CP, WG_CASE);
    bias_sums_image(d, H * W, CP, acc + KK * CP);
}

/* pool_backward_wgrad: y, idx, g, a, k, b as pool_backward takes them (y: (N, H, W, C)); xp the padded input
 * (N, Hp, Wp, Ci) float32; into dw (KK + 1, C) double: dw[t, c] the tap's weight gradient, dw[KK, c] the bias's.
 * Image by image: its dy rows into a scratch image (C = 32 at 28 × 28: 100 KB, in the core's L2), then the
 * products over the whole image with the accumulators in registers. Float sums within an image, double
 * across images. */
#define DEFINE_POOL_BACKWARD_WGRAD(NAME, T, ROW)                                                         \
int NAME(const T *y, const uint8_t *idx, const T *g, const float *a, const float *k, const float *b,   \
          int64_t N, int64_t H, int64_t W, int64_t C, const float *xp, int64_t Ci, int64_t KH, int64_t KW, \
          double *dw, int dot, int nthreads) {                                                           \
    const int64_t WC = W * C, PC = (W / 2) * C, CP = (C + VL - 1) / VL * VL;                             \
    const int64_t Wp = W + KW - 1, Hp = H + KH - 1, KWCi = KW * Ci, KK = KH * KWCi, nacc = (KK + 1) * CP; \
    if (nthreads < 1) nthreads = 1;                                                                      \
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)KK);                                      \
    double *part = (double *)calloc((size_t)nthreads * nacc, sizeof(double));                            \
    int failed = !(off && part);                                                                         \
    if (failed) { free(off); free(part); return 1; }                                                     \
    for (int64_t t = 0; t < KK; t++) off[t] = (t / KWCi) * Wp * Ci + t % KWCi;                           \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        double *mine = part + (size_t)omp_get_thread_num() * nacc;                                       \
        float *sp = scratch(WC), *gp = scratch(PC), *aa = scratch(PC), *kk = scratch(WC), *bb = scratch(WC); \
        float *yr = scratch(WC), *dimg = scratch(H * W * CP), *acc = scratch(nacc);                      \
        uint8_t *kx = scratch_bytes(PC);                                                                 \
        const int64_t ndq = WG_DOT && dot ? H * ((W + 1) / 2) * CP : 0, npair = ndq ? ndq + Hp * Wp * Ci : 0; \
        uint32_t *pairs = npair ? (uint32_t *)scratch(npair) : NULL;  /* dq, then xq */                  \
        uint16_t *xb = npair ? (uint16_t *)scratch_bytes(2 * (Hp * Wp * Ci + Ci)) : NULL;                \
        SCRATCH_READY(sp && gp && aa && kk && bb && yr && dimg && acc && kx && (!npair || (pairs && xb))); \
        if (ok) block_grad_terms(a, k, b, PC, WC, C, aa, kk, bb);                                        \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t n = 0; n < N; n++) {                                                                \
            if (!ok) continue;                                                                           \
            for (int64_t h = 0; h < H; h++) {                                                            \
                float *d = dimg + h * W * CP;                                                            \
                ROW(y, idx, g, aa, kk, bb, n, h, H, W, C, gp, kx, yr, CP == C ? d : sp);                 \
                if (CP != C)  /* whole vectors per position, zeros past C */                             \
                    for (int64_t w = 0; w < W; w++)                                                      \
                        for (int64_t c = 0; c < CP; c++) d[w * CP + c] = c < C ? sp[w * C + c] : 0.0f;   \
            }                                                                                            \
            for (int64_t j = 0; j < nacc; j++) acc[j] = 0.0f;                                            \
            if (npair) wgrad_dot_image(dimg, H, W, CP, xp + n * Hp * Wp * Ci, Hp, Wp, Ci, off, KK, pairs,  \
                                       pairs + ndq, xb, acc);                                            \
            else wgrad_dy_image(dimg, H, W, CP, xp + n * Hp * Wp * Ci, Wp * Ci, Ci, off, KK, acc);       \
            for (int64_t j = 0; j < nacc; j++) mine[j] += acc[j];                                        \
        }                                                                                                \
        free(sp); free(gp); free(aa); free(kk); free(bb); free(yr); free(dimg); free(acc); free(kx);     \
        free(pairs); free(xb);                                                                           \
    }                                                                                                    \
    if (!failed) {                                                                                       \
        double *sums = (double *)malloc(sizeof(double) * (size_t)nacc);                                  \
        if (!sums) failed = 1;                                                                           \
        else {                                                                                           \
            sum_parts(part, nthreads, nacc, sums);                                                       \
            for (int64_t t = 0; t <= KK; t++)                                                            \
                for (int64_t c = 0; c < C; c++) dw[t * C + c] = sums[t * CP + c];                        \
            free(sums);                                                                                  \
        }                                                                                                \
    }                                                                                                    \
    free(off); free(part);                                                                               \
    return failed;                                                                                       \
}

/* pool_scatter: the backward of relu(max-pool(y)): dy = g at each window's max where the pooled value is
 * > 0 (ReLU's mask), 0 elsewhere (odd edges included). */
#define DEFINE_POOL_SCATTER(NAME, T, LOAD, STORE)                                                        \
int NAME(const uint8_t *idx, const T *g, const T *pooled, T *dy, int64_t N, int64_t H, int64_t W,      \
          int64_t C, int nthreads) {                                                                     \
    const int64_t Ho = H / 2, WC = W * C, PC = (W / 2) * C;                                              \
    if (nthreads < 1) nthreads = 1;                                                                      \
    int failed = 0;                                                                                      \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        float *sp = scratch(WC), *gp = scratch(PC);                                                      \
        uint8_t *kx = scratch_bytes(PC);                                                                 \
        SCRATCH_READY(sp && gp && kx);                                                                   \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t row = 0; row < N * H; row++) {                                                      \
            if (!ok) continue;                                                                           \
            const int64_t n = row / H, h = row % H, ho = h / 2;                                          \
            if (ho < Ho) {                                                                               \
                const T *gs = g + (n * Ho + ho) * PC, *ps = pooled + (n * Ho + ho) * PC;                 \
                for (int64_t j = 0; j < PC; j++) gp[j] = LOAD(ps[j]) > 0.0f ? LOAD(gs[j]) : 0.0f;        \
            }                                                                                            \
            spread_input_row(idx, gp, n, h, Ho, W, C, kx, sp);                                           \
            T *q = dy + row * WC;                                                                        \
            for (int64_t j = 0; j < WC; j++) q[j] = STORE(sp[j]);                                        \
        }                                                                                                \
        free(sp); free(gp); free(kx);                                                                    \
    }                                                                                                    \
    return failed;                                                                                       \
}

/* The first convolution's weight gradient when ReLU → max-pool follows it (the second paper's net): the
 * convolution output's gradient is the pooled gradient at each window's max where the pooled value is > 0,
 * and zero elsewhere, so dw[c] = Σ g·(the input patch under that max) over the pooled positions alone — a
 * quarter of the convolution's positions or fewer, without ever writing the full-sized gradient (which
 * pool_scatter writes and torch's convolution backward then reads). For a stride-1, unpadded convolution
 * whose kernel rows hold KW·Ci ≤ LANES input values (an image's 3 channels × 3 or 5 columns): a kernel row of
 * a patch is one chunk of the input row, so a term is KH chunk loads and multiply-adds into accumulators kept
 * in registers (KH is made a constant by the switch below; no branch in the loop — a version that tested
 * each load against the end of x was about 1.5× slower in a one-off timing). A chunk reads past the KW·Ci
 * values it needs into the rest of the row (lanes dropped at the end); the last image is read from a copy
 * with room for that. `benchmarks/stem_bench.py` times it against pool_scatter + torch's weight gradient. */
static inline __attribute__((always_inline)) void wgrad_row(
        const float *restrict x, int64_t WxCi, int64_t Ci, const int KH, const float *restrict gp,
        const uint8_t *restrict ks, int64_t Wo, int64_t C, int64_t stride, float *restrict acc) {
    enum { H = LANES / VL };  /* registers per chunk: 1 with AVX-512, 2 with AVX2 */
    for (int64_t c = 0; c < C; c++) {
        float *restrict ac = acc + c * stride;
        /* register-wide: as 16-lane vectors, GCC 12 kept AVX2's accumulators on the stack. Two sets, even and odd
         * columns, summed at the end: with one, each multiply-add waits for the one before it (perf put most of the
         * loop's samples just after them); `benchmarks/stem_bench.py` times the kernel */
        rf a[8 * H], b[8 * H];
        for (int kh = 0; kh < KH; kh++)
            for (int h = 0; h < H; h++) a[kh * H + h] = ldr(ac + kh * LANES + h * VL), b[kh * H + h] = (rf){0};
        float bs = 0.0f, bt = 0.0f;
        int64_t wo = 0;
        /* the second set only where both fit in registers (AVX2's 16 hold them for KH ≤ 3; GCC 12 put KH = 5's on
         * the stack); KH is a constant here (the switch below) */
        if (2 * KH * H <= 12) for (; wo + 1 < Wo; wo += 2) {
            const int64_t j = wo * C + c, i = j + C;
            const float gv = gp[j], gw = gp[i];
            const float *p = x + (ks[j] >> 1) * WxCi + (2 * wo + (ks[j] & 1)) * Ci;
            const float *q = x + (ks[i] >> 1) * WxCi + (2 * wo + 2 + (ks[i] & 1)) * Ci;
            for (int kh = 0; kh < KH; kh++)
                for (int h = 0; h < H; h++) {
                    a[kh * H + h] += ldr(p + kh * WxCi + h * VL) * gv;
                    b[kh * H + h] += ldr(q + kh * WxCi + h * VL) * gw;
                }
            bs += gv;
            bt += gw;
        }
        for (; wo < Wo; wo++) {
            const int64_t j = wo * C + c;
            const float gv = gp[j];
            const float *p = x + (ks[j] >> 1) * WxCi + (2 * wo + (ks[j] & 1)) * Ci;
            for (int kh = 0; kh < KH; kh++)
                for (int h = 0; h < H; h++) a[kh * H + h] += ldr(p + kh * WxCi + h * VL) * gv;
            bs += gv;
        }
        for (int kh = 0; kh < KH; kh++)
            for (int h = 0; h < H; h++) str(ac + kh * LANES + h * VL, a[kh * H + h] + b[kh * H + h]);
        ac[KH * LANES] += bs + bt;
    }
}

#define WGRAD_CASE(K) case K: wgrad_row(x, WxCi, Ci, K, gp, ks, Wo, C, stride, acc); break;

/* conv_pool_wgrad: x (N, Hx, Wx, Ci) float32, the convolution's input; pooled, idx and g (N, Ho, Wo, C) as
 * pool_stats and the block's backward give them, Ho = (Hx − KH + 1)/2, Wo likewise; KH ≤ 8. Into dw: per
 * channel c, KH chunks dw[c, kh, 0 : KW·Ci] (the lanes past KW·Ci are dropped) and the bias's gradient at
 * dw[c, KH, 0] (double; C·(KH + 1)·LANES values). Float sums within an image, double across images. */
#define DEFINE_CONV_POOL_WGRAD(NAME, T, LOAD)                                                            \
int NAME(const float *xs, int64_t N, int64_t Hx, int64_t Wx, int64_t Ci, int64_t KH, int64_t KW,        \
          const T *pooled, const uint8_t *idx, const T *g, int64_t Ho, int64_t Wo, int64_t C, double *dw,    \
          int nthreads) {                                                                                \
    const int64_t WxCi = Wx * Ci, image_size = Hx * WxCi, PC = Wo * C, stride = (KH + 1) * LANES;       \
    const int64_t nacc = C * stride;                                                                     \
    (void)KW;                                                                                            \
    if (nthreads < 1) nthreads = 1;                                                                      \
    double *part = (double *)calloc((size_t)nthreads * nacc, sizeof(double));                            \
    int failed = !part;                                                                                  \
    if (failed) return 1;                                                                                \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        double *mine = part + (size_t)omp_get_thread_num() * nacc;                                       \
        float *acc = scratch(nacc), *gp = scratch(PC), *last = NULL;                                     \
        SCRATCH_READY(acc && gp);                                                                        \
        int64_t image = -1;                                                                              \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t row = 0; row < N * Ho; row++) {                                                     \
            if (!ok) continue;                                                                           \
            const int64_t n = row / Ho, ho = row % Ho;                                                   \
            if (n != image) {  /* a new image: its float sums into the thread's double ones */           \
                for (int64_t j = 0; j < nacc; j++) { mine[j] += acc[j]; acc[j] = 0.0f; }                 \
                image = n;                                                                               \
            }                                                                                            \
            const T *gs = g + row * PC, *ps = pooled + row * PC;                                         \
            for (int64_t j = 0; j < PC; j++) gp[j] = LOAD(ps[j]) > 0.0f ? LOAD(gs[j]) : 0.0f;            \
            const uint8_t *ks = idx + row * PC;                                                          \
            if (n == N - 1 && !last) {  /* chunks read past the last image: a copy of it with room for that */ \
                last = scratch(image_size);                                                              \
                if (!last) { ok = 0; _Pragma("omp atomic write") failed = 1; continue; }                 \
                memcpy(last, xs + n * image_size, sizeof(float) * (size_t)image_size);                   \
            }                                                                                            \
            const float *x = (n == N - 1 ? last : xs + n * image_size) + 2 * ho * WxCi;                  \
            switch (KH) { WGRAD_CASE(1) WGRAD_CASE(2) WGRAD_CASE(3) WGRAD_CASE(4) WGRAD_CASE(5)          \
                          WGRAD_CASE(6) WGRAD_CASE(7) WGRAD_CASE(8) }                                     \
        }                                                                                                \
        if (ok) for (int64_t j = 0; j < nacc; j++) mine[j] += acc[j];                                    \
        free(acc); free(gp); free(last);                                                                 \
    }                                                                                                    \
    if (!failed) sum_parts(part, nthreads, nacc, dw);                                                    \
    free(part);                                                                                          \
    return failed;                                                                                       \
}

/* The same stem's forward, relu(max-pool 2×2(conv(x) + bias)), computed here rather than as torch's
 * convolution followed by pool_stats: the convolution output never exists — for each pooled row the two
 * convolution rows under it are accumulated in registers, 16 columns at a time, rounded (bf16), ReLU'd and
 * pooled there, and only the pooled values and their window positions are written. torch's convolution of
 * 3 input channels (oneDNN, bf16, channels-last) ran at about a quarter of the CPU's multiply-add rate (a
 * one-off timing) and wrote the 4× larger output that pool_stats then read back (`benchmarks/stem_bench.py`).
 * x comes in channel planes (NCHW, copied so by native.py), so 16 neighbouring columns of one channel are one
 * load; each load feeds two rows × CB channels of multiply-adds with the weight broadcast from memory. CB (the
 * channels in registers at once) is a constant through the switch below: up to 12 with AVX-512's 32 vector
 * registers (2 rows × 12 accumulators), 6 with AVX2's 16 (8 columns at a time there, twice); more
 * channels go in several chunks. A chunk's lanes past the pooled columns read on into the next row (or the
 * padding native.py leaves after x) and are dropped. */
#if defined(__AVX512F__)
#define FWD_MAX_CHANNELS 12
#else
#define FWD_MAX_CHANNELS 6
#endif

typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));

typedef uint32_t ru __attribute__((vector_size(4 * VL)));
typedef uint16_t rh __attribute__((vector_size(2 * VL)));
static inline rf ldrh(const uint16_t *p) { rh h; memcpy(&h, p, sizeof h); return (rf)(__builtin_convertvector(h, ru) << 16); }

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
/* With AVX-512 BF16 one instruction rounds 16 floats to bf16 (nearest even; NaN stays NaN): the dp chunk's. */
static inline vf round_bf16v(vf a) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh((__m512)a);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
static inline vh to_bf16v(vf a) { return (vh)_mm512_cvtneps_pbh((__m512)a); }
#endif
/* Each lane of a register-wide vector to bf16 (nearest even, as bf16_store) and back, NaN kept, in software;
 * and a rounded vector's bf16 form: its top halves, NaN as bf16_store's quiet NaN. */
static inline rf round_bf16r(rf a) {
    const ru u = (ru)a;
    const ru r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return pickr(a != a, a, (rf)r);
}
static inline rh to_bf16r(rf a) { return __builtin_convertvector((ru)pickr(a != a, (rf)((ru){0} + 0x7FC00000u), a) >> 16, rh); }

#if VL == 16 && defined(__clang__)
#define SWAP_PAIRS(v) __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)
#elif VL == 16
#define SWAP_PAIRS(v) __builtin_shuffle(v, (ri){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14})
#elif defined(__clang__)
#define SWAP_PAIRS(v) __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6)
#else
#define SWAP_PAIRS(v) __builtin_shuffle(v, (ri){1, 0, 3, 2, 5, 4, 7, 6})
#endif

/* The window max of two rows y0, y1 (VL columns each, a register) into VL/2 pooled columns, at m's and k's even
 * lanes, as pool_stats finds it wherever the max is > 0: the right column wins a row when greater or NaN, then
 * the bottom row; ReLU after the max (the same value: ReLU commutes with max; only where the whole window is
 * ≤ 0 may the position differ from pool_stats', which pools ReLU's zeros, and there the pooled value is 0 and
 * gets no gradient). */
static inline void pool_lanes(rf y0, rf y1, rf *m, ri *k) {
    const rf zero = {0};
    const rf r0 = SWAP_PAIRS(y0), r1 = SWAP_PAIRS(y1);  /* at the even lanes: the right neighbour */
    const ri t0 = (r0 > y0) | (r0 != r0), t1 = (r1 > y1) | (r1 != r1);
    const rf h0 = pickr(t0, r0, y0), h1 = pickr(t1, r1, y1);
    const ri t = (h1 > h0) | (h1 != h1);
    const rf v = pickr(t, h1, h0);
    *m = pickr(v < zero, zero, v);  /* ReLU: NaN stays NaN */
    *k = (t & (2 + (t1 & 1))) | (~t & (t0 & 1));  /* 0 top-left … 3 bottom-right */
}

/* A chunk's pooled values into a scratch row of LANES per channel: float as they are; bf16 values are already
 * rounded (round_bf16r), so their bf16 form is exact. */
static inline void put_f32(float *p, rf m) { str(p, m); }
static inline void put_bf16(uint16_t *p, rf m) {
    const rh h = to_bf16r(m);
    memcpy(p, &h, sizeof h);
}

/* One chunk: 16 convolution columns (from p: x's planes at this pooled row's first input row and the chunk's
 * first column) × 2 rows × channels c0 … c0+CB−1, pooled into rows c0 … of tb (values) and kb (positions).
 * In register-wide vectors: one pass with AVX-512 (VL = 16); with AVX2 (VL = 8) the 16 columns are summed and
 * pooled as two halves — as 16-lane vectors, GCC 12 kept AVX2's accumulators on the stack and pooled lane by
 * lane, and the kernel ran 5× slower than torch's convolution (`benchmarks/stem_bench.py`). */
#define DEFINE_CONV_POOL_CHUNK(NAME, T, LDR, ROUND, PUT)                                            \
static inline __attribute__((always_inline)) void NAME(                                                  \
        const T *restrict p, int64_t plane_size, int64_t Wx, int64_t Ci, int64_t KH, int64_t KW,         \
        const float *restrict wc, const float *restrict bias, int64_t c0, const int CB,                  \
        T *restrict tb, uint8_t *restrict kb) {                                                          \
    for (int h = 0; h < LANES / VL; h++) {                                                               \
        rf a0[FWD_MAX_CHANNELS], a1[FWD_MAX_CHANNELS];                                                   \
        for (int c = 0; c < CB; c++) a0[c] = a1[c] = (rf){0} + bias[c0 + c];                             \
        for (int64_t ci = 0; ci < Ci; ci++)                                                              \
            for (int64_t kw = 0; kw < KW; kw++) {                                                        \
                const T *q = p + ci * plane_size + kw + h * VL;                                          \
                const float *w = wc + (ci * KW + kw) * KH * CB;                                          \
                for (int c = 0; c < CB; c++) a0[c] += LDR(q) * w[c];                                     \
                for (int64_t r = 1; r < KH; r++) {                                                       \
                    const rf v = LDR(q + r * Wx);                                                        \
                    for (int c = 0; c < CB; c++) { a0[c] += v * w[r * CB + c]; a1[c] += v * w[(r - 1) * CB + c]; } \
                }                                                                                        \
                const rf v = LDR(q + KH * Wx);                                                           \
                for (int c = 0; c < CB; c++) a1[c] += v * w[(KH - 1) * CB + c];                          \
            }                                                                                            \
        for (int c = 0; c < CB; c++) {                                                                   \
            rf m;                                                                                        \
            ri k;                                                                                        \
            pool_lanes(ROUND ? round_bf16r(a0[c]) : a0[c], ROUND ? round_bf16r(a1[c]) : a1[c], &m, &k);   \
            PUT(tb + (c0 + c) * LANES + h * VL, m);                                                        \
            strb(kb + (c0 + c) * LANES + h * VL, narrow(k));                                             \
        }                                                                                                \
    }                                                                                                    \
}

/* The next channel chunk's size when `left` channels remain: chunks of even size (10 → 10, 14 → 7 + 7). */
static inline int64_t fwd_chunk(int64_t left) {
    const int64_t chunks = (left + FWD_MAX_CHANNELS - 1) / FWD_MAX_CHANNELS;
    return (left + chunks - 1) / chunks;
}

DEFINE_CONV_POOL_CHUNK(conv_pool_chunk_f32, float, ldr, 0, put_f32)

/* The chunk's (C, LANES) scratch rows into the pooled row's (cols, C) block: pooled[j, c] = tb[c, step·j] (step 2:
 * a chunk pooled at its even lanes; 1: at every lane), and the positions alike — with C a constant for the common
 * channel counts (the compiler unrolls it into plain moves; a loop over a variable C cost about a tenth of the
 * kernel in a one-off profile). */
static inline __attribute__((always_inline)) void transpose_const(
        const void *restrict tb, const uint8_t *restrict kb, int64_t cols, const int64_t C, void *restrict dst,
        uint8_t *restrict dix, const size_t size, const int step) {
    for (int64_t j = 0; j < cols; j++)
        for (int64_t c = 0; c < C; c++) {
            memcpy((char *)dst + (j * C + c) * size, (const char *)tb + (c * LANES + step * j) * size, size);
            dix[j * C + c] = kb[c * LANES + step * j];
        }
}

#define TRANSPOSE_CASE(K) case K: transpose_const(tb, kb, cols, K, dst, dix, size, step); break;

/* transpose_const for a pooled row's block in T (size = sizeof(T), made a constant by each caller's inlining). */
static inline __attribute__((always_inline)) void put_block(const void *restrict tb, const uint8_t *restrict kb,
                                                            int64_t cols, int64_t C, void *restrict dst,
                                                            uint8_t *restrict dix, const size_t size, const int step) {
    switch (C) { TRANSPOSE_CASE(1) TRANSPOSE_CASE(2) TRANSPOSE_CASE(3) TRANSPOSE_CASE(4) TRANSPOSE_CASE(5)
                 TRANSPOSE_CASE(6) TRANSPOSE_CASE(7) TRANSPOSE_CASE(8) TRANSPOSE_CASE(9) TRANSPOSE_CASE(10)
                 TRANSPOSE_CASE(11) TRANSPOSE_CASE(12) TRANSPOSE_CASE(16) TRANSPOSE_CASE(20) TRANSPOSE_CASE(24)
                 TRANSPOSE_CASE(32)
                 default: transpose_const(tb, kb, cols, C, dst, dix, size, step); }  /* C as a variable */
}

#define FWD_CASE(CHUNK, K) case K: CHUNK(p, plane_size, Wx, Ci, KH, KW, wl + c0 * KK, bias, c0, K, tb, kb); break;
/* A case per chunk size fwd_chunk can give: 1–12 with AVX-512, 1–6 with AVX2 (twelve there, as 16-lane
 * vectors split over two registers, took GCC 12 over a minute to compile for this one function). */
#if FWD_MAX_CHANNELS == 12
#define FWD_CASES(CHUNK) FWD_CASE(CHUNK, 1) FWD_CASE(CHUNK, 2) FWD_CASE(CHUNK, 3) FWD_CASE(CHUNK, 4)          \
                         FWD_CASE(CHUNK, 5) FWD_CASE(CHUNK, 6) FWD_CASE(CHUNK, 7) FWD_CASE(CHUNK, 8)          \
                         FWD_CASE(CHUNK, 9) FWD_CASE(CHUNK, 10) FWD_CASE(CHUNK, 11) FWD_CASE(CHUNK, 12)
#else
#define FWD_CASES(CHUNK) FWD_CASE(CHUNK, 1) FWD_CASE(CHUNK, 2) FWD_CASE(CHUNK, 3) FWD_CASE(CHUNK, 4)          \
                         FWD_CASE(CHUNK, 5) FWD_CASE(CHUNK, 6)
#endif

/* conv_pool_forward: x (N, Ci, Hx, Wx) in T (channel planes, followed by at least LANES + KW values of
 * padding); wt (Ci, KH, KW, C) and bias (C) float32, rounded to bf16 by the caller when T is bf16; into pooled
 * and idx (N, Ho, Wo, C), Ho = (Hx − KH + 1)/2, Wo likewise: what pool_stats(relu=1) gives from the
 * convolution's output in T (sums in float, each output rounded to T). */
#define DEFINE_CONV_POOL_FORWARD(NAME, T, CHUNK)                                                         \
int NAME(const T *xs, int64_t N, int64_t Hx, int64_t Wx, int64_t Ci, int64_t KH, int64_t KW,            \
          const float *wt, const float *bias, T *pooled, uint8_t *idx, int64_t Ho, int64_t Wo, int64_t C,  \
          int nthreads) {                                                                                \
    const int64_t plane_size = Hx * Wx, PC = Wo * C, KK = Ci * KW * KH;                                  \
    if (nthreads < 1) nthreads = 1;                                                                      \
    float *wl = scratch(KK * C);  /* each channel chunk's weights as (Ci, KW, KH, CB), at wl + c0·KK */  \
    if (!wl) return 1;                                                                                   \
    for (int64_t c0 = 0, cb; c0 < C; c0 += cb) {                                                         \
        cb = fwd_chunk(C - c0);                                                                          \
        for (int64_t ci = 0; ci < Ci; ci++)                                                              \
            for (int64_t kw = 0; kw < KW; kw++)                                                          \
                for (int64_t r = 0; r < KH; r++)                                                         \
                    for (int64_t c = 0; c < cb; c++)                                                     \
                        wl[c0 * KK + ((ci * KW + kw) * KH + r) * cb + c] = wt[((ci * KH + r) * KW + kw) * C + c0 + c]; \
    }                                                                                                    \
    int failed = 0;                                                                                      \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        T *tb = (T *)aligned_alloc(64, sizeof(T) * (size_t)(C * LANES + 64));                            \
        uint8_t *kb = scratch_bytes(C * LANES);                                                          \
        SCRATCH_READY(tb && kb);                                                                         \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t row = 0; row < N * Ho; row++) {                                                     \
            if (!ok) continue;                                                                           \
            const int64_t n = row / Ho, ho = row % Ho;                                                   \
            for (int64_t x0 = 0; x0 < 2 * Wo; x0 += LANES) {                                             \
                const T *p = xs + n * Ci * plane_size + 2 * ho * Wx + x0;                                \
                for (int64_t c0 = 0, cb; c0 < C; c0 += cb) {                                             \
                    cb = fwd_chunk(C - c0);                                                              \
                    switch (cb) { FWD_CASES(CHUNK) }                                                     \
                }                                                                                        \
                const int64_t cols = Wo - x0 / 2 < 8 ? Wo - x0 / 2 : 8;                                  \
                T *dst = pooled + row * PC + x0 / 2 * C;                                                 \
                uint8_t *dix = idx + row * PC + x0 / 2 * C;                                              \
                put_block(tb, kb, cols, C, dst, dix, sizeof(T), 2);                                      \
            }                                                                                            \
        }                                                                                                \
        free(tb); free(kb);                                                                              \
    }                                                                                                    \
    free(wl);                                                                                            \
    return failed;                                                                                       \
}

/* pool_backward_wgrad's products in bf16 dot products (CPUs with AVX-512 BF16, `dot`: native.py asks for them
 * when y is bf16, i.e. under bf16 autocast, where torch's convolution backward would round dy and x to bf16 as
 * well): an image's dy rows, rounded to bf16, in pairs of neighbouring columns (H, ⌈W/2⌉, CP) — word 2l of a pair
 * vector is channel l at column 2p, word 2l + 1 at column 2p + 1 (zero past W) —, and its padded input x in
 * pairs of the same neighbours (Hp, Wp, Ci): xq[h, w, ci] = (x[h, w, ci], x[h, w + 1, ci]), zero past Wp. One
 * vdpbf16ps then sums two positions' products for 16 channels, half the float32 FMAs' count; the taps' offsets
 * into xq are off[] as into x. Sums in float32 within an image, as the FMAs'; the bias's from the float rows. */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define WG_DOT 1
static void pack_dy_pairs(const float *restrict d, int64_t H, int64_t W, int64_t CP, uint32_t *restrict dq) {
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i perm = _mm512_loadu_si512(order);
    const int64_t W2 = (W + 1) / 2;
    for (int64_t h = 0; h < H; h++)
        for (int64_t p = 0; p < W2; p++) {
            const float *a = d + (h * W + 2 * p) * CP;
            for (int64_t c = 0; c < CP; c += LANES) {
                const __m512 lo = _mm512_load_ps(a + c), hi = 2 * p + 1 < W ? _mm512_load_ps(a + CP + c)
                                                                              : _mm512_setzero_ps();
                const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  /* words 0–15 lo's, 16–31 hi's */
                _mm512_store_si512(dq + (h * W2 + p) * CP + c, _mm512_permutexvar_epi16(perm, both));
            }
        }
}

/* xb: n + Ci + LANES bf16 scratch; xq: n pairs, n = Hp·Wp·Ci. */
static void pack_x_pairs(const float *restrict x, int64_t Hp, int64_t Wp, int64_t Ci, uint16_t *restrict xb,
                         uint32_t *restrict xq) {
    const int64_t n = Hp * Wp * Ci;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        _mm256_storeu_si256((__m256i *)(xb + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
    for (; j < n; j++) xb[j] = bf16_store(x[j]);
    for (int64_t k = 0; k < Ci; k++) xb[n + k] = 0;
    for (j = 0; j + LANES <= n; j += LANES) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xb + j)));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xb + j + Ci)));
        _mm512_storeu_si512(xq + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (; j < n; j++) xq[j] = xb[j] | (uint32_t)xb[j + Ci] << 16;
    for (int64_t h = 0; h < Hp; h++)  /* a row's last column has no right neighbour (not the next row's first) */
        for (int64_t k = 0; k < Ci; k++) xq[(h * Wp + Wp - 1) * Ci + k] &= 0xFFFFu;
}

static inline __attribute__((always_inline)) void wgrad_taps_dot(
        const uint32_t *restrict dq, int64_t H, int64_t W2, int64_t CP, const uint32_t *restrict xq, int64_t WpCi,
        int64_t Ci, const int64_t *restrict off, const int TB, int64_t c0, const int CV, float *restrict acc) {
    __m512 a[WG_TAPS][2];
    int64_t o[WG_TAPS];
    for (int t = 0; t < TB; t++) {
        o[t] = off[t];
        for (int v = 0; v < CV; v++) a[t][v] = _mm512_load_ps(acc + t * CP + c0 + v * LANES);
    }
    for (int64_t h = 0; h < H; h++) {
        const uint32_t *dh = dq + h * W2 * CP + c0, *xr = xq + h * WpCi;
        for (int64_t p = 0; p < W2; p++) {
            const __m512bh d0 = (__m512bh)_mm512_load_si512(dh + p * CP);
            const __m512bh d1 = CV > 1 ? (__m512bh)_mm512_load_si512(dh + p * CP + LANES) : d0;
            const uint32_t *xw = xr + 2 * p * Ci;
            for (int t = 0; t < TB; t++) {
                const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xw[o[t]]);
                a[t][0] = _mm512_dpbf16_ps(a[t][0], d0, xv);
                if (CV > 1) a[t][1] = _mm512_dpbf16_ps(a[t][1], d1, xv);
            }
        }
    }
    for (int t = 0; t < TB; t++)
        for (int v = 0; v < CV; v++) _mm512_store_ps(acc + t * CP + c0 + v * LANES, a[t][v]);
}

#define WGD_CASE(K) case K: { if (cv == 2) wgrad_taps_dot(dq, H, W2, CP, xq, WpCi, Ci, off + t0, K, c0, 2, acc + t0 * CP); \
                              else wgrad_taps_dot(dq, H, W2, CP, xq, WpCi, Ci, off + t0, K, c0, 1, acc + t0 * CP); } break;

/* wgrad_dy_image through the pairs: the image's dy (d) and padded input (xi) packed into dq and xq (xb: scratch
 * for xi in bf16), the taps' products from them, the bias's sums from d. */
static void wgrad_dot_image(const float *restrict d, int64_t H, int64_t W, int64_t CP, const float *restrict xi,
                            int64_t Hp, int64_t Wp, int64_t Ci, const int64_t *restrict off, int64_t KK,
                            uint32_t *restrict dq, uint32_t *restrict xq, uint16_t *restrict xb,
                            float *restrict acc) {
    const int64_t W2 = (W + 1) / 2, WpCi = Wp * Ci;
    pack_dy_pairs(d, H, W, CP, dq);
    pack_x_pairs(xi, Hp, Wp, Ci, xb, xq);
    FOR_TAP_GROUPS(KK, CP, WGD_CASE);
    bias_sums_image(d, H * W, CP, acc + KK * CP);
}
#else
#define WG_DOT 0
static void wgrad_dot_image(const float *d, int64_t H, int64_t W, int64_t CP, const float *xi, int64_t Hp,
                            int64_t Wp, int64_t Ci, const int64_t *off, int64_t KK, uint32_t *dq, uint32_t *xq,
                            uint16_t *xb, float *acc) {  /* not built here: never called (WG_DOT 0) */
    (void)d; (void)H; (void)W; (void)CP; (void)xi; (void)Hp; (void)Wp; (void)Ci; (void)off; (void)KK;
    (void)dq; (void)xq; (void)xb; (void)acc;
}
#endif

DEFINE_POOL_STATS(cnnlab_pool_stats_f32, float, f32_load, f32_store)
DEFINE_POOL_STATS(cnnlab_pool_stats_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_POOL_BACKWARD(cnnlab_pool_backward_f32, float, f32_store, block_grad_row_f32)
DEFINE_POOL_BACKWARD(cnnlab_pool_backward_bf16, uint16_t, bf16_store, block_grad_row_bf16)
DEFINE_POOL_BACKWARD_WGRAD(cnnlab_pool_backward_wgrad_f32, float, block_grad_row_f32)
DEFINE_POOL_BACKWARD_WGRAD(cnnlab_pool_backward_wgrad_bf16, uint16_t, block_grad_row_bf16)
DEFINE_POOL_SCATTER(cnnlab_pool_scatter_f32, float, f32_load, f32_store)
DEFINE_POOL_SCATTER(cnnlab_pool_scatter_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_POOL_AFFINE(cnnlab_pool_affine_f32, float, f32_load, f32_store)
DEFINE_POOL_AFFINE(cnnlab_pool_affine_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_POOL_GRAD_SUMS(cnnlab_pool_grad_sums_f32, float, f32_load)
DEFINE_POOL_GRAD_SUMS(cnnlab_pool_grad_sums_bf16, uint16_t, bf16_load)
DEFINE_CONV_POOL_WGRAD(cnnlab_conv_pool_wgrad_f32, float, f32_load)
DEFINE_CONV_POOL_WGRAD(cnnlab_conv_pool_wgrad_bf16, uint16_t, bf16_load)
DEFINE_CONV_POOL_FORWARD(cnnlab_conv_pool_forward_f32, float, conv_pool_chunk_f32)
#if defined(__AVX512BF16__) && defined(__AVX512F__)
/* bf16 with AVX-512 BF16, read straight from the float32 channels-last image batch the training loop gives the
 * stem (native.py takes it where it is built; the generic one below needs x as bf16 channel planes: two copies
 * in native.py, the cast, then the transpose). The dot-product instruction multiplies pairs of bf16 values and
 * adds both products to a float lane, twice the multiply-adds of an FMA. The pairs run along the kernel row's
 * Ci·KW values (k = ci·KW + kw; an odd count's last pair takes a zero; the 3 × 3 × 3 stem: 5 instructions per
 * kernel row and channel instead of 9): each image row is rounded to bf16 by vcvtneps2bf16 (nearest even, as
 * x.to(bf16), except that it flushes subnormal floats to zero — torch rounds the largest up to 2^-126 — and keeps a
 * NaN's sign and payload), laid out as channel planes in a scratch row, then as pair rows
 * split by output column parity, pe[h, j, u] = (x[ci_2j, h, 2u + kw_2j], x[ci_2j+1, h, 2u + kw_2j+1]) and po[h,
 * j, u] the same at column 2u + 1, two bf16 in 32 bits; the weights as (KH, pairs, CB) per channel chunk. A chunk
 * sums 16 even and 16 odd convolution columns of two rows (4 accumulators per channel, EO_MAX_CHANNELS channels
 * at once), so the 2 × 2 window of pooled column u is lane u of the four: the max, its position, ReLU and the
 * bf16 store are each one instruction for 16 pooled columns. (The version before pooled pairs of neighbouring
 * lanes, half of each instruction's lanes wasted, from bf16 planes copied by native.py; its outputs and positions
 * were the same bit for bit but for NaN's bits. `benchmarks/stem_bench.py` times this one against torch's
 * convolution.) */
#define EO_MAX_CHANNELS 6

static inline int64_t eo_chunk(int64_t left) {  /* as fwd_chunk: even sizes (10 → 5 + 5, 20 → 5 × 4) */
    const int64_t chunks = (left + EO_MAX_CHANNELS - 1) / EO_MAX_CHANNELS;
    return (left + chunks - 1) / chunks;
}

/* One chunk: pooled columns u0 … u0 + 15 of a pooled row (pp at its first input row: rows of NP pairs × 2
 * parities × PU columns) for channels c0 … c0 + CB − 1, into tb / kb rows c0 … (LANES values each). */
static inline __attribute__((always_inline)) void conv_pool_chunk_eo(
        const uint32_t *restrict pp, int64_t PU, int64_t NP, int64_t KH, const uint32_t *restrict wc,
        const float *restrict bias, int64_t c0, const int CB, uint16_t *restrict tb, uint8_t *restrict kb) {
    __m512 e0[EO_MAX_CHANNELS], o0[EO_MAX_CHANNELS], e1[EO_MAX_CHANNELS], o1[EO_MAX_CHANNELS];
    for (int c = 0; c < CB; c++) e0[c] = o0[c] = e1[c] = o1[c] = _mm512_set1_ps(bias[c0 + c]);
    for (int64_t r = 0; r <= KH; r++)
        for (int64_t j = 0; j < NP; j++) {
            const uint32_t *q = pp + (r * NP + j) * 2 * PU;
            const __m512bh ve = (__m512bh)_mm512_loadu_si512(q), vo = (__m512bh)_mm512_loadu_si512(q + PU);
            const uint32_t *w = wc + (r * NP + j) * CB;  /* kernel row r for the top row, r − 1 for the bottom */
            if (r < KH)
                for (int c = 0; c < CB; c++) {
                    const __m512bh b = (__m512bh)_mm512_set1_epi32((int)w[c]);
                    e0[c] = _mm512_dpbf16_ps(e0[c], ve, b);
                    o0[c] = _mm512_dpbf16_ps(o0[c], vo, b);
                }
            if (r > 0)
                for (int c = 0; c < CB; c++) {
                    const __m512bh b = (__m512bh)_mm512_set1_epi32((int)w[c - NP * CB]);
                    e1[c] = _mm512_dpbf16_ps(e1[c], ve, b);
                    o1[c] = _mm512_dpbf16_ps(o1[c], vo, b);
                }
        }
    const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
    for (int c = 0; c < CB; c++) {  /* pool_lanes' rule: the right column wins a row when greater or NaN, then the
                                     * bottom row; ReLU after (max_ps(0, v) is v where v is NaN) */
        const __m512 a = (__m512)round_bf16v((vf)e0[c]), b = (__m512)round_bf16v((vf)o0[c]);
        const __m512 d = (__m512)round_bf16v((vf)e1[c]), f = (__m512)round_bf16v((vf)o1[c]);
        const __mmask16 t0 = _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
        const __mmask16 t1 = _mm512_cmp_ps_mask(f, d, _CMP_GT_OQ) | _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
        const __m512 h0 = _mm512_mask_blend_ps(t0, a, b), h1 = _mm512_mask_blend_ps(t1, d, f);
        const __mmask16 t = _mm512_cmp_ps_mask(h1, h0, _CMP_GT_OQ) | _mm512_cmp_ps_mask(h1, h1, _CMP_UNORD_Q);
        const __m512 m = _mm512_max_ps(_mm512_setzero_ps(), _mm512_mask_blend_ps(t, h0, h1));
        const __m512i k = _mm512_mask_blend_epi32(t, _mm512_maskz_mov_epi32(t0, one),
                                                  _mm512_mask_add_epi32(two, t1, two, one));  /* 0 … 3 */
        _mm256_store_si256((__m256i *)(tb + (c0 + c) * LANES), (__m256i)_mm512_cvtneps_pbh(m));
        _mm_store_si128((__m128i *)(kb + (c0 + c) * LANES), _mm512_cvtepi32_epi8(k));
    }
}

/* put_block for a chunk pooled at every lane, two channels per move where C is even: the values of channels 2p and
 * 2p + 1 packed into 32 bits (tp) and their positions into 16 (kp), so the copy out moves C/2 of each per column
 * — the moves, one per value and position, were about a seventh of this kernel in a one-off perf profile. */
static inline __attribute__((always_inline)) void pairs_const(
        const uint32_t *restrict tp, const uint16_t *restrict kp, int64_t cols, const int64_t C2,
        uint16_t *restrict dst, uint8_t *restrict dix) {
    for (int64_t j = 0; j < cols; j++)
        for (int64_t p = 0; p < C2; p++) {
            memcpy(dst + (j * C2 + p) * 2, tp + p * LANES + j, sizeof(uint32_t));
            memcpy(dix + (j * C2 + p) * 2, kp + p * LANES + j, sizeof(uint16_t));
        }
}

#define PAIRS_CASE(K) case K: pairs_const(tp, kp, cols, K, dst, dix); break;

static inline void put_pairs(const uint16_t *restrict tb, const uint8_t *restrict kb, uint32_t *restrict tp,
                             uint16_t *restrict kp, int64_t cols, int64_t C, uint16_t *restrict dst,
                             uint8_t *restrict dix) {
    if (C % 2) {
        put_block(tb, kb, cols, C, dst, dix, sizeof(uint16_t), 1);
        return;
    }
    for (int64_t p = 0; p < C / 2; p++) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_load_si256((const __m256i *)(tb + 2 * p * LANES)));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_load_si256((const __m256i *)(tb + (2 * p + 1) * LANES)));
        _mm512_store_si512(tp + p * LANES, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        const __m256i kl = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *)(kb + 2 * p * LANES)));
        const __m256i kh = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *)(kb + (2 * p + 1) * LANES)));
        _mm256_store_si256((__m256i *)(kp + p * LANES), _mm256_or_si256(kl, _mm256_slli_epi16(kh, 8)));
    }
    switch (C / 2) { PAIRS_CASE(1) PAIRS_CASE(2) PAIRS_CASE(3) PAIRS_CASE(4) PAIRS_CASE(5) PAIRS_CASE(6)
                     PAIRS_CASE(8) PAIRS_CASE(10) PAIRS_CASE(12) PAIRS_CASE(16)
                     default: pairs_const(tp, kp, cols, C / 2, dst, dix); }
}

/* A bf16 channels-last row (Wx, Ci) into channel planes RW apart, Ci a constant for the common counts (the compiler
 * vectorises the strided reads; the loop over a variable Ci was about a tenth of this kernel in a one-off profile). */
static inline __attribute__((always_inline)) void to_planes(const uint16_t *restrict xr, int64_t Wx, const int64_t Ci,
                                                            uint16_t *restrict planes, int64_t RW) {
    for (int64_t ci = 0; ci < Ci; ci++)
        for (int64_t w = 0; w < Wx; w++) planes[ci * RW + w] = xr[w * Ci + ci];
}

#define PLANES_CASE(K) case K: to_planes(xr, Wx, K, planes, RW); break;

#define EO_CASE(K) case K: conv_pool_chunk_eo(pp + 2 * ho * NP * 2 * PU + u0, PU, NP, KH, wl + c0 * KH * NP, bias, c0, K, tb, kb); break;

/* conv_pool_forward_cl: x (N, Hx, Wx, Ci) float32 channels-last; the rest as conv_pool_forward's (bf16). */
int cnnlab_conv_pool_forward_cl_bf16(const float *xs, int64_t N, int64_t Hx, int64_t Wx, int64_t Ci, int64_t KH,
                                     int64_t KW, const float *wt, const float *bias, uint16_t *pooled, uint8_t *idx,
                                     int64_t Ho, int64_t Wo, int64_t C, int nthreads) {
    const int64_t K = Ci * KW, NP = (K + 1) / 2, PU = (Wo + LANES - 1) / LANES * LANES, PC = Wo * C;
    /* a channel plane row: a pair row's last load reads 32 values from column 2(PU − 16) + KW − 1 + 1 on (the + 64
     * is slack) */
    const int64_t RW = (2 * PU + KW + 64 + 31) / 32 * 32, XR = Wx * Ci;
    if (nthreads < 1) nthreads = 1;
    uint32_t *wl = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(KH * NP * C + 64));
    if (!wl) return 1;
    for (int64_t c0 = 0, cb; c0 < C; c0 += cb) {  /* each chunk's weights as (KH, NP, CB) pairs, at wl + c0·KH·NP */
        cb = eo_chunk(C - c0);
        for (int64_t ky = 0; ky < KH; ky++)
            for (int64_t j = 0; j < NP; j++)
                for (int64_t c = 0; c < cb; c++) {
                    uint32_t pair = 0;
                    for (int64_t half = 0; half < 2; half++) {
                        const int64_t k = 2 * j + half, ci = k / KW, kw = k % KW;
                        if (k < K) pair |= (uint32_t)bf16_store(wt[((ci * KH + ky) * KW + kw) * C + c0 + c]) << (16 * half);
                    }
                    wl[c0 * KH * NP + (ky * NP + j) * cb + c] = pair;
                }
    }
    int failed = 0;
    _Pragma("omp parallel num_threads(nthreads)")
    {
        uint16_t *tb = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)(C * LANES + 64));
        uint8_t *kb = scratch_bytes(C * LANES);
        uint32_t *pp = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(Hx * NP * 2 * PU + 64));
        uint32_t *tp = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(C / 2 * LANES + 64));
        uint16_t *kp = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)(C / 2 * LANES + 64));
        uint16_t *xr = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)((XR + 31) / 32 * 32));
        uint16_t *planes = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)(Ci * RW));
        SCRATCH_READY(tb && kb && pp && tp && kp && xr && planes);
        if (ok) memset(planes, 0, sizeof(uint16_t) * (size_t)(Ci * RW));  /* columns past Wx stay zero */
        int64_t image = -1;
        _Pragma("omp for schedule(static)")
        for (int64_t row = 0; row < N * Ho; row++) {
            if (!ok) continue;
            const int64_t n = row / Ho, ho = row % Ho;
            if (n != image) {  /* the image's pair rows */
                for (int64_t h = 0; h < Hx; h++) {
                    const float *s = xs + (n * Hx + h) * XR;
                    for (int64_t i = 0; i < XR; i += LANES) {  /* the row to bf16, 16 values at a time */
                        const __mmask16 m = XR - i >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (XR - i)) - 1);
                        _mm256_storeu_si256((__m256i *)(xr + i),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + i)));
                    }
                    switch (Ci) { PLANES_CASE(1) PLANES_CASE(2) PLANES_CASE(3) PLANES_CASE(4)
                                  default: to_planes(xr, Wx, Ci, planes, RW); }
                    for (int64_t j = 0; j < NP; j++)
                        for (int64_t par = 0; par < 2; par++) {
                            /* lane u: the pair's two values at convolution column 2u + par (+ each one's kernel
                             * column); a 32-bit load at column 2u + … holds it in its low half */
                            const int64_t ka = 2 * j, kb2 = 2 * j + 1;
                            const uint16_t *sa = planes + ka / KW * RW + ka % KW + par;
                            const uint16_t *sb = kb2 < K ? planes + kb2 / KW * RW + kb2 % KW + par : NULL;
                            uint32_t *d = pp + ((h * NP + j) * 2 + par) * PU;
                            const __m512i low = _mm512_set1_epi32(0xFFFF);
                            for (int64_t u = 0; u < PU; u += LANES) {
                                __m512i v = _mm512_and_si512(_mm512_loadu_si512(sa + 2 * u), low);
                                if (sb) v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_loadu_si512(sb + 2 * u), 16));
                                _mm512_storeu_si512(d + u, v);
                            }
                        }
                }
                image = n;
            }
            for (int64_t u0 = 0; u0 < Wo; u0 += LANES) {
                for (int64_t c0 = 0, cb; c0 < C; c0 += cb) {
                    cb = eo_chunk(C - c0);
                    switch (cb) { EO_CASE(1) EO_CASE(2) EO_CASE(3) EO_CASE(4) EO_CASE(5) EO_CASE(6) }
                }
                const int64_t cols = Wo - u0 < LANES ? Wo - u0 : LANES;
                put_pairs(tb, kb, tp, kp, cols, C, pooled + row * PC + u0 * C, idx + row * PC + u0 * C);
            }
        }
        free(tb); free(kb); free(pp); free(tp); free(kp); free(xr); free(planes);
    }
    free(wl);
    return failed;
}
#endif
/* bf16 from channel planes, the generic chunk, rounding in software (without the dot-product instruction; with it,
 * for an input that is not float32) */
DEFINE_CONV_POOL_CHUNK(conv_pool_chunk_bf16, uint16_t, ldrh, 1, put_bf16)
DEFINE_CONV_POOL_FORWARD(cnnlab_conv_pool_forward_bf16, uint16_t, conv_pool_chunk_bf16)

/* The same few-channel convolution + ReLU in float32, for any AVX2 or AVX-512 CPU: relu(conv2d(x, w, b)), stride 1,
 * no padding, groups 1, output (N, Co, Ho, Wo) in plain NCHW order (the dense layer's), x (N, H, W, Ci) float32
 * channels-last. torch's oneDNN fp32 kernels keep channels as the lanes (10 and 20 channels in 8- or 16-lane
 * blocks) and ran this layer of the second paper's net at 76 GFLOP/s forward and 49 backward on a Zen 3 (AVX2,
 * 2 cores; its 2048² matrix product 177): here the lanes are VL output columns, as in the bf16 kernels above, and
 * a block of 2 output rows × CB channels sums in registers, one broadcast weight feeding two multiply-adds. Each
 * image is first laid out as channel planes padded with zeros past W, so a chunk's lanes past the row read zeros.
 * Backward: g' = g where ReLU passed (y > 0 or NaN, as threshold_backward), into zero-padded planes (KH − 1 rows
 * and KW − 1 columns each side); the input gradient is the forward's loop over those planes with the flipped
 * weights (output channels as its inputs), only over kernel rows that meet g's rows, scattered into channels-last
 * order; the weight gradient a block of CBW output channels × up to 5 kernel columns in registers, summed down an
 * image's rows, VL columns a step (x masked to the columns where g' may be non-zero, as torch forms no product
 * past them), in float lanes per thread, then in double. `benchmarks/dot_conv_bench.py` times both directions. */
#if defined(__AVX512F__)
#define CR_CB 10  /* forward and input-gradient channels in registers: 2 rows × 10 of AVX-512's 32 */
#define CR_CBW 4  /* weight gradient: 4 channels × 5 columns */
#else
#define CR_CB 5   /* 2 rows × 5 of AVX2's 16 */
#define CR_CBW 2
#endif

/* acc[r][c] (lane l: column l of output row r) += Σ over kernel rows ky0..ky1−1, input planes j < NI and kernel
 * columns kx of wk[((ky·KW + kx)·NI + j)·CS + c] · pl[j·PS + (ky + r)·PW + kx + l]. */
static inline __attribute__((always_inline)) void f32_rows(
        const float *restrict pl, int64_t PS, int64_t PW, int64_t NI, int64_t ky0, int64_t ky1, int64_t KW,
        const float *restrict wk, int64_t CS, const int CB, const int NR, rf acc[2][CR_CB]) {
    for (int64_t ky = ky0; ky < ky1; ky++)
        for (int64_t j = 0; j < NI; j++) {
            const float *p = pl + j * PS + ky * PW, *w = wk + (ky * KW * NI + j) * CS;
            for (int64_t kx = 0; kx < KW; kx++) {
                const rf v0 = ldr(p + kx), v1 = NR > 1 ? ldr(p + PW + kx) : v0;
                const float *wc = w + kx * NI * CS;
                _Pragma("GCC unroll 10") for (int c = 0; c < CB; c++) {
                    const rf b = wc[c] - (rf){0};  /* a broadcast (x − 0 is x; 0 + x is not, for x = −0) */
                    acc[0][c] += v0 * b;
                    if (NR > 1) acc[1][c] += v1 * b;
                }
            }
        }
}

#if CR_CB == 10
#define CR_CASES(M) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10)
#else
#define CR_CASES(M) M(1) M(2) M(3) M(4) M(5)
#endif
/* f32_rows for cb channels (1 … CR_CB) and nr rows (1, 2), each a constant there. */
#define CR_CALL(K) case K: { if (nr == 2) f32_rows(pl, PS, PWp, NI, ky0, ky1, KW, wk, CS, K, 2, acc);        \
                             else f32_rows(pl, PS, PWp, NI, ky0, ky1, KW, wk, CS, K, 1, acc); } break;
static inline __attribute__((always_inline)) void f32_rows_any(const float *pl, int64_t PS, int64_t PWp, int64_t NI, int64_t ky0, int64_t ky1, int64_t KW,
                         const float *wk, int64_t CS, int cb, int nr, rf acc[2][CR_CB]) {
    switch (cb) { CR_CASES(CR_CALL) }
}
#undef CR_CALL

/* Weights (Co, Ci, KH, KW) → (KH, KW, Ci, Co), or with `flip` the input gradient's (KH, KW, Co, Ci) with kernel rows
 * and columns reversed. */
static float *f32_conv_weights(const float *wt, int64_t Co, int64_t Ci, int64_t KH, int64_t KW, int flip) {
    float *wk = scratch(Co * Ci * KH * KW);
    if (!wk) return NULL;
    for (int64_t co = 0; co < Co; co++)
        for (int64_t ci = 0; ci < Ci; ci++)
            for (int64_t ky = 0; ky < KH; ky++)
                for (int64_t kx = 0; kx < KW; kx++) {
                    const float v = wt[((co * Ci + ci) * KH + ky) * KW + kx];
                    if (flip) wk[(((KH - 1 - ky) * KW + KW - 1 - kx) * Co + co) * Ci + ci] = v;
                    else wk[((ky * KW + kx) * Ci + ci) * Co + co] = v;
                }
    return wk;
}

/* Channel blocks of at most CR_CB, as even as can be (20 → 5 × 4 with AVX2, 10 × 2 with AVX-512). */
static inline int64_t cr_block(int64_t C) { const int64_t nb = (C + CR_CB - 1) / CR_CB; return (C + nb - 1) / nb; }

/* VL lanes of v into p, only the first n (1 … VL). */
static inline void str_first(float *p, rf v, int64_t n) {
    if (n >= VL) str(p, v);
    else memcpy(p, &v, sizeof(float) * (size_t)n);
}

/* Image n's channel planes (Ci, H, PW), from x channels-last; the columns past W keep their zeros. */
static void f32_planes(const float *restrict xn, int64_t H, int64_t W, int64_t Ci, int64_t PW, float *restrict xq) {
    for (int64_t h = 0; h < H; h++)
        for (int64_t w = 0; w < W; w++)
            for (int64_t ci = 0; ci < Ci; ci++) xq[(ci * H + h) * PW + w] = xn[(h * W + w) * Ci + ci];
}

int cnnlab_conv_relu_forward_f32(const float *x, int64_t N, int64_t H, int64_t W, int64_t Ci, const float *wt,
                                 const float *bias, int64_t Co, int64_t KH, int64_t KW, float *y, int nthreads) {
    const int64_t Ho = H - KH + 1, Wo = W - KW + 1, HP = (Ho + 1) / 2;
    const int64_t PW = (Wo + VL - 1) / VL * VL + KW - 1 + VL, PS = H * PW, CB = cr_block(Co);
    if (nthreads < 1) nthreads = 1;
    float *wk = f32_conv_weights(wt, Co, Ci, KH, KW, 0);
    int failed = !wk;
    if (!failed) _Pragma("omp parallel num_threads(nthreads)")
    {
        float *xq = scratch(Ci * PS);
        SCRATCH_READY(xq != NULL);
        int64_t image = -1;
        _Pragma("omp for schedule(static)")
        for (int64_t item = 0; item < N * HP; item++) {
            if (!ok) continue;
            const int64_t n = item / HP, ho = item % HP * 2, nr = Ho - ho < 2 ? 1 : 2;
            if (n != image) { f32_planes(x + n * H * W * Ci, H, W, Ci, PW, xq); image = n; }
            for (int64_t x0 = 0; x0 < Wo; x0 += VL)
                for (int64_t c0 = 0; c0 < Co; c0 += CB) {
                    const int cb = (int)(Co - c0 < CB ? Co - c0 : CB);
                    rf acc[2][CR_CB];
                    for (int c = 0; c < cb; c++) acc[0][c] = acc[1][c] = (bias ? bias[c0 + c] : 0.0f) - (rf){0};
                    f32_rows_any(xq + ho * PW + x0, PS, PW, Ci, 0, KH, KW, wk + c0, Co, cb, (int)nr, acc);
                    for (int r = 0; r < nr; r++)
                        for (int c = 0; c < cb; c++)  /* ReLU: NaN stays NaN */
                            str_first(y + ((n * Co + c0 + c) * Ho + ho + r) * Wo + x0,
                                      pickr(acc[r][c] < (rf){0}, (rf){0}, acc[r][c]), Wo - x0);
                }
        }
        free(xq);
    }
    free(wk);
    return failed;
}

/* The weight gradient's block: CB output channels × KB kernel columns of accumulators A (lanes VL; channel c's at
 * A + c·AS, column k's VL further), summed down an image's Ho rows, VL columns a step; xp: x's plane at row ky and
 * the block's first kernel column; gq: g' at its first channel (planes GS apart, rows GW apart, column 0); m: the
 * lanes where g' may be non-zero, per chunk (the last chunk's tail masked off). */
static inline __attribute__((always_inline)) void f32_wgrad_block(
        const float *restrict xp, int64_t XW, const float *restrict gq, int64_t GW, int64_t GS, int64_t Ho,
        int64_t Wo, const ri *restrict masks, const int CB, const int KB, float *restrict A, int64_t AS) {
    rf acc[CR_CBW][5];
    for (int c = 0; c < CB; c++)
        for (int k = 0; k < KB; k++) acc[c][k] = ldr(A + c * AS + k * VL);
    for (int64_t r = 0; r < Ho; r++)
        for (int64_t x0 = 0, q = 0; x0 < Wo; x0 += VL, q++) {
            rf gv[CR_CBW];
            for (int c = 0; c < CB; c++) gv[c] = ldr(gq + c * GS + r * GW + x0);
            for (int k = 0; k < KB; k++) {
                const rf xv = (rf)((ri)ldr(xp + r * XW + x0 + k) & masks[q]);
                for (int c = 0; c < CB; c++) acc[c][k] += gv[c] * xv;
            }
        }
    for (int c = 0; c < CB; c++)
        for (int k = 0; k < KB; k++) str(A + c * AS + k * VL, acc[c][k]);
}

#if CR_CBW == 4
#define CRW_CASES(M, K) M(1, K) M(2, K) M(3, K) M(4, K)
#else
#define CRW_CASES(M, K) M(1, K) M(2, K)
#endif
#define CRW_KB(M) CRW_CASES(M, 1) CRW_CASES(M, 2) CRW_CASES(M, 3) CRW_CASES(M, 4) CRW_CASES(M, 5)

/* dx (N, H, W, Ci) float32 channels-last (skipped when NULL), dw (Co, Ci, KH, KW) and db (Co) (db skipped when
 * NULL), from g and the forward's y, both (N, Co, Ho, Wo) float32. */
int cnnlab_conv_relu_backward_f32(const float *g, const float *y, const float *x, int64_t N, int64_t H, int64_t W,
                                  int64_t Ci, const float *wt, int64_t Co, int64_t KH, int64_t KW, float *dx,
                                  float *dw, float *db, int nthreads) {
    const int64_t Ho = H - KH + 1, Wo = W - KW + 1, PH = Ho + 2 * (KH - 1), NQ = (Wo + VL - 1) / VL;
    const int64_t GW = (W + VL - 1) / VL * VL + KW - 1 + VL, GS = PH * GW;  /* g' planes, padded */
    const int64_t XW = NQ * VL + KW - 1 + VL, XS = H * XW;                  /* x's planes */
    const int64_t nw = Co * Ci * KH * KW, CB = cr_block(Ci);
    if (nthreads < 1) nthreads = 1;
    float *wf = dx ? f32_conv_weights(wt, Co, Ci, KH, KW, 1) : NULL;
    float *parts = scratch(nw * VL * nthreads);
    double *dbp = (double *)calloc((size_t)(Co * nthreads + 1), sizeof(double));
    ri *masks = (ri *)scratch(NQ * VL);  /* a float's size a lane */
    int failed = !(parts && dbp && masks && (wf || !dx));
    if (!failed)
        for (int64_t q = 0; q < NQ; q++)
            for (int l = 0; l < VL; l++) masks[q][l] = q * VL + l < Wo ? -1 : 0;
    if (!failed) _Pragma("omp parallel num_threads(nthreads)")
    {
        const int t = omp_get_thread_num();
        float *A = parts + nw * VL * t, *gq = scratch(Co * GS), *xq = scratch(Ci * XS);
        float *tb = scratch(CR_CB * VL);
        double *dbt = dbp + Co * t;
        SCRATCH_READY(gq && xq && tb);
        _Pragma("omp for schedule(static)")
        for (int64_t n = 0; n < N; n++) {
            if (!ok) continue;
            const float *gn = g + n * Co * Ho * Wo, *yn = y + n * Co * Ho * Wo;
            for (int64_t co = 0; co < Co; co++) {  /* g' into the padded planes (the border stays zero); db */
                rf sv = {0};
                float s = 0.0f;
                for (int64_t r = 0; r < Ho; r++) {
                    const float *gr = gn + (co * Ho + r) * Wo, *yr = yn + (co * Ho + r) * Wo;
                    float *o = gq + co * GS + (r + KH - 1) * GW + KW - 1;
                    int64_t w = 0;
                    for (; w + VL <= Wo; w += VL) {
                        const rf yv = ldr(yr + w), v = pickr((yv > (rf){0}) | (yv != yv), ldr(gr + w), (rf){0});
                        str(o + w, v);
                        sv += v;
                    }
                    for (; w < Wo; w++) {  /* the tail: the columns past Wo keep their zeros */
                        const float v = (yr[w] > 0.0f || yr[w] != yr[w]) ? gr[w] : 0.0f;
                        o[w] = v;
                        s += v;
                    }
                }
                for (int l = 0; l < VL; l++) s += sv[l];
                dbt[co] += s;
            }
            f32_planes(x + n * H * W * Ci, H, W, Ci, XW, xq);
            const float *g0 = gq + (KH - 1) * GW + KW - 1;  /* g' row 0, column 0 */
            for (int64_t ci = 0; ci < Ci; ci++)  /* the weight gradient */
                for (int64_t ky = 0; ky < KH; ky++)
                    for (int64_t co = 0; co < Co; co += CR_CBW) {
                        const int cb = Co - co < CR_CBW ? (int)(Co - co) : CR_CBW;
                        for (int64_t kx = 0; kx < KW; kx += 5) {
                            const int kb = KW - kx < 5 ? (int)(KW - kx) : 5;
                            const float *xs = xq + (ci * H + ky) * XW + kx, *gs = g0 + co * GS;
                            float *Ab = A + (((co * Ci + ci) * KH + ky) * KW + kx) * VL;
                            const int64_t AS = Ci * KH * KW * VL;
                            switch (cb * 8 + kb) {
#define CRW_CASE(C, K) case C * 8 + K: f32_wgrad_block(xs, XW, gs, GW, GS, Ho, Wo, masks, C, K, Ab, AS); break;
                                CRW_KB(CRW_CASE)
#undef CRW_CASE
                            }
                        }
                    }
            if (!dx) continue;
            for (int64_t h = 0; h < H; h += 2) {  /* the input gradient, two rows at a time */
                const int nr = H - h < 2 ? 1 : 2;
                const int64_t ky0 = KH - nr - h > 0 ? KH - nr - h : 0, ky1 = KH - 1 + Ho - h < KH ? KH - 1 + Ho - h : KH;
                for (int64_t x0 = 0; x0 < W; x0 += VL)
                    for (int64_t c0 = 0; c0 < Ci; c0 += CB) {
                        const int cb = (int)(Ci - c0 < CB ? Ci - c0 : CB);
                        rf acc[2][CR_CB];
                        for (int c = 0; c < cb; c++) acc[0][c] = acc[1][c] = (rf){0};
                        f32_rows_any(gq + h * GW + x0, GS, GW, Co, ky0, ky1, KW, wf + c0, Ci, cb, nr, acc);
                        const int64_t nx = W - x0 < VL ? W - x0 : VL;
                        for (int r = 0; r < nr; r++) {
                            for (int c = 0; c < cb; c++) str(tb + c * VL, acc[r][c]);
                            float *o = dx + ((n * H + h + r) * W + x0) * Ci + c0;
                            for (int64_t l = 0; l < nx; l++)
                                for (int c = 0; c < cb; c++) o[l * Ci + c] = tb[c * VL + l];
                        }
                    }
            }
        }
        free(gq); free(xq); free(tb);
    }
    if (!failed) {  /* the threads' lanes, in double */
        for (int64_t j = 0; j < nw; j++) {
            double sum = 0;
            for (int t = 0; t < nthreads; t++)
                for (int l = 0; l < VL; l++) sum += parts[(nw * t + j) * VL + l];
            dw[j] = (float)sum;
        }
        if (db)
            for (int64_t co = 0; co < Co; co++) {
                double sum = 0;
                for (int t = 0; t < nthreads; t++) sum += dbp[Co * t + co];
                db[co] = (float)sum;
            }
    }
    free(parts); free(dbp); free(masks); free(wf);
    return failed;
}

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)  /* BW, VL: 16-bit masks */
/* A convolution with few channels, then ReLU, in bf16 with the dot-product instruction — the second paper's
 * 10 → 20-channel 5×5 one, whose output the dense layer reads in (C, H, W) order. torch's oneDNN kernels keep
 * channels as the vector lanes, and 10 or 20 channels fill 62.5 % of their 16- or 32-channel blocks; here the
 * lanes are 16 output columns and the dot product's pairs are two input channels, so every lane but the last
 * chunk's tail of a row does work. Stride 1, no padding, groups 1.
 *
 * Forward: x (N, H, W, Ci) bf16 channels-last, weights (Co, Ci, KH, KW) and bias float32 (rounded to bf16 here,
 * as autocast rounds them), y = relu(conv) (N, Co, Ho, Wo) bf16 in plain NCHW order, each value rounded once
 * from its float sum. Each image is first laid out as pair rows, pp[h, j, w] = (x[h, w, 2j], x[h, w, 2j + 1]),
 * so that 16 columns of a channel pair are one load. Backward: g (N, Co, Ho, Wo) bf16, NCHW; g' = g where
 * ReLU passed (y > 0 or NaN, as threshold_backward); the input gradient is a valid convolution of g' padded by
 * KH − 1, KW − 1 with the flipped weights (the same loop as the forward, pairs of output channels), only over
 * the kernel rows that meet g's rows; the weight gradient pairs two columns: lane l of a product is
 * g'[y, 2l]·x[ci, y + ky, 2l + kx] + g'[y, 2l + 1]·x[ci, y + ky, 2l + 1 + kx], so 32 columns of g' and of x's
 * channel plane, shifted by kx, are one load each, and a block of 4 output channels × 5 kernel columns sums in
 * registers down all rows of an image. */

/* Sums into acc[k][c] (lane l: column 16k + l of the output row) over kernel rows ky0..KH−1, channel pairs and
 * kernel columns: pair rows pp (row ky·NP + j, PW pairs each), weight pairs wp (KH, KW, NP, CS) at channel c. */
static inline __attribute__((always_inline)) void dot_rows(
        const uint32_t *restrict pp, int64_t PW, int64_t NP, int64_t ky0, int64_t KH, int64_t KW,
        const uint32_t *restrict wp, int64_t CS, const int CB, const int NC, __m512 acc[2][24]) {
    for (int64_t ky = ky0; ky < KH; ky++)
        for (int64_t j = 0; j < NP; j++)
            for (int64_t kx = 0; kx < KW; kx++) {
                const uint32_t *p = pp + (ky * NP + j) * PW + kx;
                const __m512bh v0 = (__m512bh)_mm512_loadu_si512(p);
                const __m512bh v1 = NC > 1 ? (__m512bh)_mm512_loadu_si512(p + LANES) : v0;
                const uint32_t *w = wp + ((ky * KW + kx) * NP + j) * CS;
                _Pragma("GCC unroll 24") for (int c = 0; c < CB; c++) {
                    const __m512bh b = (__m512bh)_mm512_set1_epi32((int)w[c]);
                    acc[0][c] = _mm512_dpbf16_ps(acc[0][c], v0, b);
                    if (NC > 1) acc[1][c] = _mm512_dpbf16_ps(acc[1][c], v1, b);
                }
            }
}

/* Weights (Co, Ci, KH, KW) float32 → bf16 pairs (KH, KW, NP, S): pairs of input channels for each output
 * channel (S = Co), or with `flip` the input gradient's — kernel rows and columns reversed, pairs of output
 * channels for each input channel (S = Ci). An odd count's last pair has a zero top half. */
static uint32_t *dot_weights(const float *wt, int64_t Co, int64_t Ci, int64_t KH, int64_t KW, int flip) {
    const int64_t A = flip ? Co : Ci, S = flip ? Ci : Co, NP = (A + 1) / 2, n = KH * KW * NP * S;
    uint32_t *wp = (uint32_t *)aligned_alloc(64, (size_t)((n + 16) / 16 * 16) * sizeof(uint32_t));
    if (!wp) return NULL;
    for (int64_t ky = 0; ky < KH; ky++)
        for (int64_t kx = 0; kx < KW; kx++)
            for (int64_t j = 0; j < NP; j++)
                for (int64_t s = 0; s < S; s++) {
                    uint32_t pair = 0;
                    for (int64_t half = 0; half < 2 && 2 * j + half < A; half++) {
                        const int64_t a = 2 * j + half, co = flip ? a : s, ci = flip ? s : a;
                        const int64_t y = flip ? KH - 1 - ky : ky, x = flip ? KW - 1 - kx : kx;
                        pair |= (uint32_t)bf16_store(wt[((co * Ci + ci) * KH + y) * KW + x]) << (16 * half);
                    }
                    wp[((ky * KW + kx) * NP + j) * S + s] = pair;
                }
    return wp;
}

#define DOT_CASES(M) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) \
                     M(13) M(14) M(15) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23) M(24)

int cnnlab_conv_relu_forward_bf16(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t Ci, const float *wt,
                                  const float *bias, int64_t Co, int64_t KH, int64_t KW, uint16_t *y, int nthreads) {
    const int64_t Ho = H - KH + 1, Wo = W - KW + 1, NP = (Ci + 1) / 2;
    const int64_t PW = ((Wo + LANES - 1) / LANES * LANES + KW - 1 + LANES - 1) / LANES * LANES;
    if (nthreads < 1) nthreads = 1;
    uint32_t *wp = dot_weights(wt, Co, Ci, KH, KW, 0);
    float *bb = scratch(Co);
    int failed = !(wp && bb);
    if (!failed)
        for (int64_t c = 0; c < Co; c++) bb[c] = bias ? bf16_load(bf16_store(bias[c])) : 0.0f;
    if (!failed) _Pragma("omp parallel num_threads(nthreads)")
    {
        const size_t ppn = (size_t)(H * NP * PW + 16);
        uint32_t *pp = (uint32_t *)aligned_alloc(64, (ppn + 15) / 16 * 16 * sizeof(uint32_t));
        SCRATCH_READY(pp != NULL);
        if (ok) memset(pp, 0, ppn * sizeof(uint32_t));  /* columns past W stay zero */
        int64_t image = -1;
        _Pragma("omp for schedule(static)")
        for (int64_t row = 0; row < N * Ho; row++) {
            if (!ok) continue;
            const int64_t n = row / Ho, ho = row % Ho;
            if (n != image) {  /* the image's pair rows */
                const uint16_t *xi = x + n * H * W * Ci;
                for (int64_t h = 0; h < H; h++)
                    for (int64_t j = 0; j < NP; j++) {
                        uint32_t *d = pp + (h * NP + j) * PW;
                        const uint16_t *s = xi + h * W * Ci + 2 * j;
                        if (2 * j + 1 < Ci)
                            for (int64_t w = 0; w < W; w++) d[w] = s[w * Ci] | (uint32_t)s[w * Ci + 1] << 16;
                        else
                            for (int64_t w = 0; w < W; w++) d[w] = s[w * Ci];
                    }
                image = n;
            }
            for (int64_t x0 = 0; x0 < Wo; x0 += LANES) {
                const __mmask16 m = Wo - x0 >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (Wo - x0)) - 1);
                for (int64_t c0 = 0, cb; c0 < Co; c0 += cb) {
                    cb = Co - c0 > 24 ? 24 : Co - c0;
                    __m512 acc[2][24];
                    for (int c = 0; c < cb; c++) acc[0][c] = _mm512_set1_ps(bb[c0 + c]);
                    switch (cb) {
#define DOT_FWD_CASE(K) case K: dot_rows(pp + ho * NP * PW + x0, PW, NP, 0, KH, KW, wp + c0, Co, K, 1, acc); break;
                        DOT_CASES(DOT_FWD_CASE)
#undef DOT_FWD_CASE
                    }
                    uint16_t *o = y + ((n * Co + c0) * Ho + ho) * Wo + x0;
                    for (int c = 0; c < cb; c++)  /* ReLU, then one rounding: max_ps(0, v) is v where v is NaN */
                        _mm256_mask_storeu_epi16(o + c * Ho * Wo, m, (__m256i)_mm512_cvtneps_pbh(
                            _mm512_max_ps(_mm512_setzero_ps(), acc[0][c])));
                }
            }
        }
        free(pp);
    }
    free(wp);
    free(bb);
    return failed;
}

/* The weight gradient's block: CB output channels × KB kernel columns of accumulators A (CB, KB, 16 lanes),
 * summed down an image's Ho rows; xp: x's plane row ky, shifted by the block's first kernel column; gq: g' at the
 * block's first output channel (planes HW apart, rows GW apart); xm: the columns where g' may be non-zero, the only
 * ones of x read (a non-finite x past them would make 0 · Inf = NaN where torch forms no product). */
static inline __attribute__((always_inline)) void dot_wgrad_block(
        const uint16_t *restrict xp, int64_t XW, const uint16_t *restrict gq, int64_t GW, int64_t HW, int64_t Ho,
        __mmask32 xm, const int CB, const int KB, float *restrict A) {
    __m512 acc[4][5];
    for (int c = 0; c < CB; c++)
        for (int k = 0; k < KB; k++) acc[c][k] = _mm512_load_ps(A + (c * KB + k) * LANES);
    for (int64_t r = 0; r < Ho; r++) {
        __m512bh xs[5];
        for (int k = 0; k < KB; k++) xs[k] = (__m512bh)_mm512_maskz_loadu_epi16(xm, xp + r * XW + k);
        for (int c = 0; c < CB; c++) {
            const __m512bh gv = (__m512bh)_mm512_load_si512(gq + c * HW + r * GW);
            for (int k = 0; k < KB; k++) acc[c][k] = _mm512_dpbf16_ps(acc[c][k], gv, xs[k]);
        }
    }
    for (int c = 0; c < CB; c++)
        for (int k = 0; k < KB; k++) _mm512_store_ps(A + (c * KB + k) * LANES, acc[c][k]);
}

/* dx (N, H, W, Ci) bf16 channels-last (skipped when NULL), dw (Co, Ci, KH, KW) and db (Co) float32 (db skipped
 * when NULL), from g and the forward's y, both (N, Co, Ho, Wo) bf16. */
int cnnlab_conv_relu_backward_bf16(const uint16_t *g, const uint16_t *y, const uint16_t *x, int64_t N, int64_t H,
                                   int64_t W, int64_t Ci, const float *wt, int64_t Co, int64_t KH, int64_t KW,
                                   uint16_t *dx, float *dw, float *db, int nthreads) {
    const int64_t Ho = H - KH + 1, Wo = W - KW + 1, NQ = (Co + 1) / 2, PH = Ho + 2 * (KH - 1);
    const int64_t PW = ((W + LANES - 1) / LANES * LANES + KW - 1 + LANES - 1) / LANES * LANES;  /* g' pair rows */
    const int64_t GW = (Wo + 31) / 32 * 32, XW = (GW + KW - 1 + 31) / 32 * 32;  /* g' and x channel planes */
    const int64_t asz = Ci * KH * Co * KW * LANES;  /* a thread's weight-gradient lanes */
    if (nthreads < 1) nthreads = 1;
    uint32_t *wp = dx ? dot_weights(wt, Co, Ci, KH, KW, 1) : NULL;
    float *parts = scratch(asz * nthreads);
    double *dbp = (double *)calloc((size_t)(Co * nthreads + 1), sizeof(double));
    int failed = !(parts && dbp && (wp || !dx));
    if (!failed) _Pragma("omp parallel num_threads(nthreads)")
    {
        const int t = omp_get_thread_num();
        float *A = parts + asz * t;
        double *dbt = dbp + Co * t;
        const size_t gpn = (size_t)(PH * NQ * PW + 16), gqn = (size_t)(Co * Ho * GW + 64), xqn = (size_t)(Ci * H * XW + 64);
        uint32_t *gp = (uint32_t *)aligned_alloc(64, (gpn + 15) / 16 * 16 * sizeof(uint32_t));
        uint16_t *gq = (uint16_t *)aligned_alloc(64, (gqn + 31) / 32 * 32 * sizeof(uint16_t));
        uint16_t *xq = (uint16_t *)aligned_alloc(64, (xqn + 31) / 32 * 32 * sizeof(uint16_t));
        uint16_t *tb = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * LANES * 24);
        SCRATCH_READY(gp && gq && xq && tb);
        if (ok) {  /* the padding (g's border, columns past Wo or W) stays zero */
            memset(gp, 0, gpn * sizeof(uint32_t));
            memset(gq, 0, gqn * sizeof(uint16_t));
            memset(xq, 0, xqn * sizeof(uint16_t));
        }
        _Pragma("omp for schedule(static)")
        for (int64_t n = 0; n < N; n++) {
            if (!ok) continue;
            const uint16_t *gn = g + n * Co * Ho * Wo, *yn = y + n * Co * Ho * Wo, *xn = x + n * H * W * Ci;
            /* g' into 32-column planes (gq) and padded pair rows (gp), 32 columns a step; the bias gradient */
            for (int64_t j = 0; j < NQ; j++) {
                __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int64_t r = 0; r < Ho; r++)
                    for (int64_t w = 0; w < Wo; w += 32) {
                        __m512i half[2][2] = {{_mm512_setzero_si512(), _mm512_setzero_si512()},
                                              {_mm512_setzero_si512(), _mm512_setzero_si512()}};
                        const __mmask32 m = Wo - w >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (Wo - w)) - 1);
                        for (int h2 = 0; h2 < 2 && 2 * j + h2 < Co; h2++) {
                            const int64_t at = ((2 * j + h2) * Ho + r) * Wo + w;
                            const __m512i gv = _mm512_maskz_loadu_epi16(m, gn + at), yv = _mm512_maskz_loadu_epi16(m, yn + at);
                            const __mmask32 pass = _mm512_cmpgt_epi16_mask(yv, _mm512_setzero_si512())
                                | _mm512_cmpgt_epi16_mask(_mm512_and_si512(yv, _mm512_set1_epi16(0x7FFF)), _mm512_set1_epi16(0x7F80));
                            const __m512i gm = _mm512_maskz_mov_epi16(pass, gv);
                            _mm512_store_si512(gq + ((2 * j + h2) * Ho + r) * GW + w, gm);
                            const __m512i a = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(gm)), 16);
                            const __m512i b = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(gm, 1)), 16);
                            s[h2] = _mm512_add_ps(s[h2], _mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b)));
                            half[h2][0] = h2 ? a : _mm512_srli_epi32(a, 16);
                            half[h2][1] = h2 ? b : _mm512_srli_epi32(b, 16);
                        }
                        uint32_t *pr = gp + ((r + KH - 1) * NQ + j) * PW + KW - 1 + w;
                        for (int64_t k = 0; k < 2 && w + LANES * k < Wo; k++) {
                            const int64_t left = Wo - w - LANES * k;
                            const __mmask16 mk = left >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                            _mm512_mask_storeu_epi32(pr + LANES * k, mk, _mm512_or_si512(half[0][k], half[1][k]));
                        }
                    }
                dbt[2 * j] += _mm512_reduce_add_ps(s[0]);
                if (2 * j + 1 < Co) dbt[2 * j + 1] += _mm512_reduce_add_ps(s[1]);
            }
            for (int64_t h = 0; h < H; h++)  /* x's channel planes */
                for (int64_t ci = 0; ci < Ci; ci++) {
                    uint16_t *d = xq + (ci * H + h) * XW;
                    const uint16_t *src = xn + h * W * Ci + ci;
                    for (int64_t w = 0; w < W; w++) d[w] = src[w * Ci];
                }
            /* the weight gradient: blocks of 4 output channels × 5 kernel columns, A laid out block after block */
            for (int64_t ci = 0; ci < Ci; ci++)
                for (int64_t ky = 0; ky < KH; ky++)
                    for (int64_t co = 0; co < Co; co += 4) {
                        const int cb = Co - co < 4 ? (int)(Co - co) : 4;
                        for (int64_t kx = 0; kx < KW; kx += 5) {
                            const int kb = KW - kx < 5 ? (int)(KW - kx) : 5;
                            float *Ab = A + (((ci * KH + ky) * Co + co) * KW + kx * cb) * LANES;
                            for (int64_t xc = 0; xc < GW; xc += 32) {
                                const uint16_t *xs = xq + (ci * H + ky) * XW + kx + xc, *gs = gq + co * Ho * GW + xc;
                                const __mmask32 xm = Wo - xc >= 32 ? (__mmask32)0xFFFFFFFFu
                                                                   : (__mmask32)((1u << (Wo - xc)) - 1);
                                switch (cb * 8 + kb) {
#define DOT_WG_CASE(C, K) case C * 8 + K: dot_wgrad_block(xs, XW, gs, GW, Ho * GW, Ho, xm, C, K, Ab); break;
                                    DOT_WG_CASE(1, 1) DOT_WG_CASE(1, 2) DOT_WG_CASE(1, 3) DOT_WG_CASE(1, 4) DOT_WG_CASE(1, 5)
                                    DOT_WG_CASE(2, 1) DOT_WG_CASE(2, 2) DOT_WG_CASE(2, 3) DOT_WG_CASE(2, 4) DOT_WG_CASE(2, 5)
                                    DOT_WG_CASE(3, 1) DOT_WG_CASE(3, 2) DOT_WG_CASE(3, 3) DOT_WG_CASE(3, 4) DOT_WG_CASE(3, 5)
                                    DOT_WG_CASE(4, 1) DOT_WG_CASE(4, 2) DOT_WG_CASE(4, 3) DOT_WG_CASE(4, 4) DOT_WG_CASE(4, 5)
#undef DOT_WG_CASE
                                }
                            }
                        }
                    }
            if (!dx) continue;
            /* the input gradient, two 16-column chunks of a row at a time, then into channels-last order */
            for (int64_t h = 0; h < H; h++)
                for (int64_t x0 = 0; x0 < W; x0 += 2 * LANES) {
                    const int two = W - x0 > LANES;
                    const int64_t a0 = KH - 1 - h > 0 ? KH - 1 - h : 0, a1 = KH - 1 - h + Ho < KH ? KH - 1 - h + Ho : KH;
                    const uint32_t *pr = gp + h * NQ * PW + x0;
                    for (int64_t c0 = 0, cb; c0 < Ci; c0 += cb) {
                        cb = Ci - c0 > 12 ? 12 : Ci - c0;
                        __m512 acc[2][24];
                        for (int c = 0; c < cb; c++) acc[0][c] = acc[1][c] = _mm512_setzero_ps();
                        if (two) switch (cb) {
#define DOT_DG_CASE(K) case K: dot_rows(pr, PW, NQ, a0, a1, KW, wp + c0, Ci, K, 2, acc); break;
                            DOT_DG_CASE(1) DOT_DG_CASE(2) DOT_DG_CASE(3) DOT_DG_CASE(4) DOT_DG_CASE(5) DOT_DG_CASE(6)
                            DOT_DG_CASE(7) DOT_DG_CASE(8) DOT_DG_CASE(9) DOT_DG_CASE(10) DOT_DG_CASE(11) DOT_DG_CASE(12)
#undef DOT_DG_CASE
                        } else switch (cb) {
#define DOT_DG_CASE(K) case K: dot_rows(pr, PW, NQ, a0, a1, KW, wp + c0, Ci, K, 1, acc); break;
                            DOT_DG_CASE(1) DOT_DG_CASE(2) DOT_DG_CASE(3) DOT_DG_CASE(4) DOT_DG_CASE(5) DOT_DG_CASE(6)
                            DOT_DG_CASE(7) DOT_DG_CASE(8) DOT_DG_CASE(9) DOT_DG_CASE(10) DOT_DG_CASE(11) DOT_DG_CASE(12)
#undef DOT_DG_CASE
                        }
                        for (int k = 0; k <= two; k++) {
                            for (int c = 0; c < cb; c++)
                                _mm256_store_si256((__m256i *)(tb + c * LANES), (__m256i)_mm512_cvtneps_pbh(acc[k][c]));
                            const int64_t w0 = x0 + k * LANES, nw = W - w0 < LANES ? W - w0 : LANES;
                            uint16_t *o = dx + ((n * H + h) * W + w0) * Ci + c0;
                            for (int64_t l = 0; l < nw; l++)
                                for (int c = 0; c < cb; c++) o[l * Ci + c] = tb[c * LANES + l];
                        }
                    }
                }
        }
        free(gp); free(gq); free(xq); free(tb);
    }
    if (!failed) {  /* the threads' parts and the 16 lanes, in double, into dw's (Co, Ci, KH, KW) order */
        for (int64_t ci = 0; ci < Ci; ci++)
            for (int64_t ky = 0; ky < KH; ky++)
                for (int64_t co = 0; co < Co; co += 4) {
                    const int64_t cb = Co - co < 4 ? Co - co : 4;
                    for (int64_t kx = 0; kx < KW; kx += 5) {
                        const int64_t kb = KW - kx < 5 ? KW - kx : 5;
                        const float *Ab = parts + (((ci * KH + ky) * Co + co) * KW + kx * cb) * LANES;
                        for (int64_t c = 0; c < cb; c++)
                            for (int64_t k = 0; k < kb; k++) {
                                double sum = 0;
                                for (int t = 0; t < nthreads; t++)
                                    for (int l = 0; l < LANES; l++) sum += Ab[asz * t + (c * kb + k) * LANES + l];
                                dw[(((co + c) * Ci + ci) * KH + ky) * KW + kx + k] = (float)sum;
                            }
                    }
                }
        if (db)
            for (int64_t co = 0; co < Co; co++) {
                double sum = 0;
                for (int t = 0; t < nthreads; t++) sum += dbp[Co * t + co];
                db[co] = (float)sum;
            }
    }
    free(parts); free(dbp); free(wp);
    return failed;
}

/* The first paper's first block's forward in one pass, for a 1-channel image: y = conv2d(x, w, b) stride 1, zero
 * padding (PH, PW), in bf16 as autocast computes it (x, w and b rounded to bf16, float sums rounded once), stored
 * channels-last (N, Hc, Wc, Co); then what pool_stats(y, relu=1, stats=1) gives: the 2×2 max of relu(y), its
 * position (0 top-left … 3 bottom-right: the right column wins a row when greater or NaN, then the bottom row),
 * and per channel Σ relu(y) and Σ relu(y)², each row's float sums added in double in pool_stats' order (the same
 * rows per thread), so the sums are pool_stats'. torch's convolution for one input channel ran at ~150 GFLOP/s and
 * wrote y for pool_stats to read back; here the lanes are 16 output channels, the dot product's pairs two kernel
 * rows at one column — q[r][w] = (P[r][w], P[r + 1][w]) of the padded image P, or for an odd kernel's last row P's
 * value alone, zero-extended (so a NaN or Inf past the kernel never meets its zero weight) — and a block of 2 rows ×
 * 4 columns (two pooling windows) × Co channels sums in registers. Co is 16 or 32; Hc even, Wc a multiple of 4
 * (conv_pool_stats_applies; other shapes are refused with −1). */
static inline __attribute__((always_inline)) void conv1_block(
        const uint32_t *restrict q, const uint16_t *restrict pl, int64_t Wp, int64_t KH, int64_t KW,
        const __m512i *restrict wv, const float *restrict bias, const int CB, __m512 acc[2][4][2]) {
    for (int c = 0; c < CB; c++) {
        const __m512 b = _mm512_loadu_ps(bias + LANES * c);
        for (int r = 0; r < 2; r++)
            for (int k = 0; k < 4; k++) acc[r][k][c] = b;
    }
    for (int64_t p = 0; 2 * p < KH; p++) {
        const int pair = 2 * p + 1 < KH;
        for (int64_t kx = 0; kx < KW; kx++) {
            __m512bh w[2];
            for (int c = 0; c < CB; c++) w[c] = (__m512bh)_mm512_load_si512(wv + (p * KW + kx) * CB + c);
            for (int r = 0; r < 2; r++)
                for (int k = 0; k < 4; k++) {
                    const int64_t at = (2 * p + r) * Wp + kx + k;
                    const __m512bh v = (__m512bh)_mm512_set1_epi32(pair ? (int)q[at] : (int)pl[at]);
                    for (int c = 0; c < CB; c++) acc[r][k][c] = _mm512_dpbf16_ps(acc[r][k][c], w[c], v);
                }
        }
    }
}

/* Where b wins a window's comparison against a: greater, or NaN (pool_stats' rule: ties go left / up). */
static inline __mmask16 wins(__m512 b, __m512 a) {
    return _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
}

int cnnlab_conv_pool_stats_bf16(const float *x, int64_t N, int64_t H, int64_t W, const float *wt, const float *bias,
                                int64_t Co, int64_t KH, int64_t KW, int64_t PH, int64_t PW, uint16_t *y,
                                uint16_t *pooled, uint8_t *idx, double *sums, int nthreads) {
    const int64_t Hp = H + 2 * PH, Wp = W + 2 * PW, Hc = Hp - KH + 1, Wc = Wp - KW + 1, Ho = Hc / 2, Wo = Wc / 2;
    const int64_t NPK = (KH + 1) / 2, CB = Co / LANES;
    if ((Co != 16 && Co != 32) || Hc < 2 || Hc % 2 || Wc < 4 || Wc % 4 || KH < 1 || KW < 1) return -1;
    if (nthreads < 1) nthreads = 1;
    __m512i *wv = (__m512i *)aligned_alloc(64, (size_t)(NPK * KW * CB + 1) * 64);
    float *bb = scratch(Co);
    double *part = (double *)calloc((size_t)nthreads * 2 * Co, sizeof(double));
    int failed = !(wv && bb && part);
    if (!failed) {  /* weight pairs (kernel rows 2p, 2p + 1 at column kx) for each block of 16 output channels */
        uint32_t *wp = (uint32_t *)wv;
        for (int64_t p = 0; p < NPK; p++)
            for (int64_t kx = 0; kx < KW; kx++)
                for (int64_t co = 0; co < Co; co++) {
                    const uint32_t lo = bf16_store(wt[(co * KH + 2 * p) * KW + kx]);
                    const uint32_t hi = 2 * p + 1 < KH ? bf16_store(wt[(co * KH + 2 * p + 1) * KW + kx]) : 0;
                    wp[((p * KW + kx) * CB + co / LANES) * LANES + co % LANES] = lo | hi << 16;
                }
        for (int64_t c = 0; c < Co; c++) bb[c] = bias ? bf16_load(bf16_store(bias[c])) : 0.0f;
    }
    if (!failed) _Pragma("omp parallel num_threads(nthreads)")
    {
        double *mine = part + (size_t)omp_get_thread_num() * 2 * Co;
        uint16_t *pl = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(Hp * Wp + 1));
        uint32_t *q = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(Hp * Wp + 8));
        SCRATCH_READY(pl && q);
        if (ok) memset(pl, 0, sizeof(uint16_t) * (size_t)(Hp * Wp));  /* the padding stays zero */
        int64_t image = -1;
        _Pragma("omp for schedule(static)")
        for (int64_t row = 0; row < N * Ho; row++) {  /* pooled rows, as pool_stats shares them out */
            if (!ok) continue;
            const int64_t n = row / Ho, ho = row % Ho;
            if (n != image) {  /* the image, rounded to bf16 and padded, as pair rows */
                const float *xi = x + n * H * W;
                for (int64_t h = 0; h < H; h++)
                    for (int64_t w = 0; w < W; w++) pl[(h + PH) * Wp + w + PW] = bf16_store(xi[h * W + w]);
                for (int64_t r = 0; r + 1 < Hp; r++)  /* the last row starts no pair */
                    for (int64_t w = 0; w < Wp; w++)
                        q[r * Wp + w] = pl[r * Wp + w] | (uint32_t)pl[(r + 1) * Wp + w] << 16;
                image = n;
            }
            __m512 s[2][2], sq[2][2];  /* [row][channel block]: each row's float sums, as pool_stats' add_stats */
            for (int r = 0; r < 2; r++)
                for (int c = 0; c < 2; c++) s[r][c] = sq[r][c] = _mm512_setzero_ps();
            for (int64_t w0 = 0; w0 < Wc; w0 += 4) {
                __m512 acc[2][4][2];
                const int64_t at = 2 * ho * Wp + w0;
                if (CB == 2) conv1_block(q + at, pl + at, Wp, KH, KW, wv, bb, 2, acc);
                else conv1_block(q + at, pl + at, Wp, KH, KW, wv, bb, 1, acc);
                for (int c = 0; c < CB; c++) {
                    __m512 v[2][4];
                    for (int r = 0; r < 2; r++)
                        for (int k = 0; k < 4; k++) {  /* y rounded once; ReLU on the rounded value, NaN kept */
                            const __m256i h = (__m256i)_mm512_cvtneps_pbh(acc[r][k][c]);
                            uint16_t *yo = y + ((n * Hc + 2 * ho + r) * Wc + w0 + k) * Co + LANES * c;
                            _mm256_storeu_si256((__m256i *)yo, h);
                            const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                            v[r][k] = _mm512_mask_mov_ps(f, _mm512_cmp_ps_mask(f, _mm512_setzero_ps(), _CMP_LT_OQ),
                                                         _mm512_setzero_ps());
                            s[r][c] = _mm512_add_ps(s[r][c], v[r][k]);
                            sq[r][c] = _mm512_fmadd_ps(v[r][k], v[r][k], sq[r][c]);
                        }
                    for (int j = 0; j < 2; j++) {  /* the block's two windows */
                        __m512 hm[2];
                        __mmask16 hk[2];
                        for (int r = 0; r < 2; r++) {
                            hk[r] = wins(v[r][2 * j + 1], v[r][2 * j]);
                            hm[r] = _mm512_mask_mov_ps(v[r][2 * j], hk[r], v[r][2 * j + 1]);
                        }
                        const __mmask16 t = wins(hm[1], hm[0]);
                        __m512 m = _mm512_mask_mov_ps(hm[0], t, hm[1]);  /* a NaN as pool_stats writes it: 0x7FC0 */
                        m = _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q),
                                               _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
                        const int64_t at = ((n * Ho + ho) * Wo + w0 / 2 + j) * Co + LANES * c;
                        _mm256_storeu_si256((__m256i *)(pooled + at), (__m256i)_mm512_cvtneps_pbh(m));
                        const __mmask16 right = (__mmask16)((t & hk[1]) | (~t & hk[0]));
                        _mm_storeu_si128((__m128i *)(idx + at), _mm_or_si128(_mm_maskz_set1_epi8(right, 1),
                                                                             _mm_maskz_set1_epi8(t, 2)));
                    }
                }
            }
            for (int r = 0; r < 2; r++) {  /* the two rows' float sums into this thread's doubles, row by row */
                float fs[32], fq[32];
                for (int c = 0; c < CB; c++) {
                    _mm512_storeu_ps(fs + LANES * c, s[r][c]);
                    _mm512_storeu_ps(fq + LANES * c, sq[r][c]);
                }
                for (int64_t c = 0; c < Co; c++) { mine[c] += fs[c]; mine[Co + c] += fq[c]; }
            }
        }
        free(pl); free(q);
    }
    if (!failed) sum_parts(part, nthreads, 2 * Co, sums);
    free(wv); free(bb); free(part);
    return failed;
}
#endif

/* ---------------------------------------------------------------------------------------------------------
 * Batch augmentation's warp (data/augment.py): each image flipped or not, rotated, zoomed and shifted as
 * F.grid_sample(x, F.affine_grid(θ), bilinear, padding "border", align_corners=False) computes it, in one pass
 * from the random draws, where torch's path runs a dozen small ops for θ, a flip, the grid and the warp.
 * u: 5 rows of N uniform draws in [0, 1) (flip, angle, zoom, x shift, y shift; the first unused when
 * hflip is 0); bounds: the rotation in radians, the zoom's ± fraction, the shift's ± fraction of the side and
 * the flip's probability. x and out are float32 (N, C, H, W) with any strides (xs, os, in elements). */
#define WARP_CHUNK 1024  /* output pixels whose sampling positions are worked out at once: 20 KiB of scratch */

/* Where each of `n` output pixels samples: its centre (gx0, gy0) in [-1, 1] mapped through θ (the flip folded
 * into θ's first row: a flipped image sampled at u is the image sampled at −u), un-normalised and clamped to
 * the image (padding "border"); the top-left neighbour's offset, the steps to the right and lower neighbours
 * (0 at the last column or row, where their weight is 0) and the fractional parts. */
static void warp_coords(int64_t n, const float *restrict gx0, const float *restrict gy0, const float *t, float Wf,
                        float Hf, int32_t xs2, int32_t xs3, int32_t *restrict off, int32_t *restrict dx,
                        int32_t *restrict dy, float *restrict ex, float *restrict ey) {
    const float t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3], t4 = t[4], t5 = t[5], Wm = Wf - 1, Hm = Hf - 1;
    for (int64_t k = 0; k < n; k++) {
        const float gx = t0 * gx0[k] + t1 * gy0[k] + t2, gy = t3 * gx0[k] + t4 * gy0[k] + t5;
        float ix = ((gx + 1) * Wf - 1) * 0.5f, iy = ((gy + 1) * Hf - 1) * 0.5f;
        ix = ix > 0 ? ix : 0.0f;  /* comparisons, not fmaxf / fminf (library calls the loop would not vectorise) */
        ix = ix < Wm ? ix : Wm;
        iy = iy > 0 ? iy : 0.0f;
        iy = iy < Hm ? iy : Hm;
        const int32_t x0 = (int32_t)ix, y0 = (int32_t)iy;  /* floor: ix, iy ≥ 0 */
        off[k] = y0 * xs2 + x0 * xs3;
        dx[k] = x0 < (int32_t)Wm ? xs3 : 0;
        dy[k] = y0 < (int32_t)Hm ? xs2 : 0;
        ex[k] = ix - (float)x0;
        ey[k] = iy - (float)y0;
    }
}

/* The bilinear blend of a pixel's four neighbours p, p + dx, p + dy, p + dx + dy with fractions a (across) and b
 * (down), as weighted sums ((1 − t)·u + t·v: an infinite pixel stays infinite where its weight is not 0, as in
 * grid_sample; u + t·(v − u) would make it NaN), a neighbour past the last column or row (dx or dy 0) left out
 * rather than weighted by 0 (grid_sample masks it: 0·inf would be NaN). Next to an infinite pixel, at a position
 * on a pixel's centre, the un-normalisation's rounding (((g + 1)·W − 1)·0.5 here, g·W/2 + (W/2 − 0.5) in torch's
 * vectorised path) can still give NaN on one side and a number on the other. */
static inline float blend4(const float *p, int32_t dx, int32_t dy, float a, float b) {
    const float top = dx ? (1 - a) * p[0] + a * p[dx] : p[0];
    if (!dy) return top;
    const float bottom = dx ? (1 - a) * p[dy] + a * p[dx + dy] : p[dy];
    return (1 - b) * top + b * bottom;
}

/* One channel's n output pixels (at a stride of os). Kept scalar: the compiler's gathers made this loop slower on
 * the Zen 4 (the image is in L1 either way). */
__attribute__((optimize("no-tree-vectorize")))
static void warp_blend(int64_t n, const float *restrict xc, float *restrict oc, int64_t os, const int32_t *restrict off,
                       const int32_t *restrict dx, const int32_t *restrict dy, const float *restrict ex,
                       const float *restrict ey) {
    for (int64_t k = 0; k < n; k++) oc[k * os] = blend4(xc + off[k], dx[k], dy[k], ex[k], ey[k]);
}

/* Channels-last (channels at a stride of 1 in x and out, rows back to back in out): n pixels of C channels, each
 * pixel's offsets and weights read once for all its channels. */
__attribute__((optimize("no-tree-vectorize")))
static void warp_blend_pixels(int64_t n, int64_t C, const float *restrict x, float *restrict o,
                              const int32_t *restrict off, const int32_t *restrict dx, const int32_t *restrict dy,
                              const float *restrict ex, const float *restrict ey) {
    for (int64_t k = 0; k < n; k++)
        for (int64_t c = 0; c < C; c++) o[k * C + c] = blend4(x + off[k] + c, dx[k], dy[k], ex[k], ey[k]);
}

int cnnlab_warp_affine_f32(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, const int64_t *xs,
                           const float *u, const float *bounds, float *out, const int64_t *os, int nthreads) {
    const int64_t xs0 = xs[0], xs1 = xs[1], os0 = os[0], os1 = os[1], os2 = os[2], os3 = os[3], P = H * W;
    const int32_t xs2 = (int32_t)xs[2], xs3 = (int32_t)xs[3];
    const float rot = bounds[0], scale = bounds[1], shift = bounds[2], hflip = bounds[3];
    float *base = (float *)malloc((size_t)P * 2 * sizeof(float));  /* each output pixel's centre in [-1, 1] */
    if (!base) return 1;
    for (int64_t i = 0; i < H; i++)
        for (int64_t j = 0; j < W; j++) {  /* as data/augment.py's affine_grid writes them */
            base[i * W + j] = (float)(2 * j + 1) / (float)W - 1;
            base[P + i * W + j] = (float)(2 * i + 1) / (float)H - 1;
        }
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        int32_t *ints = (int32_t *)aligned_alloc(64, WARP_CHUNK * 3 * sizeof(int32_t));
        float *fracs = (float *)aligned_alloc(64, WARP_CHUNK * 2 * sizeof(float));
        SCRATCH_READY(ints && fracs);
        int32_t *off = ints, *dx = ints + WARP_CHUNK, *dy = ints + 2 * WARP_CHUNK;
        float *ex = fracs, *ey = fracs + WARP_CHUNK;
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!ok) continue;
            /* θ from the draws, as augment_batch forms it: angle and zoom, then the shift in [-1, 1] units */
            const float flip = hflip > 0 && u[n] < hflip ? -1.0f : 1.0f;
            const float angle = (u[N + n] * 2 - 1) * rot, zoom = 1 + (u[2 * N + n] * 2 - 1) * scale;
            const float tx = 2 * ((u[3 * N + n] * 2 - 1) * shift), ty = 2 * ((u[4 * N + n] * 2 - 1) * shift);
            const float c = cosf(angle) / zoom, s = sinf(angle) / zoom;
            const float t[6] = {flip * c, -flip * s, flip * tx, s, c, ty};
            for (int64_t k0 = 0; k0 < P; k0 += WARP_CHUNK) {
                const int64_t m = P - k0 < WARP_CHUNK ? P - k0 : WARP_CHUNK;
                warp_coords(m, base + k0, base + P + k0, t, (float)W, (float)H, xs2, xs3, off, dx, dy, ex, ey);
                if (C > 1 && xs1 == 1 && os1 == 1 && os3 == C && os2 == W * C) {
                    warp_blend_pixels(m, C, x + n * xs0, out + n * os0 + k0 * C, off, dx, dy, ex, ey);
                    continue;
                }
                for (int64_t ch = 0; ch < C; ch++) {
                    const float *xc = x + n * xs0 + ch * xs1;
                    if (os2 == W * os3) {  /* rows back to back: the chunk's pixels at a stride of os3 */
                        warp_blend(m, xc, out + n * os0 + ch * os1 + k0 * os3, os3, off, dx, dy, ex, ey);
                    } else {
                        for (int64_t r = 0; r < m; r++) {  /* any other layout: pixel by pixel */
                            const int64_t k = k0 + r;
                            warp_blend(1, xc, out + n * os0 + ch * os1 + (k / W) * os2 + (k % W) * os3, 0,
                                       off + r, dx + r, dy + r, ex + r, ey + r);
                        }
                    }
                }
            }
        }
        free(ints); free(fracs);
    }
    free(base);
    return failed;
}

int cnnlab_native_version(void) { return 10; }
int cnnlab_wgrad_dot(void) { return WG_DOT; }  /* whether pool_backward_wgrad has its bf16 dot products */
