/* The CPU backend's native kernels (hal.backends.cpu.native compiles them on first use; where it cannot, the
 * backend keeps its PyTorch paths).
 *
 * One source, compiled into a variant per instruction set by the -m flags alone (native.py picks the best the
 * CPU runs): AMX (tile unit), AVX-512 BF16, AVX-512 (F, BW, VL), AVX2 with FMA, and aarch64 NEON. The code is
 * GCC vector extensions over the variant's vector width (VL floats), plus intrinsics only where an instruction
 * set has something the extensions do not express (tiles, bf16 pair dot products, a test of any lane) or where
 * GCC expresses it poorly (widening bf16; the quantiser's masks, compares, selects and narrowing).
 *
 * Absorbed MLA decode: each sequence's query rows (up to 16: one per head) attend its latent keys, which are
 * also its values (their first Dv dims). Keys go in blocks of 32, read in place from the paged cache: the
 * logits S = K q with fp32 sums, an online softmax in fp32 with the heads in the 16 lanes of a vector, then
 * O += P V in fp32. The two products are the variant's: bf16 pairs with fp32 sums on the tile unit (AMX) or
 * with vdpbf16ps (AVX-512 BF16), the probabilities rounded to bf16 (as MLA_TOLERANCE admits); elsewhere the
 * block's keys converted to fp32 (exact) and multiplied with FMAs, the probabilities kept in fp32. A sequence
 * from SPLIT_FROM keys is attended in two halves whose fp32 partials are combined; the halves of all the
 * batch's sequences are shared out among PyTorch's OpenMP threads.
 *
 * FP8 quantisation of bf16 (quantize_fp8), bit for bit the reference in every variant: see quantize_rows.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__AVX512BF16__)
#define PAIRS 1  /* the products take bf16 pairs (tiles or vdpbf16ps); else fp32 FMAs */
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VL 16
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define VL 4
#else
#error "native.c is built for AVX-512, AVX2 with FMA, or aarch64 NEON"
#endif

/* VL lanes; the _u types load and store at any address */
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef float vf_u __attribute__((vector_size(4 * VL), aligned(4), may_alias));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));
typedef uint8_t vb __attribute__((vector_size(VL)));
typedef uint16_t vh_u __attribute__((vector_size(2 * VL), aligned(2), may_alias));
typedef uint8_t vb_u __attribute__((vector_size(VL), aligned(1), may_alias));
/* the 16 heads of a sequence, one lane each (two or four registers where VL < 16) */
typedef float hf __attribute__((vector_size(64)));
typedef int32_t hi __attribute__((vector_size(64)));
typedef float hf_u __attribute__((vector_size(64), aligned(4), may_alias));

#define INLINE static inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"  /* 16-lane vectors by value where VL < 16: only in inlined functions */

INLINE vf load(const float *p) { return *(const vf_u *)p; }
INLINE hf load_h(const float *p) { return *(const hf_u *)p; }
INLINE void store(float *p, vf v) { *(vf_u *)p = v; }
INLINE vu select_u(vi mask, vu a, vu b) { return (a & (vu)mask) | (b & ~(vu)mask); }   /* mask ? a : b */
INLINE hf select_h(hi mask, hf a, hf b) { return (hf)(((hi)a & mask) | ((hi)b & ~mask)); }
INLINE hf max_h(hf a, hf b) { return select_h(a > b, a, b); }  /* b where either is NaN, as maxps */

INLINE vf bf16_to_ps(const uint16_t *x) {  /* VL bf16 values to fp32 (exact; GCC widens in halves on x86) */
#if VL == 16
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16);
#elif VL == 8
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x)), 16);
#else
    return (vf)(__builtin_convertvector(*(const vh_u *)x, vu) << 16);
#endif
}

INLINE void store_bf16(uint16_t *out, vf x) {  /* VL fp32 values to bf16: to nearest, ties to even; NaN quiet */
    const vu bits = (vu)x;
    const vu rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    *(vh_u *)out = __builtin_convertvector(select_u((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, rounded),
                                           vh);
}

#define KEYS 32               /* keys a block */
#define HEADS 16              /* query rows a sequence, padded */
#define SPLIT_FROM 512        /* see middle() */

/* libgomp's entry points, resolved in PyTorch's OpenMP runtime (weak: null in a process without one). Work
 * handed to PyTorch's own worker threads runs at once, where a thread of our own would share a core with
 * one of them, which keeps spinning for a while after each parallel PyTorch call (measured: twice slower). */
extern void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags) __attribute__((weak));
extern int omp_get_thread_num(void) __attribute__((weak));
extern int omp_get_num_threads(void) __attribute__((weak));

