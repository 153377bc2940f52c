/* The CPU backend's native kernels (hal.backends.cpu.native compiles them on first use; where it cannot, the
 * backend keeps its PyTorch paths).
 *
 * Absorbed MLA decode on Intel AMX: each sequence's query rows (up to 16: one per head) attend its latent
 * keys, which are also its values (their first Dv dims). Keys go in blocks of 32, read in place from the
 * paged cache: the logits S = K q (bf16 products accumulated in fp32 by the tile unit), an online softmax in
 * fp32 with the heads in the 16 lanes of a vector, the probabilities rounded to bf16 (as MLA_TOLERANCE
 * admits), then O += P V in fp32. A sequence from SPLIT_FROM keys is attended in two halves whose fp32
 * partials are combined; the halves of all the batch's sequences are shared out among PyTorch's OpenMP
 * threads.
 *
 * FP8 quantisation of bf16 (quantize_fp8), bit for bit the reference: see quantize_rows.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KEYS 32               /* keys a block */
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

/* Linux grants the tile registers to a process that asks (the kernel keeps their state per thread). */
int hal_amx_request(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

static void configure_tiles(void) {  /* all 8 tiles 16 rows x 64 bytes: 16 x 16 fp32 or 16 x 32 bf16 */
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.bytes_per_row[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* e^x in fp32: 2^n e^r with |r| <= ln2 / 2 (Cody-Waite), a degree-7 Taylor polynomial (truncation below
 * 1e-8 relative), 0 below -150 (so that -inf, a masked key, gives 0). */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);  /* x second: a NaN stays NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    static const float inverse_factorial[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                                              1.0f / 6,    0.5f,        1.0f,        1.0f};
    __m512 p = _mm512_set1_ps(inverse_factorial[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(inverse_factorial[i]));
    return _mm512_scalef_ps(p, n);
}

typedef struct {
    const uint16_t *q_packed, *cache;  /* q: [D/32][16 dim pairs][16 heads][2] bf16 */
    const int32_t *block_ids;
    int dim, dim_v, block_size, begin, end;  /* keys [begin, end) */
    float scale;
    float *out;                        /* [16][dim_v] fp32, unnormalised */
    uint16_t *scratch, *v_pairs;       /* [32][dim] and [dim_v/16][16 key pairs][16 dims][2] bf16 */
    float max[16] __attribute__((aligned(64))), sum[16] __attribute__((aligned(64)));
} sequence;

/* Keys [begin, end) of a sequence into sq->out / max / sum. */
static void attend(sequence *sq) {
    const int dim = sq->dim, dim_v = sq->dim_v, bs = sq->block_size;
    uint16_t *scratch = sq->scratch, *v_pairs = sq->v_pairs;
    float logits[KEYS * 16] __attribute__((aligned(64)));
    uint16_t probs[16 * KEYS] __attribute__((aligned(64)));         /* [16 heads][32 keys] */
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                          55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
    memset(sq->out, 0, sizeof(float) * 16 * dim_v);
    configure_tiles();
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
        /* logits[key][head] = K q: tiles 0, 1 accumulate keys 0-15 and 16-31 over 32 dims a step */
        _tile_zero(0);
        _tile_zero(1);
        for (int c = 0; c < dim / 32; c++) {
            _tile_loadd(2, rows + c * 32, 2 * dim);
            _tile_loadd(3, rows + 16L * dim + c * 32, 2 * dim);
            _tile_loadd(4, sq->q_packed + c * 512, 64);
            _tile_dpbf16ps(0, 2, 4);
            _tile_dpbf16ps(1, 3, 4);
        }
        _tile_stored(0, logits, 64);
        _tile_stored(1, logits + 256, 64);
        /* online softmax */
        __m512 s[KEYS], block_max = _mm512_set1_ps(-INFINITY);
        for (int r = 0; r < KEYS; r++) {
            s[r] = kb + r < sq->end ? _mm512_mul_ps(_mm512_load_ps(logits + 16 * r), _mm512_set1_ps(sq->scale))
                                    : _mm512_set1_ps(-INFINITY);
            block_max = _mm512_max_ps(block_max, s[r]);
        }
        __m512 m_new = _mm512_max_ps(m, block_max), alpha = exp_ps(_mm512_sub_ps(m, m_new));
        __m512 total = _mm512_setzero_ps();
        for (int r = 0; r < KEYS; r++) {
            __m512 p = exp_ps(_mm512_sub_ps(s[r], m_new));
            total = _mm512_add_ps(total, p);
            _mm512_store_ps(logits + 16 * r, p);
        }
        l = _mm512_fmadd_ps(l, alpha, total);
        if (kb > sq->begin && _mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ)) {
            float a[16] __attribute__((aligned(64)));
            _mm512_store_ps(a, alpha);
            for (int h = 0; h < 16; h++)
                for (int n = 0; n < dim_v; n += 16) {
                    float *o = sq->out + h * dim_v + n;
                    _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), _mm512_set1_ps(a[h])));
                }
        }
        m = m_new;
        /* probs[head][key] in bf16 (each head's column of logits), then the values in pairs of keys */
        for (int h = 0; h < 16; h++) {
            __m512 first = _mm512_i32gather_ps(column, logits + h, 4);
            __m512 second = _mm512_i32gather_ps(column, logits + 256 + h, 4);
            _mm512_store_si512((__m512i *)(probs + KEYS * h), (__m512i)_mm512_cvtne2ps_pbh(second, first));
        }
        for (int i = 0; i < KEYS / 2; i++) {
            const uint16_t *a = rows + (2L * i) * dim, *b = a + dim;
            for (int n = 0; n < dim_v; n += 32) {
                __m512i va = _mm512_loadu_si512(a + n), vb = _mm512_loadu_si512(b + n);
                uint16_t *pair = v_pairs + (n / 16) * 512 + 32 * i;  /* dims n..n+15, then n+16..n+31 */
                _mm512_store_si512((__m512i *)pair, _mm512_permutex2var_epi16(va, low, vb));
                _mm512_store_si512((__m512i *)(pair + 512), _mm512_permutex2var_epi16(va, high, vb));
            }
        }
        /* out += probs . values, 16 dims a tile */
        _tile_loadd(5, probs, 64);
        for (int n = 0; n < dim_v / 16; n++) {
            _tile_loadd(0, sq->out + 16 * n, 4 * dim_v);
            _tile_loadd(6, v_pairs + n * 512, 64);
            _tile_dpbf16ps(0, 5, 6);
            _tile_stored(0, sq->out + 16 * n, 4 * dim_v);
        }
    }
    _tile_release();
    _mm512_store_ps(sq->max, m);
    _mm512_store_ps(sq->sum, l);
}

