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

static inline vf ldf(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stf(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vb ldb(const uint8_t *p) { vb v; memcpy(&v, p, sizeof v); return v; }
static inline void stb(uint8_t *p, vb v) { memcpy(p, &v, sizeof v); }
static inline vf pick(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }  /* m ? a : b */

/* Horizontal max of one row: out[wo, c] = max(r[2wo, c], r[2wo+1, c]), bit[wo, c] = 1 when the right one
 * wins (greater, or NaN), so a tie goes left as in torch's scan. */
static inline void hmax_row(const float *restrict r, int64_t Wo, int64_t C, float *restrict out,
                            uint8_t *restrict bit) {
    for (int64_t wo = 0; wo < Wo; wo++)
        for (int64_t c0 = 0; c0 < C; c0 += LANES) {
            const vf a = ldf(r + 2 * wo * C + c0), b = ldf(r + (2 * wo + 1) * C + c0);
            const vi t = (b > a) | (b != b);
            stf(out + wo * C + c0, pick(t, b, a));
            stb(bit + wo * C + c0, __builtin_convertvector(t & 1, vb));
        }
}

/* The window max from the two rows' horizontal maxima (the bottom wins when greater or NaN): the position
 * 0–3 as torch's scan order gives it, contiguous over Wo·C. */
static inline void vmax_rows(const float *restrict h0, const uint8_t *restrict k0, const float *restrict h1,
                             const uint8_t *restrict k1, int64_t n, float *restrict out, uint8_t *restrict ix) {
    for (int64_t j = 0; j < n; j++) {
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
    for (int64_t c0 = 0; c0 < C; c0 += LANES) {
        vf s = {0}, q = {0};
        for (int64_t w = 0; w < W; w++) {
            const vf v = ldf(r + w * C + c0);
            s += v;
            q += v * v;
        }
        for (int l = 0; l < LANES && c0 + l < C; l++) { sum[c0 + l] += s[l]; sq[c0 + l] += q[l]; }
    }
}

/* sum[c] += Σ_w g[w, c], dot[c] += Σ_w g[w, c]·p[w, c] over the W positions of a row (chunked; float
 * within the row, double across rows, as add_stats). */
static inline void add_products(const float *restrict g, const float *restrict p, int64_t W, int64_t C,
                                double *restrict sum, double *restrict dot) {
    for (int64_t c0 = 0; c0 < C; c0 += LANES) {
        vf s = {0}, d = {0};
        for (int64_t w = 0; w < W; w++) {
            const vf u = ldf(g + w * C + c0);
            s += u;
            d += u * ldf(p + w * C + c0);
        }
        for (int l = 0; l < LANES && c0 + l < C; l++) { sum[c0 + l] += s[l]; dot[c0 + l] += d[l]; }
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

/* The pooled gradient spread over one input row: g[w, c] = gp[w/2, c] where (row bit `rb`, w & 1) is the
 * window's max, else 0; 0 on an odd last column. ix and gp are padded scratch rows (chunks read past them). */
static inline void spread_row(const uint8_t *restrict ix, const float *restrict gp, int64_t W, int64_t C,
                              int32_t rb, float *restrict g) {
    const int64_t Wo = W / 2;
    const vf zero = {0};
    if (C % LANES == 0) {  /* whole chunks: both sides from one load */
        for (int64_t wo = 0; wo < Wo; wo++)
            for (int64_t c0 = 0; c0 < C; c0 += LANES) {
                const vi k = __builtin_convertvector(ldb(ix + wo * C + c0), vi);
                const vf p = ldf(gp + wo * C + c0);
                stf(g + 2 * wo * C + c0, pick(k == rb, p, zero));
                stf(g + (2 * wo + 1) * C + c0, pick(k == rb + 1, p, zero));
            }
    } else {
        for (int64_t wo = 0; wo < Wo; wo++)
            for (int32_t side = 0; side < 2; side++)  /* the left block's chunks, then the right's, which */
                for (int64_t c0 = 0; c0 < C; c0 += LANES) {  /* overwrite what the left ones spilt */
                    const vi k = __builtin_convertvector(ldb(ix + wo * C + c0), vi);
                    stf(g + (2 * wo + side) * C + c0, pick(k == rb + side, ldf(gp + wo * C + c0), zero));
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

/* pool_backward: the gradient of ReLU → batch norm → max-pool with respect to y, for every element of y:
 *   dy = 0 where not y > 0 (ReLU's mask, as torch's threshold_backward), else
 *   dy = k[c]·y + b[c] + (a[c]·g[n, h/2, w/2, c] where (h, w) is its window's max, else 0)
 * a, k and b carry batch norm's backward; g is the gradient of the block's output, (N, H/2, W/2, C). */
#define DEFINE_POOL_BACKWARD(NAME, T, LOAD, STORE)                                                       \
int NAME(const T *y, const uint8_t *idx, const T *g, const float *a, const float *k, const float *b,   \
          T *dy, int64_t N, int64_t H, int64_t W, int64_t C, int nthreads) {                             \
    const int64_t Ho = H / 2, WC = W * C, PC = (W / 2) * C;                                              \
    if (nthreads < 1) nthreads = 1;                                                                      \
    int failed = 0;                                                                                      \
    _Pragma("omp parallel num_threads(nthreads)")                                                        \
    {                                                                                                    \
        float *sp = scratch(WC), *gp = scratch(PC), *aa = scratch(PC), *kk = scratch(WC), *bb = scratch(WC); \
        uint8_t *kx = scratch_bytes(PC);                                                                 \
        SCRATCH_READY(sp && gp && aa && kk && bb && kx);                                                 \
        if (ok) {                                                                                        \
            spread_channels(a, PC, C, aa);                                                               \
            spread_channels(k, WC, C, kk);                                                               \
            spread_channels(b, WC, C, bb);                                                               \
        }                                                                                                \
        _Pragma("omp for schedule(static)")                                                              \
        for (int64_t row = 0; row < N * H; row++) {                                                      \
            if (!ok) continue;                                                                           \
            const int64_t n = row / H, h = row % H, ho = h / 2;                                          \
            if (ho < Ho) {                                                                               \
                const T *gs = g + (n * Ho + ho) * PC;                                                    \
                for (int64_t j = 0; j < PC; j++) gp[j] = LOAD(gs[j]) * aa[j];                            \
            }                                                                                            \
            spread_input_row(idx, gp, n, h, Ho, W, C, kx, sp);                                           \
            const T *p = y + row * WC;                                                                   \
            T *q = dy + row * WC;                                                                        \
            for (int64_t j = 0; j < WC; j++) {                                                           \
                const float v = LOAD(p[j]);                                                              \
                q[j] = STORE(v > 0.0f ? kk[j] * v + bb[j] + sp[j] : 0.0f);                               \
            }                                                                                            \
        }                                                                                                \
        free(sp); free(gp); free(aa); free(kk); free(bb); free(kx);                                      \
    }                                                                                                    \
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
    for (int64_t c = 0; c < C; c++) {
        float *restrict ac = acc + c * stride;
        vf a[8];
        for (int kh = 0; kh < KH; kh++) a[kh] = ldf(ac + kh * LANES);
        float bs = 0.0f;
        for (int64_t wo = 0; wo < Wo; wo++) {
            const int64_t j = wo * C + c;
            const float gv = gp[j];
            const float *p = x + (ks[j] >> 1) * WxCi + (2 * wo + (ks[j] & 1)) * Ci;
            for (int kh = 0; kh < KH; kh++) a[kh] += ldf(p + kh * WxCi) * gv;
            bs += gv;
        }
        for (int kh = 0; kh < KH; kh++) stf(ac + kh * LANES, a[kh]);
        ac[KH * LANES] += bs;
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

DEFINE_POOL_STATS(cnnlab_pool_stats_f32, float, f32_load, f32_store)
DEFINE_POOL_STATS(cnnlab_pool_stats_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_POOL_BACKWARD(cnnlab_pool_backward_f32, float, f32_load, f32_store)
DEFINE_POOL_BACKWARD(cnnlab_pool_backward_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_POOL_SCATTER(cnnlab_pool_scatter_f32, float, f32_load, f32_store)
DEFINE_POOL_SCATTER(cnnlab_pool_scatter_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_POOL_AFFINE(cnnlab_pool_affine_f32, float, f32_load, f32_store)
DEFINE_POOL_AFFINE(cnnlab_pool_affine_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_POOL_GRAD_SUMS(cnnlab_pool_grad_sums_f32, float, f32_load)
DEFINE_POOL_GRAD_SUMS(cnnlab_pool_grad_sums_bf16, uint16_t, bf16_load)
DEFINE_CONV_POOL_WGRAD(cnnlab_conv_pool_wgrad_f32, float, f32_load)
DEFINE_CONV_POOL_WGRAD(cnnlab_conv_pool_wgrad_bf16, uint16_t, bf16_load)

int cnnlab_native_version(void) { return 4; }