/* fn(arg) on up to `threads` of PyTorch's OpenMP threads, or on this one; fn shares the work out by
 * omp_get_thread_num() / omp_get_num_threads() (through team(), which reads 0 of 1 when serial). */
static _Thread_local int serial;  /* set while run_parallel calls fn on this thread alone */

static void run_parallel(void (*fn)(void *), void *arg, int threads) {
    if (threads > 1 && GOMP_parallel && omp_get_thread_num && omp_get_num_threads) {
        GOMP_parallel(fn, arg, threads, 0);
    } else {  /* (the caller may itself be one of an OpenMP team's threads: fn must not see that team) */
        serial = 1;
        fn(arg);
        serial = 0;
    }
}

static void team(int *thread, int *threads) {
    *thread = serial || !omp_get_thread_num ? 0 : omp_get_thread_num();
    *threads = serial || !omp_get_num_threads ? 1 : omp_get_num_threads();
}

/* e^x in fp32 for the 16 heads: 2^n e^r with |r| <= ln2 / 2 (Cody-Waite), a degree-7 Taylor polynomial
 * (truncation below 1e-8 relative), 0 below -87 (e^-87 < 2^-125: -inf, a masked key, gives 0). */
INLINE hf exp_h(hf x) {
    const hi tiny = x < -87.0f;
    const hf t = x * 1.44269504088896341f + 12582912.0f;  /* 1.5 * 2^23 + n: n rounded to nearest */
    const hf n = t - 12582912.0f;
    hf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    static const float inverse_factorial[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                                              1.0f / 6,    0.5f,        1.0f,        1.0f};
    hf p = r * inverse_factorial[0] + inverse_factorial[1];
    for (int i = 2; i < 8; i++) p = p * r + inverse_factorial[i];
    const hi two_n = ((hi)t - 0x4B400000 + 127) << 23;
    return (hf)((hi)(p * (hf)two_n) & ~tiny);  /* (a NaN stays NaN) */
}

typedef struct {
    const uint16_t *cache;
    const int32_t *block_ids;
    int dim, dim_v, block_size, begin, end;  /* keys [begin, end) */
    float scale;
    float *out;            /* [16][dim_v] fp32, unnormalised */
    float *buffer;         /* per thread: see buffer_size() */
    float max[16] __attribute__((aligned(64))), sum[16] __attribute__((aligned(64)));
} sequence;

/* Per variant, a thread's buffer (floats) holds q as the products take it, then a block's rows copied where
 * they cannot be read in place (32 x dim bf16), then the variant's own: PAIRS, the values in pairs of keys
 * (dim_v / 16 x 16 pairs x 16 dims x 2 bf16); else the block's keys in fp32. */
#ifdef PAIRS
static long q_size(int dim) { return 8L * dim; }                 /* [dim / 2 pairs][16 heads][2] bf16 */
static long own_size(int dim, int dim_v) { (void)dim; return 16L * dim_v; }
#else
static long q_size(int dim) { return 16L * dim; }                /* [dim][16 heads] fp32 */
static long own_size(int dim, int dim_v) { (void)dim_v; return 32L * dim; }
#endif
static long buffer_size(int dim, int dim_v) { return q_size(dim) + 16L * dim + own_size(dim, dim_v); }

INLINE const uint16_t *scratch_rows(const sequence *sq) { return (const uint16_t *)(sq->buffer + q_size(sq->dim)); }
INLINE float *own(const sequence *sq) { return sq->buffer + q_size(sq->dim) + 16L * sq->dim; }

/* q [heads][dim] bf16 into the buffer, as the products take it (zero past the last head) */
static void pack_q(const sequence *sq, const uint16_t *q, int heads) {
    const int dim = sq->dim;
#ifdef PAIRS
    uint32_t *packed = (uint32_t *)sq->buffer;
    for (int w = 0; w < dim / 2; w++)
        for (int h = 0; h < HEADS; h++) {
            uint32_t pair = 0;
            if (h < heads) memcpy(&pair, q + (long)h * dim + 2 * w, 4);
            packed[HEADS * w + h] = pair;
        }
#else
    float *packed = sq->buffer;
    for (int d = 0; d < dim; d++)
        for (int h = 0; h < HEADS; h++) {
            uint32_t bits = h < heads ? (uint32_t)q[(long)h * dim + d] << 16 : 0;
            memcpy(packed + HEADS * d + h, &bits, 4);
        }
#endif
}