typedef struct {
    const uint16_t *q, *cache;
    const int32_t *block_table, *lengths;
    long table_stride;
    int heads, dim, dim_v, block_size, count;
    float scale;
    const int *items;          /* the non-empty halves: 2 b for sequence b's first, 2 b + 1 for its second */
    float *partials, *buffers; /* per half: [16][dim_v] accumulators, max[16], sum[16]; per thread: see below */
} step;

static long partial_size(int dim_v) { return 16L * dim_v + 32; }
static long buffer_size(int dim, int dim_v) { return 8L * dim + 16L * dim + 16L * dim_v; }

/* Where sequence b's second half starts: sequences from SPLIT_FROM keys are attended in two halves (always,
 * so that a sequence comes out the same alone or in any batch, on any number of threads). */
static int middle(int length) { return length >= SPLIT_FROM ? (length / 2 + KEYS - 1) / KEYS * KEYS : length; }

/* How many halves a sequence of this length is attended in (0 when empty). */
static int halves(int length) { return length <= 0 ? 0 : middle(length) < length ? 2 : 1; }

static void attend_half(const step *st, int item, float *buffer) {
    const int b = item / 2, length = st->lengths[b], mid = middle(length), dim = st->dim;
    /* q in the tile unit's pair layout, [dim/32][16 dim pairs][16 heads][2]: [dim/2 pairs][16 heads] of 32-bit
     * pairs, each row gathered from the heads (zero past the last head) */
    uint32_t *q_packed = (uint32_t *)buffer;
    const __m512i head_offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(dim / 2));
    const __mmask16 live = (__mmask16)((1u << st->heads) - 1);
    const uint32_t *qb = (const uint32_t *)(st->q + (long)b * st->heads * dim);
    for (int w = 0; w < dim / 2; w++)
        _mm512_store_si512((__m512i *)(q_packed + 16 * w),
                           _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, head_offsets, qb + w, 4));
    float *partial = st->partials + item * partial_size(st->dim_v);
    sequence sq = {(const uint16_t *)q_packed, st->cache, st->block_table + b * st->table_stride, dim, st->dim_v,
                   st->block_size, item % 2 ? mid : 0, item % 2 ? length : mid, st->scale, partial,
                   (uint16_t *)(buffer + 8L * dim), (uint16_t *)(buffer + 24L * dim)};
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
 * [batch][heads] fp32 (natural log; -inf for an empty sequence); workspace (hal_mla_decode_amx_workspace
 * floats, 64-byte aligned) for up to `threads` threads. */