#ifdef PAIRS
/* The values (the keys' first dim_v dims) in pairs of keys: [dim_v / 16][16 key pairs][16 dims][2] */
static void pair_values(const sequence *sq, const uint16_t *rows) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                          55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    uint16_t *v_pairs = (uint16_t *)own(sq);
    for (int i = 0; i < KEYS / 2; i++) {
        const uint16_t *a = rows + (2L * i) * sq->dim, *b = a + sq->dim;
        for (int n = 0; n < sq->dim_v; n += 32) {
            __m512i va = _mm512_loadu_si512(a + n), vb = _mm512_loadu_si512(b + n);
            uint16_t *pair = v_pairs + (n / 16) * 512 + 32 * i;  /* dims n..n+15, then n+16..n+31 */
            _mm512_store_si512((__m512i *)pair, _mm512_permutex2var_epi16(va, low, vb));
            _mm512_store_si512((__m512i *)(pair + 512), _mm512_permutex2var_epi16(va, high, vb));
        }
    }
}

/* probs[head][key] in bf16 from p[key][head] (each head's column) */
static void pair_probs(const float *p, uint16_t *probs) {
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    for (int h = 0; h < HEADS; h++) {
        __m512 first = _mm512_i32gather_ps(column, p + h, 4);
        __m512 second = _mm512_i32gather_ps(column, p + 256 + h, 4);
        _mm512_store_si512((__m512i *)(probs + KEYS * h), (__m512i)_mm512_cvtne2ps_pbh(second, first));
    }
}
#endif

#ifdef AMX
/* Linux grants the tile registers to a process that asks (the kernel keeps their state per thread). */
int hal_amx_request(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

static void begin_products(void) {  /* all 8 tiles 16 rows x 64 bytes: 16 x 16 fp32 or 16 x 32 bf16 */
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.bytes_per_row[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

static void end_products(void) { _tile_release(); }

/* logits[key][head] = K q: tiles 0, 1 accumulate keys 0-15 and 16-31 over 32 dims a step */
static void key_logits(const sequence *sq, const uint16_t *rows, float *logits) {
    const int dim = sq->dim;
    const uint16_t *q_packed = (const uint16_t *)sq->buffer;
    _tile_zero(0);
    _tile_zero(1);
    for (int c = 0; c < dim / 32; c++) {
        _tile_loadd(2, rows + c * 32, 2 * dim);
        _tile_loadd(3, rows + 16L * dim + c * 32, 2 * dim);
        _tile_loadd(4, q_packed + c * 512, 64);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, logits, 64);
    _tile_stored(1, logits + 256, 64);
}

/* out += probs . values, 16 dims a tile */
static void add_values(const sequence *sq, const uint16_t *rows, const float *p) {
    uint16_t probs[16 * KEYS] __attribute__((aligned(64)));  /* [16 heads][32 keys] */
    const uint16_t *v_pairs = (const uint16_t *)own(sq);
    pair_probs(p, probs);
    pair_values(sq, rows);
    _tile_loadd(5, probs, 64);
    for (int n = 0; n < sq->dim_v / 16; n++) {
        _tile_loadd(0, sq->out + 16 * n, 4 * sq->dim_v);
        _tile_loadd(6, v_pairs + n * 512, 64);
        _tile_dpbf16ps(0, 5, 6);
        _tile_stored(0, sq->out + 16 * n, 4 * sq->dim_v);
    }
}
#else
static void begin_products(void) {}
static void end_products(void) {}

#ifdef PAIRS
/* C[16][16] += sum over k < pairs of A[m][2k, 2k + 1] . B[k][n][0, 1] (bf16 pairs, fp32 sums), what the tile
 * unit's dot product does: C rows at c + m * ldc, A rows at a + m * lda, B [pairs][16][2] */
INLINE void dot_pairs(float *c, long ldc, const uint16_t *a, long lda, const uint16_t *b, int pairs) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int m = 0; m < 16; m++) acc[m] = _mm512_loadu_ps(c + m * ldc);
    for (int k = 0; k < pairs; k++) {
        const __m512bh bk = (__m512bh)_mm512_loadu_si512(b + 32 * k);
#pragma GCC unroll 16
        for (int m = 0; m < 16; m++) {
            int32_t pair;
            memcpy(&pair, a + m * lda + 2 * k, 4);
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(pair), bk);
        }
    }
#pragma GCC unroll 16
    for (int m = 0; m < 16; m++) _mm512_storeu_ps(c + m * ldc, acc[m]);
}

static void key_logits(const sequence *sq, const uint16_t *rows, float *logits) {
    memset(logits, 0, sizeof(float) * KEYS * HEADS);
    for (int half = 0; half < 2; half++)
        dot_pairs(logits + 256 * half, 16, rows + 16L * half * sq->dim, sq->dim, (const uint16_t *)sq->buffer,
                  sq->dim / 2);
}

static void add_values(const sequence *sq, const uint16_t *rows, const float *p) {
    uint16_t probs[16 * KEYS] __attribute__((aligned(64)));  /* [16 heads][32 keys] */
    const uint16_t *v_pairs = (const uint16_t *)own(sq);
    pair_probs(p, probs);
    pair_values(sq, rows);
    for (int n = 0; n < sq->dim_v / 16; n++) dot_pairs(sq->out + 16 * n, sq->dim_v, probs, KEYS, v_pairs + n * 512, 16);
}
#else
#define NV (16 / VL)  /* vectors a row of 16 */

/* C[m][0..15] += sum over k < depth of A[m][k] B[k][0..15] in fp32 for m < rows (a constant where inlined, so
 * that the rows * NV accumulators stay in registers): A[m][k] at a + m * a_row + k * a_col, B[k] at b + k * ldb,
 * C rows at c + m * ldc */
INLINE void fma_pass(float *c, long ldc, const float *a, long a_row, long a_col, const float *b, long ldb, int depth,
                     int rows) {
    vf acc[16][NV];
#pragma GCC unroll 16
    for (int m = 0; m < rows; m++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) acc[m][j] = load(c + m * ldc + j * VL);
    for (int k = 0; k < depth; k++) {
        vf bk[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) bk[j] = load(b + k * ldb + j * VL);
#pragma GCC unroll 16
        for (int m = 0; m < rows; m++) {
            const float x = a[m * a_row + k * a_col];
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[m][j] += x * bk[j];
        }
    }
#pragma GCC unroll 16
    for (int m = 0; m < rows; m++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) store(c + m * ldc + j * VL, acc[m][j]);
}

/* fma_pass over rows 0..15, in passes whose accumulators fit the registers (32 zmm, 16 ymm, 32 q) */
INLINE void fma_rows(float *c, long ldc, const float *a, long a_row, long a_col, const float *b, long ldb, int depth) {
#if VL == 8  /* 12, 10 and 10 accumulators: more than the 8 FMAs in flight that hide their latency */
    fma_pass(c, ldc, a, a_row, a_col, b, ldb, depth, 6);
    fma_pass(c + 6 * ldc, ldc, a + 6 * a_row, a_row, a_col, b, ldb, depth, 5);
    fma_pass(c + 11 * ldc, ldc, a + 11 * a_row, a_row, a_col, b, ldb, depth, 5);
#else
    for (int m0 = 0; m0 < 16; m0 += 16 / NV)
        fma_pass(c + m0 * ldc, ldc, a + m0 * a_row, a_row, a_col, b, ldb, depth, 16 / NV);
#endif
}

/* the block's keys in fp32 (kept for add_values), then logits[key][head] = K q */
static void key_logits(const sequence *sq, const uint16_t *rows, float *logits) {
    const int dim = sq->dim;
    float *keys = own(sq);
    for (long i = 0; i < (long)KEYS * dim; i += VL) store(keys + i, bf16_to_ps(rows + i));
    memset(logits, 0, sizeof(float) * KEYS * HEADS);
    for (int half = 0; half < 2; half++) fma_rows(logits + 256 * half, 16, keys + 16L * half * dim, dim, 1,
                                                  sq->buffer, 16, dim);
}

/* out[head] += sum over keys of p[key][head] values[key] */
static void add_values(const sequence *sq, const uint16_t *rows, const float *p) {
    (void)rows;
    for (int n = 0; n < sq->dim_v; n += 16) fma_rows(sq->out + n, sq->dim_v, p, 1, 16, own(sq) + n, sq->dim, KEYS);
}
#endif
#endif