long hal_mla_decode_amx_workspace(int batch, int dim, int dim_v, int threads) {
    return 2L * batch * partial_size(dim_v) + threads * buffer_size(dim, dim_v) + 2L * batch;
}

void hal_mla_decode_amx(const uint16_t *q, int batch, int heads, int dim, int dim_v, const uint16_t *cache,
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
            for (int n = 0; n < dim_v; n += 16) {
                __m512 o = _mm512_mul_ps(_mm512_load_ps(first + h * dim_v + n), _mm512_set1_ps(w1));
                if (parts == 2)
                    o = _mm512_fmadd_ps(_mm512_load_ps(second + h * dim_v + n), _mm512_set1_ps(w2), o);
                o = _mm512_div_ps(o, _mm512_set1_ps(total));
                _mm256_storeu_si256((__m256i *)(ob + (long)h * dim_v + n), (__m256i)_mm512_cvtneps_pbh(o));
            }
            lb[h] = mx + logf(total);
        }
    }
}

/* ---------------------------------------------------------------------------------------- quantize_fp8 */

/* The e4m3fn code of each of 16 fp32 values (|y| clamped to 448; NaN gives 0x7F with its sign): round to
 * nearest, ties to even, on the bits. Normal range (|y| >= 2^-6): 3 mantissa bits kept; below, multiples of
 * 2^-9, rounded by adding 2^23 to 512 |y| (computed only when a lane is there). */
static inline __m128i e4m3_codes(__m512 y) {
    const __m512i bits = _mm512_castps_si512(y);
    const __m512i a = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
    const __m512i clamped = _mm512_min_epu32(a, _mm512_set1_epi32(0x43E00000));  /* 448 */
    __m512i code = _mm512_add_epi32(clamped, _mm512_set1_epi32(0x7FFFF));
    code = _mm512_add_epi32(code, _mm512_and_si512(_mm512_srli_epi32(clamped, 20), _mm512_set1_epi32(1)));
    code = _mm512_sub_epi32(_mm512_srli_epi32(code, 20), _mm512_set1_epi32(960));
    const __mmask16 small = _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x3C800000));
    if (small) {
        const __m512 t = _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(512.0f), _mm512_set1_ps(8388608.0f));
        code = _mm512_mask_sub_epi32(code, small, _mm512_castps_si512(t), _mm512_set1_epi32(0x4B000000));
    }
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000));
    if (nan) code = _mm512_mask_mov_epi32(code, nan, _mm512_set1_epi32(0x7F));
    code = _mm512_or_si512(code, _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80)));
    return _mm512_cvtepi32_epi8(code);
}

/* Lanes whose value lies within a few fp32 ulps of a midpoint between two e4m3 values (where a quotient
 * formed by multiplying with the reciprocal may round differently from the division). */