/* Keys [begin, end) of a sequence into sq->out / max / sum. */
static void attend(sequence *sq) {
    const int dim = sq->dim, dim_v = sq->dim_v, bs = sq->block_size;
    uint16_t *scratch = (uint16_t *)scratch_rows(sq);
    float logits[KEYS * 16] __attribute__((aligned(64)));  /* [32 keys][16 heads]: the logits, then e^(s - m) */
    hf m = (hf){} - INFINITY, l = (hf){};
    memset(sq->out, 0, sizeof(float) * 16 * dim_v);
    begin_products();
    for (int kb = sq->begin; kb < sq->end; kb += KEYS) {
        /* the block's rows: in place when 32 consecutive slots of one page, else copied (zeros past the end) */
        const uint16_t *rows;
        int slot = kb % bs;
        if (kb + KEYS <= sq->end && slot + KEYS <= bs) {
            rows = sq->cache + ((long)sq->block_ids[kb / bs] * bs + slot) * dim;
        } else {
            for (int r = 0; r < KEYS; r++) {
                int key = kb + r;
                if (key < sq->end)
                    memcpy(scratch + (long)r * dim,
                           sq->cache + ((long)sq->block_ids[key / bs] * bs + key % bs) * dim, 2 * (size_t)dim);
                else
                    memset(scratch + (long)r * dim, 0, 2 * (size_t)dim);
            }
            rows = scratch;
        }
        key_logits(sq, rows, logits);
        /* online softmax */
        hf s[KEYS], block_max = (hf){} - INFINITY;
        for (int r = 0; r < KEYS; r++) {
            s[r] = kb + r < sq->end ? load_h(logits + 16 * r) * sq->scale : (hf){} - INFINITY;
            block_max = max_h(block_max, s[r]);
        }
        const hf m_new = max_h(m, block_max), alpha = exp_h(m - m_new);
        hf total = (hf){};
        for (int r = 0; r < KEYS; r++) {
            const hf p = exp_h(s[r] - m_new);
            total += p;
            *(hf_u *)(logits + 16 * r) = p;
        }
        l = l * alpha + total;
        int rescale = 0;
        for (int h = 0; h < HEADS; h++) rescale |= alpha[h] != 1.0f;  /* (true for NaN) */
        if (kb > sq->begin && rescale)
            for (int h = 0; h < HEADS; h++)
                for (int n = 0; n < dim_v; n += VL) {
                    float *o = sq->out + h * dim_v + n;
                    store(o, load(o) * alpha[h]);
                }
        m = m_new;
        add_values(sq, rows, logits);
    }
    end_products();
    *(hf_u *)sq->max = m;
    *(hf_u *)sq->sum = l;
}

typedef struct {
    const uint16_t *q, *cache;
    const int32_t *block_table, *lengths;
    long table_stride;
    int heads, dim, dim_v, block_size, count;
    float scale;
    const int *items;          /* the non-empty halves: 2 b for sequence b's first, 2 b + 1 for its second */
    float *partials, *buffers; /* per half: [16][dim_v] accumulators, max[16], sum[16]; per thread: a buffer */
} step;

static long partial_size(int dim_v) { return 16L * dim_v + 32; }

/* Where sequence b's second half starts: sequences from SPLIT_FROM keys are attended in two halves (always,
 * so that a sequence comes out the same alone or in any batch, on any number of threads). */
static int middle(int length) { return length >= SPLIT_FROM ? (length / 2 + KEYS - 1) / KEYS * KEYS : length; }

/* How many halves a sequence of this length is attended in (0 when empty). */
static int halves(int length) { return length <= 0 ? 0 : middle(length) < length ? 2 : 1; }

static void attend_half(const step *st, int item, float *buffer) {
    const int b = item / 2, length = st->lengths[b], mid = middle(length);
    float *partial = st->partials + item * partial_size(st->dim_v);
    sequence sq = {.cache = st->cache, .block_ids = st->block_table + b * st->table_stride, .dim = st->dim,
                   .dim_v = st->dim_v, .block_size = st->block_size, .begin = item % 2 ? mid : 0,
                   .end = item % 2 ? length : mid, .scale = st->scale, .out = partial, .buffer = buffer};
    pack_q(&sq, st->q + (long)b * st->heads * st->dim, st->heads);
    attend(&sq);
    memcpy(partial + 16L * st->dim_v, sq.max, sizeof sq.max);
    memcpy(partial + 16L * st->dim_v + 16, sq.sum, sizeof sq.sum);
}

static void attend_halves(void *arg) {  /* thread t of T takes halves t, t + T, ... */
    const step *st = arg;
    int t, threads;
    team(&t, &threads);
    for (int i = t; i < st->count; i += threads)
        attend_half(st, st->items[i], st->buffers + t * buffer_size(st->dim, st->dim_v));
}

/* A decode step: q [batch][heads][dim] bf16 (heads <= 16, dim % 32 == 0); cache [blocks][block_size][dim] bf16,
 * contiguous; sequence b's blocks at block_table + b * table_stride, its length lengths[b] >= 0;
 * dim_v % 32 == 0, dim_v <= dim. out [batch][heads][dim_v] bf16 (zeros for an empty sequence), lse
 * [batch][heads] fp32 (natural log; -inf for an empty sequence); workspace (hal_mla_decode_workspace
 * floats, 64-byte aligned) for up to `threads` threads. */
long hal_mla_decode_workspace(int batch, int dim, int dim_v, int threads) {
    return 2L * batch * partial_size(dim_v) + threads * buffer_size(dim, dim_v) + 2L * batch;
}

void hal_mla_decode(const uint16_t *q, int batch, int heads, int dim, int dim_v, const uint16_t *cache,
                    int block_size, const int32_t *block_table, long table_stride, const int32_t *lengths,
                    float scale, uint16_t *out, float *lse, float *workspace, int threads) {
    float *partials = workspace, *buffers = partials + 2L * batch * partial_size(dim_v);
    int *items = (int *)(buffers + threads * buffer_size(dim, dim_v)), count = 0;
    for (int b = 0; b < batch; b++) {
        for (int half = 0; half < halves(lengths[b]); half++) items[count++] = 2 * b + half;
    }
    step st = {q, cache, block_table, lengths, table_stride, heads, dim, dim_v, block_size, count, scale, items,
               partials, buffers};
    run_parallel(attend_halves, &st, threads < count ? threads : count);
    /* each sequence: its halves combined as split-KV kernels do (FlashMLA), out = sum_i O_i e^(m_i - m) /
     * sum_i l_i e^(m_i - m), in fp32 */
    for (int b = 0; b < batch; b++) {
        uint16_t *ob = out + (long)b * heads * dim_v;
        float *lb = lse + (long)b * heads;
        const int parts = halves(lengths[b]);
        const float *first = partials + 2L * b * partial_size(dim_v), *second = first + partial_size(dim_v);
        for (int h = 0; h < heads; h++) {
            if (!parts) {
                memset(ob + (long)h * dim_v, 0, sizeof(uint16_t) * dim_v);
                lb[h] = -INFINITY;
                continue;
            }
            float m1 = first[16 * dim_v + h], l1 = first[16 * dim_v + 16 + h];
            float mx = m1, w1 = 1.0f, w2 = 0.0f, total = l1;
            if (parts == 2) {
                float m2 = second[16 * dim_v + h], l2 = second[16 * dim_v + 16 + h];
                mx = fmaxf(m1, m2);
                w1 = expf(m1 - mx);
                w2 = expf(m2 - mx);
                total = l1 * w1 + l2 * w2;
            }
            for (int n = 0; n < dim_v; n += VL) {
                vf o = load(first + h * dim_v + n) * w1;
                if (parts == 2) o += load(second + h * dim_v + n) * w2;
                store_bf16(ob + (long)h * dim_v + n, o / total);
            }
            lb[h] = mx + logf(total);
        }
    }
}

/* ---------------------------------------------------------------------------------------- quantize_fp8 */

/* Per group: s = max(amax, 1e-4) / 448 (an fp32 division; UE8M0: rounded up to a power of two on the bits),
 * q = e4m3(clamp(x / s)), rounded to nearest, ties to even, on the bits. The quotients are x * (1 / s), exact
 * for a power of two, and otherwise recomputed with the division for a group where one lies within a few fp32
 * ulps of a midpoint between two e4m3 values (where the two quotients may round differently): the same bits as
 * the reference's division everywhere. Codes: normal range (|y| >= 2^-6), 3 mantissa bits kept; below,
 * multiples of 2^-9, rounded by adding 2^23 to 512 |y| (done only in a group with such a quotient: its
 * smallest |x| tells); |y| clamped to 448; NaN gives 0x7F with its sign (only where the group's amax is not
 * finite: x * (1 / s) of a finite group is finite). */
#define E4M3_MAX_BITS 0x43E00000  /* 448 */
#define E4M3_NORMAL_BITS 0x3C800000  /* 2^-6 */

/* The quantiser's primitives per instruction set: `lanes`, a mask of VL lanes (a k-mask on AVX-512, else a
 * vector); compares of values below 2^31 (so signed compares serve on AVX2, which has no unsigned ones);
 * select; unsigned min; truncation; the codes narrowed to bytes; and the group's largest and smallest |x|,
 * as fp32 bits, on the bf16 bits. One algorithm (store_e4m3 and the loops below) is built on them. */