static inline __mmask16 near_midpoint(__m512 y) {
    const __m512i a = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(0x7FFFFFFF));
    const __m512i dropped = _mm512_and_si512(a, _mm512_set1_epi32(0xFFFFF));  /* the bits rounding drops */
    const __mmask16 small = _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x3C800000));
    __mmask16 near = _mm512_mask_cmple_epu32_mask(~small, _mm512_sub_epi32(dropped, _mm512_set1_epi32(0x7FFF0)),
                                                  _mm512_set1_epi32(32));
    if (small) {
        const __m512 t = _mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(512.0f));
        const __m512 frac = _mm512_sub_ps(t, _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
        near |= _mm512_mask_cmp_ps_mask(small, _mm512_abs_ps(_mm512_sub_ps(frac, _mm512_set1_ps(0.5f))),
                                        _mm512_set1_ps(1.0f / 65536), _CMP_LE_OQ);
    }
    return near;
}

static inline __m512 bf16_to_ps(const uint16_t *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

typedef struct {
    const uint16_t *x;
    uint8_t *q;
    float *s;
    long rows, k;
    int group, ue8m0;
} fp8_job;

/* Rows of one thread: per group, s = max(amax, 1e-4) / 448 (an fp32 division; UE8M0: rounded up to a power
 * of two on the bits), q = e4m3(clamp(x / s)). The quotients are x * (1 / s), exact for a power of two, and
 * otherwise recomputed with the division for a group where one lies near a rounding midpoint: the same bits
 * as the reference's division everywhere. */
static void quantize_rows(void *arg) {
    const fp8_job *job = arg;
    int t, threads;
    team(&t, &threads);
    const long first = job->rows * t / threads, last = job->rows * (t + 1) / threads, per_row = job->k / job->group;
    for (long g = first * per_row; g < last * per_row; g++) {
        const uint16_t *x = job->x + g * job->group;
        uint8_t *q = job->q + g * job->group;
        __m512i top = _mm512_setzero_si512();
        for (int i = 0; i < job->group; i += 16) {
            __m512i v = _mm512_castps_si512(bf16_to_ps(x + i));
            top = _mm512_max_epu32(top, _mm512_and_si512(v, _mm512_set1_epi32(0x7FFFFFFF)));
        }
        uint32_t bits = (uint32_t)_mm512_reduce_max_epu32(top);
        float amax;
        memcpy(&amax, &bits, 4);
        if (bits <= 0x7F800000u && amax < 1e-4f) amax = 1e-4f;
        float s = amax / 448.0f;
        if (job->ue8m0) {
            uint32_t sb;
            memcpy(&sb, &s, 4);
            if (s > 0 && sb < 0x7F800000u) {
                sb = ((sb >> 23) + ((sb & 0x7FFFFF) != 0)) << 23;
                memcpy(&s, &sb, 4);
            }
        }
        job->s[g] = s;
        const int finite = bits < 0x7F800000u;
        const __m512 reciprocal = _mm512_set1_ps(1.0f / s), scale = _mm512_set1_ps(s);
        __mmask16 ties = 0;
        if (finite)
            for (int i = 0; i < job->group; i += 16) {
                __m512 y = _mm512_mul_ps(bf16_to_ps(x + i), reciprocal);
                _mm_storeu_si128((__m128i *)(q + i), e4m3_codes(y));
                ties |= near_midpoint(y);
            }
        if (!finite || (ties && !job->ue8m0))
            for (int i = 0; i < job->group; i += 16)
                _mm_storeu_si128((__m128i *)(q + i), e4m3_codes(_mm512_div_ps(bf16_to_ps(x + i), scale)));
    }
}

/* x [rows][k] bf16, contiguous, k % group == 0, group % 16 == 0 -> q [rows][k] e4m3fn, s [rows][k / group]. */
void hal_quantize_fp8_bf16(const uint16_t *x, long rows, long k, int group, int ue8m0, uint8_t *q, float *s,
                           int threads) {
    fp8_job job = {x, q, s, rows, k, group, ue8m0};
    run_parallel(quantize_rows, &job, rows < threads ? (int)(rows > 0 ? rows : 1) : threads);
}