#if defined(__AVX2__)
/* 16 lanes of |x| bits, largest and smallest, to the two values (minpos finds the minimum of 8 lanes) */
INLINE void reduce_range(__m256i hi, __m256i lo, uint32_t *top, uint32_t *bottom) {
    const __m128i h = _mm_max_epu16(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    const __m128i l = _mm_min_epu16(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
    *top = (0xFFFFu - (uint32_t)_mm_extract_epi16(_mm_minpos_epu16(_mm_xor_si128(h, _mm_set1_epi16(-1))), 0)) << 16;
    *bottom = (uint32_t)_mm_extract_epi16(_mm_minpos_epu16(l), 0) << 16;
}
#endif

#if VL == 16
typedef __mmask16 lanes;
#define I(v) ((__m512i)(v))
INLINE lanes less(vu a, vu b) { return _mm512_cmplt_epu32_mask(I(a), I(b)); }
INLINE lanes at_most_ps(vf a, vf b) { return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_LE_OQ); }
INLINE vu pick(lanes m, vu a, vu b) { return (vu)_mm512_mask_mov_epi32(I(b), m, I(a)); }  /* m ? a : b */
INLINE vu min_u(vu a, vu b) { return (vu)_mm512_min_epu32(I(a), I(b)); }
INLINE vf trunc_ps(vf x) { return (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
INLINE int any(lanes m) { return m != 0; }
INLINE void store_codes(uint8_t *q, vu code) { _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(I(code))); }

INLINE void group_range(const uint16_t *x, int group, uint32_t *top, uint32_t *bottom) {  /* 32 a vector */
    __m512i hi = _mm512_setzero_si512(), lo = _mm512_set1_epi16(-1);
    for (int i = 0; i < group; i += 32) {
        const __mmask32 live = group - i >= 32 ? ~0u : 0xFFFFu;
        const __m512i v = _mm512_and_si512(_mm512_maskz_loadu_epi16(live, x + i), _mm512_set1_epi16(0x7FFF));
        hi = _mm512_max_epu16(hi, v);
        lo = _mm512_mask_min_epu16(lo, live, lo, v);
    }
    reduce_range(_mm256_max_epu16(_mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1)),
                 _mm256_min_epu16(_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1)), top, bottom);
}
#elif VL == 8
typedef vi lanes;
#define I(v) ((__m256i)(v))
INLINE lanes less(vu a, vu b) { return (vi)_mm256_cmpgt_epi32(I(b), I(a)); }
INLINE lanes at_most_ps(vf a, vf b) { return (vi)_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_LE_OQ); }
INLINE vu pick(lanes m, vu a, vu b) { return (vu)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)m); }
INLINE vu min_u(vu a, vu b) { return (vu)_mm256_min_epu32(I(a), I(b)); }
INLINE vf trunc_ps(vf x) { return (vf)_mm256_round_ps((__m256)x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
INLINE int any(lanes m) { return !_mm256_testz_si256(I(m), I(m)); }
INLINE void store_codes(uint8_t *q, vu code) {  /* each 32-bit lane's low byte, lanes 0-3 then 4-7 */
    const __m256i low_bytes = _mm256_shuffle_epi8(I(code), _mm256_set1_epi32(0x0C080400));
    const __m256i gathered = _mm256_permutevar8x32_epi32(low_bytes, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
    _mm_storel_epi64((__m128i *)q, _mm256_castsi256_si128(gathered));
}

INLINE void group_range(const uint16_t *x, int group, uint32_t *top, uint32_t *bottom) {  /* 16 a vector */
    __m256i hi = _mm256_setzero_si256(), lo = _mm256_set1_epi16(-1);
    for (int i = 0; i < group; i += 16) {
        const __m256i v = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), _mm256_set1_epi16(0x7FFF));
        hi = _mm256_max_epu16(hi, v);
        lo = _mm256_min_epu16(lo, v);
    }
    reduce_range(hi, lo, top, bottom);
}
#else
typedef vi lanes;
INLINE lanes less(vu a, vu b) { return a < b; }
INLINE lanes at_most_ps(vf a, vf b) { return a <= b; }
INLINE vu pick(lanes m, vu a, vu b) { return select_u(m, a, b); }
INLINE vu min_u(vu a, vu b) { return (vu)vminq_u32((uint32x4_t)a, (uint32x4_t)b); }
INLINE vf trunc_ps(vf x) { return (vf)vrndq_f32((float32x4_t)x); }
INLINE int any(lanes m) { return vmaxvq_u32((uint32x4_t)m) != 0; }
INLINE void store_codes(uint8_t *q, vu code) { *(vb_u *)q = __builtin_convertvector(code, vb); }

INLINE void group_range(const uint16_t *x, int group, uint32_t *top, uint32_t *bottom) {  /* 8 a vector */
    uint16x8_t hi = vdupq_n_u16(0), lo = vdupq_n_u16(0xFFFF);
    for (int i = 0; i < group; i += 8) {
        const uint16x8_t v = vandq_u16(vld1q_u16(x + i), vdupq_n_u16(0x7FFF));
        hi = vmaxq_u16(hi, v);
        lo = vminq_u16(lo, v);
    }
    *top = (uint32_t)vmaxvq_u16(hi) << 16;
    *bottom = (uint32_t)vminvq_u16(lo) << 16;
}
#endif

/* codes of VL quotients y into q; lanes near a midpoint into *near (when `ties`) */
INLINE void store_e4m3(uint8_t *q, vf y, int small, int nan, int ties, lanes *near) {
    const vu bits = (vu)y, a = bits & 0x7FFFFFFF;
    const vu clamped = min_u(a, (vu){} + E4M3_MAX_BITS);
    vu code = (clamped + (0x7FFFF - (960 << 20)) + ((clamped >> 20) & 1)) >> 20;  /* (the exponent bias, rebased) */
    if (ties)  /* the bits rounding drops lie near 0x80000 (conservative for the small lanes, checked below) */
        *near |= less((a - 0x7FFF0) & 0xFFFFF, (vu){} + 33);
    if (small) {
        const lanes below = less(a, (vu){} + E4M3_NORMAL_BITS);
        const vf t = (vf)a * 512.0f;
        code = pick(below, (vu)(t + 8388608.0f) - 0x4B000000, code);
        if (ties)
            *near |= below & at_most_ps((vf)((vu)(t - trunc_ps(t) - 0.5f) & 0x7FFFFFFF), (vf){} + 1.0f / 65536);
    }
    if (nan) code = pick(less((vu){} + 0x7F800000, a), (vu){} + 0x7F, code);
    store_codes(q, code | ((bits >> 24) & 0x80));
}

/* The group's codes by the reciprocal; whether a quotient lies near a midpoint (when `ties`) */
INLINE int codes_by_reciprocal(const uint16_t *x, uint8_t *q, int group, float reciprocal, int small, int ties) {
    lanes near = {0};
    for (int i = 0; i < group; i += VL) store_e4m3(q + i, bf16_to_ps(x + i) * reciprocal, small, 0, ties, &near);
    return any(near);
}

static void codes_by_division(const uint16_t *x, uint8_t *q, int group, float s) {
    lanes unused = {0};
    for (int i = 0; i < group; i += VL) store_e4m3(q + i, bf16_to_ps(x + i) / s, 1, 1, 0, &unused);
}

typedef struct {
    const uint16_t *x;
    uint8_t *q;
    float *s;
    long rows, k;
    int group, ue8m0;
} fp8_job;

static float bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#define GROUPS_A_PASS 64

static void quantize_rows(void *arg) {  /* the rows of one thread */
    const fp8_job *job = arg;
    int t, threads;
    team(&t, &threads);
    const long first = job->rows * t / threads, last = job->rows * (t + 1) / threads, per_row = job->k / job->group;
    const int group = job->group;
    /* groups in passes: first the scales, then the codes (no group waits on its divisions before its codes) */
    for (long g0 = first * per_row; g0 < last * per_row; g0 += GROUPS_A_PASS) {
        const int count = last * per_row - g0 < GROUPS_A_PASS ? (int)(last * per_row - g0) : GROUPS_A_PASS;
        float reciprocal[GROUPS_A_PASS];
        uint8_t mode[GROUPS_A_PASS];  /* 0: by the division; else 1 + (a quotient below 2^-6) */
        for (int i = 0; i < count; i++) {
            uint32_t bits, bottom;
            group_range(job->x + (g0 + i) * group, group, &bits, &bottom);
            float amax = bits_to_float(bits);
            if (bits <= 0x7F800000u && amax < 1e-4f) amax = 1e-4f;
            float s = amax / 448.0f;
            if (job->ue8m0) {
                uint32_t sb;
                memcpy(&sb, &s, 4);
                if (s > 0 && sb < 0x7F800000u) s = bits_to_float(((sb >> 23) + ((sb & 0x7FFFFF) != 0)) << 23);
            }
            job->s[g0 + i] = s;
            reciprocal[i] = 1.0f / s;
            /* (a quotient below 2^-6 only where the smallest |x| gives one: the product is monotonic) */
            mode[i] = bits >= 0x7F800000u ? 0 : 1 + (bits_to_float(bottom) * reciprocal[i] < 1.0f / 64);
        }
        for (int i = 0; i < count; i++) {
            const uint16_t *x = job->x + (g0 + i) * group;
            uint8_t *q = job->q + (g0 + i) * group;
            const float r = reciprocal[i];
            int ties = 0;  /* (constant flags: each case its own loop) */
            if (mode[i] == 0)
                ties = 1;
            else if (job->ue8m0)
                mode[i] == 2 ? codes_by_reciprocal(x, q, group, r, 1, 0) : codes_by_reciprocal(x, q, group, r, 0, 0);
            else
                ties = mode[i] == 2 ? codes_by_reciprocal(x, q, group, r, 1, 1)
                                    : codes_by_reciprocal(x, q, group, r, 0, 1);
            if (ties) codes_by_division(x, q, group, job->s[g0 + i]);
        }
    }
}

/* x [rows][k] bf16, contiguous, k % group == 0, group % 16 == 0 -> q [rows][k] e4m3fn, s [rows][k / group]. */
void hal_quantize_fp8_bf16(const uint16_t *x, long rows, long k, int group, int ue8m0, uint8_t *q, float *s,
                           int threads) {
    fp8_job job = {x, q, s, rows, k, group, ue8m0};
    run_parallel(quantize_rows, &job, rows < threads ? (int)(rows > 0 ? rows : 1) : threads);
}
