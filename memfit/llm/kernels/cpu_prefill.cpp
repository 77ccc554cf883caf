// memfit's CPU attention for prefill chunks: Tq new tokens of one sequence over its Tk-token context (the
// cache's rows, read where they are), causal (query i sits at position Tk - Tq + i), optionally windowed, GQA.
//
// PyTorch's CPU SDPA ran this at ~15 G MAC/s on one Zen 5 core for 128-token prompts (its flash kernel is
// built for long sequences: per-call set-up and small blocked GEMMs dominate here). This kernel works per KV
// head: K is packed once per call into key blocks of 32 stored dimension-step-major (the blocked matmul's
// layout: bf16 VNNI pairs for vdpbf16ps, fp32 plain), so a block's scores for a tile of query rows are one
// register-blocked product with no horizontal sums. Rows are (token, query head of the group): the G query
// heads of a GQA group share every K/V read. For each block of rows it keeps their scores over the keys they
// may see (rows x keys floats, a few hundred KiB at 4k tokens, never the whole Tq x Tk matrix), takes an exact
// softmax per row in fp32 (max, exp, sum: no online rescaling), then adds the probabilities times V: fp32 V read
// in place with fp32 FMAs; bf16 P rounded to bf16 (as the AMX path rounds it) times V packed in key pairs, on
// vdpbf16ps (pv_tile_bf16). What it holds besides the output: K and (bf16) V of one head packed (Tk x D elements
// each) and the row block's scores (and, bf16, their rounded copy).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <utility>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int KB = 32;       // keys per packed block (two zmm of fp32 scores)
constexpr int RB = 12;       // query rows per score tile: 24 accumulators
constexpr int ROWS = 24;     // query rows per block (scores kept for these)

#include "bf16x16.h"
#include "exp16.h"

struct BF16 {
    using T = uint16_t;
    static constexpr int SPAN = 2;  // dimensions per step
    static inline __m512i bcast(const T* p) {
        uint32_t v;
        memcpy(&v, p, 4);
        return _mm512_set1_epi32((int)v);
    }
    static inline __m512i load(const T* p) { return _mm512_loadu_si512(p); }
    static inline __m512 fma(__m512 a, __m512i w, __m512i x) { return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)x); }
    static inline __m512 widen(const T* p) {  // 16 bf16 -> fp32
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
    }
    static inline void store(T* y, __m512 v) { _mm256_storeu_si256((__m256i*)y, to_bf16(v)); }
    static constexpr int LANES = 32;  // K elements per packed register (16 keys x 2 dims)
};

struct F32 {
    using T = float;
    static constexpr int SPAN = 1;
    static inline __m512 bcast(const T* p) { return _mm512_set1_ps(*p); }
    static inline __m512 load(const T* p) { return _mm512_loadu_ps(p); }
    static inline __m512 fma(__m512 a, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, a); }
    static inline __m512 widen(const T* p) { return _mm512_loadu_ps(p); }
    static inline void store(T* y, __m512 v) { _mm512_storeu_ps(y, v); }
    static constexpr int LANES = 16;
};

// K of one head -> blocks of KB keys: kp[blk][s][key][e] = K[blk * KB + key][s * SPAN + e] (0 past Tk).
template <typename E>
void pack_k(const typename E::T* k, int64_t k_ts, int64_t Tk, int64_t D, typename E::T* kp) {
    using T = typename E::T;
    const int64_t steps = D / E::SPAN, blocks = (Tk + KB - 1) / KB;
    for (int64_t b = 0; b < blocks; b++)
        for (int key = 0; key < KB; key++) {
            const int64_t j = b * KB + key;
            T* dst = kp + b * steps * KB * E::SPAN + key * E::SPAN;
            for (int64_t s = 0; s < steps; s++)
                for (int e = 0; e < E::SPAN; e++) dst[s * KB * E::SPAN + e] = j < Tk ? k[j * k_ts + s * E::SPAN + e] : (T)0;
        }
}

// Scores of R (<= RB) query rows against one packed key block: s[r][0..KB) = scale * q_r . k_j. HALF: the first 16
// keys only (s[r][16..KB) not written): a causal row block whose last keys end in the block's first half (a row
// block of 8 tokens does in half of its blocks) skips a tenth of a 128-token prompt's score work; each score it
// writes has the bits of the whole tile's (the same sums, lane by lane).
template <typename E, int R, bool HALF>
void score_tile(const typename E::T* const* q, const typename E::T* kb, int64_t steps, float scale, float* s, int64_t lds) {
    __m512 a[R][2];
    _Pragma("GCC unroll 12")
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t st = 0; st < steps; st++) {
        const auto w0 = E::load(kb);
        const auto w1 = HALF ? w0 : E::load(kb + E::LANES);
        _Pragma("GCC unroll 12")
        for (int r = 0; r < R; r++) {
            const auto x = E::bcast(q[r] + st * E::SPAN);
            a[r][0] = E::fma(a[r][0], w0, x);
            if (!HALF) a[r][1] = E::fma(a[r][1], w1, x);
        }
        kb += 2 * E::LANES;
    }
    const __m512 sc = _mm512_set1_ps(scale);
    _Pragma("GCC unroll 12")
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(a[r][0], sc));
        if (!HALF) _mm512_storeu_ps(s + r * lds + 16, _mm512_mul_ps(a[r][1], sc));
    }
}

template <typename E>
using ScoreFn = void (*)(const typename E::T* const*, const typename E::T*, int64_t, float, float*, int64_t);

template <typename E, bool HALF, int... Rs>
ScoreFn<E> pick_score(int r, std::integer_sequence<int, Rs...>) {
    ScoreFn<E> fns[] = {score_tile<E, Rs + 1, HALF>...};
    return fns[r - 1];
}

// out_r = sum_j p[r][j] V[j] / sum_r for R (<= 24 / DV) rows over keys [j0, j1); p already 0 outside each
// row's range. DV: D / 16 registers per row.
template <typename E, int DV, int R>
void pv_tile(const float* p, int64_t ldp, const typename E::T* v, int64_t v_ts, int64_t j0, int64_t j1, const float* inv,
             typename E::T* const* out) {
    __m512 o[R][DV];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8")
        for (int d = 0; d < DV; d++) o[r][d] = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
        __m512 vv[DV];
        _Pragma("GCC unroll 8")
        for (int d = 0; d < DV; d++) vv[d] = E::widen(v + j * v_ts + d * 16);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) {
            const __m512 pb = _mm512_set1_ps(p[r * ldp + j]);
            _Pragma("GCC unroll 8")
            for (int d = 0; d < DV; d++) o[r][d] = _mm512_fmadd_ps(pb, vv[d], o[r][d]);
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++) {
        const __m512 iv = _mm512_set1_ps(inv[r]);
        _Pragma("GCC unroll 8")
        for (int d = 0; d < DV; d++) E::store(out[r] + d * 16, _mm512_mul_ps(o[r][d], iv));
    }
}

template <typename E, int DV>
using PvFn = void (*)(const float*, int64_t, const typename E::T*, int64_t, int64_t, int64_t, const float*,
                      typename E::T* const*);

template <typename E, int DV, int... Rs>
PvFn<E, DV> pick_pv(int r, std::integer_sequence<int, Rs...>) {
    PvFn<E, DV> fns[] = {pv_tile<E, DV, Rs + 1>...};
    return fns[r - 1];
}

// bf16 P x V on vdpbf16ps (two keys a multiply-add, twice the fp32 FMA's rate): V of one head packed into key
// pairs, vp[j / 2][d] = (V[j][d], V[j + 1][d]) as 32 bits (0 past Tk), and P rounded to bf16 (as the AMX path
// rounds it, from the same fp32 softmax and its unrounded row sum). P x V ran at the fp32 FMA's roofline (44% of a
// 128-token call on one Zen 4 core); this halves its multiply-adds' time.
inline void pack_v_pairs(const uint16_t* v, int64_t v_ts, int64_t Tk, int64_t D, uint32_t* vp) {
    for (int64_t jp = 0; jp < (Tk + 1) / 2; jp++) {
        const uint16_t* v0 = v + 2 * jp * v_ts;
        const bool has1 = 2 * jp + 1 < Tk;
        for (int64_t d = 0; d < D; d += 16) {
            const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v0 + d)));
            const __m512i b = has1 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v0 + v_ts + d))), 16)
                                   : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + jp * D + d, _mm512_or_si512(a, b));
        }
    }
}

// out_r = sum_j p[r][j] V[j] / sum_r over key pairs [jp0, jp1) (p: bf16, 0 outside each row's range, row stride
// ldp elements; vp: pack_v_pairs). R <= 24 / DV rows.
template <int DV, int R>
void pv_tile_bf16(const uint16_t* p, int64_t ldp, const uint32_t* vp, int64_t jp0, int64_t jp1, const float* inv,
                  uint16_t* const* out) {
    constexpr int64_t D = 16 * DV;
    __m512 o[R][DV];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8")
        for (int d = 0; d < DV; d++) o[r][d] = _mm512_setzero_ps();
    for (int64_t jp = jp0; jp < jp1; jp++) {
        __m512i vv[DV];
        _Pragma("GCC unroll 8")
        for (int d = 0; d < DV; d++) vv[d] = _mm512_loadu_si512(vp + jp * D + d * 16);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) {
            uint32_t pair;
            memcpy(&pair, p + r * ldp + 2 * jp, 4);
            const __m512i pb = _mm512_set1_epi32((int)pair);
            _Pragma("GCC unroll 8")
            for (int d = 0; d < DV; d++) o[r][d] = _mm512_dpbf16_ps(o[r][d], (__m512bh)vv[d], (__m512bh)pb);
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++) {
        const __m512 iv = _mm512_set1_ps(inv[r]);
        _Pragma("GCC unroll 8")
        for (int d = 0; d < DV; d++) BF16::store(out[r] + d * 16, _mm512_mul_ps(o[r][d], iv));
    }
}

template <int DV>
using PvBf16Fn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, int64_t, const float*, uint16_t* const*);

template <int DV, int... Rs>
PvBf16Fn<DV> pick_pv_bf16(int r, std::integer_sequence<int, Rs...>) {
    PvBf16Fn<DV> fns[] = {pv_tile_bf16<DV, Rs + 1>...};
    return fns[r - 1];
}

// A heap block left uninitialised (std::vector zeroes its floats: a memset of the row block's scores that the
// score tiles overwrite, ~2% of a 128-token call), freed at scope end.
template <typename T>
struct Scratch {
    T* p;
    explicit Scratch(size_t n) : p(n ? new T[n] : nullptr) {}
    ~Scratch() { delete[] p; }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    T* data() { return p; }
};

struct Args {
    const void *q, *k, *v;
    void* out;
    int64_t q_ts, q_hs, k_ts, k_hs, v_ts, v_hs, o_ts, o_hs, Tq, Tk, Hq, Hkv, D, window;
    float scale;
    int nthreads;
};

template <typename E, int DV>
void run(const Args& a) {
    using T = typename E::T;
    constexpr int RO = 24 / DV;  // rows per PV tile
    const int64_t G = a.Hq / a.Hkv, steps = a.D / E::SPAN, blocks = (a.Tk + KB - 1) / KB;
    const int64_t tb = ROWS / G > 0 ? ROWS / G : 1;  // tokens per row block
    const int64_t nqb = (a.Tq + tb - 1) / tb, off = a.Tk - a.Tq;
    std::vector<T> kp((size_t)(blocks * KB * a.D));
    constexpr bool bf16 = sizeof(T) == 2;  // P x V on vdpbf16ps (pv_tile_bf16); fp32: pv_tile
    std::vector<uint32_t> vp(bf16 ? (size_t)((a.Tk + 1) / 2 * a.D) : 0);
    const T *q = (const T*)a.q, *k = (const T*)a.k, *v = (const T*)a.v;
    T* out = (T*)a.out;
    for (int64_t h = 0; h < a.Hkv; h++) {
        pack_k<E>(k + h * a.k_hs, a.k_ts, a.Tk, a.D, kp.data());
        const T* vh = v + h * a.v_hs;
        if (bf16) pack_v_pairs((const uint16_t*)vh, a.v_ts, a.Tk, a.D, vp.data());
#pragma omp parallel for num_threads(a.nthreads > 0 ? a.nthreads : 1) schedule(dynamic, 1)
        for (int64_t qb = 0; qb < nqb; qb++) {
            const int64_t t0 = qb * tb, nt = a.Tq - t0 < tb ? a.Tq - t0 : tb, R = nt * G;
            // keys any row of this block may see: [lo, hi)
            const int64_t hi = off + t0 + nt;
            int64_t lo = a.window > 0 ? off + t0 - a.window + 1 : 0;
            if (lo < 0) lo = 0;
            const int64_t b0 = lo / KB, b1 = (hi + KB - 1) / KB, base = b0 * KB, width = (b1 - b0) * KB;
            Scratch<float> s((size_t)(R * width));  // every element written by the score tiles
            std::vector<const T*> qr((size_t)R);
            std::vector<T*> orow((size_t)R);
            std::vector<float> inv((size_t)R);
            std::vector<int64_t> rlo((size_t)R), rhi((size_t)R);
            for (int64_t r = 0; r < R; r++) {  // row r = (token t0 + r / G, query head h * G + r % G)
                const int64_t t = t0 + r / G, hq = h * G + r % G, pos = off + t;
                qr[r] = q + t * a.q_ts + hq * a.q_hs;
                orow[r] = out + t * a.o_ts + hq * a.o_hs;
                rhi[r] = pos + 1;
                rlo[r] = a.window > 0 && pos - a.window + 1 > 0 ? pos - a.window + 1 : 0;
            }
            for (int64_t r0 = 0; r0 < R; r0 += RB) {
                const int nr = (int)(R - r0 < RB ? R - r0 : RB);
                const auto fn = pick_score<E, false>(nr, std::make_integer_sequence<int, RB>{});
                // the last block: its first 16 keys only where no row of the block sees past them (hi: keys seen)
                const bool half = hi - (b1 - 1) * KB <= KB / 2;
                for (int64_t b = b0; b < b1; b++)
                    (b + 1 == b1 && half ? pick_score<E, true>(nr, std::make_integer_sequence<int, RB>{}) : fn)(
                        qr.data() + r0, kp.data() + b * steps * KB * E::SPAN, steps, a.scale,
                        s.data() + r0 * width + (b - b0) * KB, width);
            }
            // exact softmax per row over [rlo, rhi); 0 elsewhere in the row's window of the block. bf16: the
            // probabilities go straight to P's bf16 row (pv_tile_bf16 reads that), the fp32 row is not written back
            Scratch<uint16_t> pb(bf16 ? (size_t)(R * width) : 0);  // every element written below
            for (int64_t r = 0; r < R; r++) {
                float* sr = s.data() + r * width - base;
                uint16_t* pr = bf16 ? pb.data() + r * width - base : nullptr;
                const int64_t j0 = rlo[r], j1 = rhi[r];
                __m512 mx = _mm512_set1_ps(-INFINITY);
                int64_t j = j0;
                for (; j + 16 <= j1; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
                const __mmask16 tail = (__mmask16)((1u << (j1 - j)) - 1u);
                mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, sr + j));
                const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
                __m512 sum = _mm512_setzero_ps();
                if (bf16)  // zeros outside the row's keys (the window is whole 16-key chunks: width is a multiple of 32)
                    for (int64_t z = base; z < base + width; z += 16) _mm256_storeu_si256((__m256i*)(pr + z), _mm256_setzero_si256());
                for (j = j0; j + 16 <= j1; j += 16) {
                    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m));
                    if (bf16) _mm256_storeu_si256((__m256i*)(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
                    else _mm512_storeu_ps(sr + j, e);
                    sum = _mm512_add_ps(sum, e);
                }
                if (j < j1) {
                    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sr + j), m)));
                    if (bf16) _mm256_mask_storeu_epi16(pr + j, tail, (__m256i)_mm512_cvtneps_pbh(e));
                    else _mm512_mask_storeu_ps(sr + j, tail, e);
                    sum = _mm512_add_ps(sum, e);
                }
                inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
                if (bf16) continue;
                for (int64_t z = base; z < j0; z++) sr[z] = 0.0f;
                for (int64_t z = j1; z < base + width; z++) sr[z] = 0.0f;
            }
            for (int64_t r0 = 0; r0 < R; r0 += RO) {
                const int nr = (int)(R - r0 < RO ? R - r0 : RO);
                int64_t j0 = rlo[r0], j1 = rhi[r0];
                for (int i = 1; i < nr; i++) {
                    j0 = rlo[r0 + i] < j0 ? rlo[r0 + i] : j0;
                    j1 = rhi[r0 + i] > j1 ? rhi[r0 + i] : j1;
                }
                if (bf16) {  // key pairs [j0 / 2, ceil(j1 / 2)): base and width are even, so the pairs stay in the window
                    pick_pv_bf16<DV>(nr, std::make_integer_sequence<int, RO>{})(pb.data() + r0 * width - base, width, vp.data(),
                                                                              j0 / 2, (j1 + 1) / 2, inv.data() + r0,
                                                                              (uint16_t* const*)orow.data() + r0);
                    continue;
                }
                pick_pv<E, DV>(nr, std::make_integer_sequence<int, RO>{})(s.data() + r0 * width - base, width, vh, a.v_ts, j0,
                                                                          j1, inv.data() + r0, orow.data() + r0);
            }
        }
    }
}

template <typename E>
int attend(const Args& a) {
    if (a.Tq < 0 || a.Tk < a.Tq || a.Hkv <= 0 || a.Hq % a.Hkv != 0) return -1;
    if (a.Tq == 0) return 0;
    switch (a.D) {  // D / 16 registers per row; other head sizes: the caller's fallback
        case 32: run<E, 2>(a); return 0;
        case 64: run<E, 4>(a); return 0;
        case 96: run<E, 6>(a); return 0;
        case 128: run<E, 8>(a); return 0;
        default: return -2;
    }
}

}  // namespace

// ---- The AMX path (bf16, a core with AMX-BF16 that Linux lets this process use; chosen by prefill.py) ----
//
// Same semantics as run<BF16> above (exact fp32 softmax per row over the keys it may see, causal from the chunk's
// offset, sliding window, GQA rows sharing every K/V read, K/V read from the cache's rows), but both products run
// on the tile unit (TDPBF16PS: 16 x 16 x 32 multiply-adds an instruction):
// - rows are the flattened (token, query head of the group) index, AR = 32 at a time: two 16-row A tiles, so any
//   group size fits (a block may start inside a token's group);
// - Q . K^T: the block's Q rows are copied to the stack (32 x D bf16, the A tiles); K of the head is packed once
//   per call in pack_k's layout (VNNI pairs, 32 keys a block), which is TDPBF16PS's B layout read with a 128-byte
//   stride; 2 x 2 accumulator tiles per 32-key block go to the block's score rows (fp32, unscaled);
// - softmax: per row, max of the scaled scores, e = exp(scale * s - max) (0 outside the row's keys), rounded to
//   bf16 in place over the first half of the row's own floats (the A tiles of P: row stride = the float row's),
//   and the row's sum taken over the rounded values;
// - P . V: V of the head is packed once per call into VNNI pairs of keys (vp[j/2][d][j%2], TDPBF16PS's B layout,
//   4 x D bytes a row), 2 x 2 accumulator tiles per 32 output dimensions, scaled by 1 / sum and rounded to bf16.
// P in bf16 (as flash attention does on GPUs; the AVX-512 path rounds it too, pv_tile_bf16): at most 2^-8 of
// each weight, as the bf16 output's own rounding is of each output (tests/llm/kernels/test_cpu_prefill.py bounds
// both paths; the mean error measured 1.2-1.5x the output rounding's alone).
// Scratch, besides the stack: K and V of one head packed (2 x Tk rounded up to 32 x D bf16, aligned_alloc) and
// per thread AR rows of scores (AR x Tk rounded up to 32 floats), all freed when the call returns
// (engine/arena_accounting.py counts them).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MEMFIT_PREFILL_AMX 1
#include <stdlib.h>
extern "C" int memfit_amx_available(void);  // cpu_amx.cpp: the CPU has AMX-BF16 and Linux granted the tile state
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")

namespace {

constexpr int AR = 32;  // rows a block: two 16-row tiles

struct alignas(64) AmxConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

void amx_config() {
    AmxConfig cfg;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;  // C: 16 fp32; A: 32 bf16; B: 16 pairs x 16 columns x 2 bf16
    }
    _tile_loadconfig(&cfg);
}

struct Aligned {  // 64-byte aligned, uninitialised, freed at scope end
    void* p;
    explicit Aligned(size_t n) : p(aligned_alloc(64, (n + 63) / 64 * 64)) {}
    ~Aligned() { free(p); }
};

// K of one head -> kp[blk][s][key] (32-bit VNNI pairs K[j][2s..2s+1]; pack_k<BF16>'s layout), 0 past Tk: a step of
// 16 keys is one gather (a scalar loop's strided stores took ~6% of a 128-token call).
void pack_k_amx(const uint16_t* k, int64_t k_ts, int64_t Tk, int64_t D, uint32_t* kp) {
    const int64_t steps = D / 2, blocks = (Tk + KB - 1) / KB;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)(k_ts * 2)));  // bytes from key to key
    for (int64_t b = 0; b < blocks; b++)
        for (int half = 0; half < 2; half++) {
            const int64_t j0 = b * KB + half * 16, left = Tk - j0;
            if (left <= 0) {
                for (int64_t s = 0; s < steps; s++) _mm512_storeu_si512(kp + (b * steps + s) * KB + half * 16, _mm512_setzero_si512());
                continue;
            }
            const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
            const char* src = (const char*)(k + j0 * k_ts);
            uint32_t* dst = kp + b * steps * KB + half * 16;
            for (int64_t s = 0; s < steps; s++)
                _mm512_storeu_si512(dst + s * KB, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, idx, src + s * 4, 1));
        }
}

// V of one head -> vp[j / 2][d][j % 2] for j < padded (0 past Tk): key pairs interleaved, D x 2 bf16 a pair.
void pack_v_amx(const uint16_t* v, int64_t v_ts, int64_t Tk, int64_t D, int64_t padded, uint16_t* vp) {
    alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
    for (int64_t j = 0; j < padded; j += 2) {
        uint16_t* dst = vp + j * D;
        for (int64_t d = 0; d < D; d += 32) {
            const __m512i a = j < Tk ? _mm512_loadu_si512(v + j * v_ts + d) : _mm512_setzero_si512();
            const __m512i b = j + 1 < Tk ? _mm512_loadu_si512(v + (j + 1) * v_ts + d) : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + 2 * d, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(dst + 2 * d + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

// Lanes [j0, j1) of the 16 starting at jj.
inline __mmask16 range_mask(int64_t jj, int64_t j0, int64_t j1) {
    const int64_t a = j0 - jj < 0 ? 0 : j0 - jj > 16 ? 16 : j0 - jj, b = j1 - jj < 0 ? 0 : j1 - jj > 16 ? 16 : j1 - jj;
    if (b <= a) return 0;
    return (__mmask16)((((1u << (b - a)) - 1u) << a) & 0xffffu);
}

// One block of rows [i0, i0 + R) (R <= AR) of KV head h: kp, vp packed for the head; s: AR x `padded` floats.
template <int D>
void block_amx(const Args& a, int64_t h, int64_t i0, int64_t R, const uint16_t* kp, const uint16_t* vp, float* s,
               uint16_t* qp) {
    constexpr int DT = D / 32;  // 32-value steps of a row
    const int64_t G = a.Hq / a.Hkv, off = a.Tk - a.Tq;
    const uint16_t* q = (const uint16_t*)a.q;
    uint16_t* out = (uint16_t*)a.out;
    int64_t rlo[AR], rhi[AR];
    uint16_t* orow[AR];
    int64_t lo = INT64_MAX, hi = 0;
    for (int64_t r = 0; r < R; r++) {
        const int64_t t = (i0 + r) / G, hq = h * G + (i0 + r) % G, pos = off + t;
        memcpy(qp + r * D, q + t * a.q_ts + hq * a.q_hs, D * 2);
        orow[r] = out + t * a.o_ts + hq * a.o_hs;
        rhi[r] = pos + 1;
        rlo[r] = a.window > 0 && pos - a.window + 1 > 0 ? pos - a.window + 1 : 0;
        lo = rlo[r] < lo ? rlo[r] : lo;
        hi = rhi[r] > hi ? rhi[r] : hi;
    }
    const int64_t b0 = lo / KB, b1 = (hi + KB - 1) / KB, base = b0 * KB, width = (b1 - b0) * KB;
    const int64_t lds = width * 4;  // bytes a score row (the P row of bf16 starts at the same place)
    // Q . K^T: block b's 32 keys for the 32 rows in tiles 0-3
    for (int64_t b = b0; b < b1; b++) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t* kb = kp + b * D * KB;
        for (int dt = 0; dt < DT; dt++) {
            _tile_loadd(4, qp + dt * 32, D * 2);
            _tile_loadd(5, qp + 16 * D + dt * 32, D * 2);
            _tile_loadd(6, kb + dt * 16 * KB * 2, KB * 4);
            _tile_loadd(7, kb + dt * 16 * KB * 2 + 32, KB * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        float* sb = s + (b - b0) * KB;
        _tile_stored(0, sb, lds);
        _tile_stored(1, sb + 16, lds);
        _tile_stored(2, sb + 16 * width, lds);
        _tile_stored(3, sb + 16 * width + 16, lds);
    }
    // softmax per row; P in bf16 over the row's first half. e^(scale s - max) = 2^(c s - c max), c = scale log2(e):
    // 2^x = 2^n 2^f, n = round(x), f in [-1/2, 1/2], 2^f by a degree-4 polynomial (relative error ~4e-5, ~100x below
    // P's bf16 rounding, up to 2^-8); x <= 0, so no clamp (scalef takes 2^n to 0 below the float range).
    float inv[AR];
    const __m512 cv = _mm512_set1_ps(a.scale * 1.44269504088896341f);
    for (int64_t r = 0; r < R; r++) {
        float* sr = s + r * width;
        uint16_t* pr = (uint16_t*)sr;
        const int64_t j0 = rlo[r] - base, j1 = rhi[r] - base, c0 = j0 / 16 * 16, c1 = (j1 + 15) / 16 * 16;
        // max: the first and last 16 masked, the rest in 4 independent chains (one chain waited on max's latency)
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        __m512 mx0 = _mm512_mask_max_ps(ninf, range_mask(c0, j0, j1), ninf, _mm512_mul_ps(_mm512_loadu_ps(sr + c0), cv));
        __m512 mx1 = ninf, mx2 = ninf, mx3 = ninf;
        if (c1 - 16 > c0) mx1 = _mm512_mask_max_ps(ninf, range_mask(c1 - 16, j0, j1), ninf, _mm512_mul_ps(_mm512_loadu_ps(sr + c1 - 16), cv));
        int64_t jj = c0 + 16;
        for (; jj + 64 <= c1 - 16; jj += 64) {
            mx0 = _mm512_max_ps(mx0, _mm512_mul_ps(_mm512_loadu_ps(sr + jj), cv));
            mx1 = _mm512_max_ps(mx1, _mm512_mul_ps(_mm512_loadu_ps(sr + jj + 16), cv));
            mx2 = _mm512_max_ps(mx2, _mm512_mul_ps(_mm512_loadu_ps(sr + jj + 32), cv));
            mx3 = _mm512_max_ps(mx3, _mm512_mul_ps(_mm512_loadu_ps(sr + jj + 48), cv));
        }
        for (; jj < c1 - 16; jj += 16) mx2 = _mm512_max_ps(mx2, _mm512_mul_ps(_mm512_loadu_ps(sr + jj), cv));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(mx0, mx1), _mm512_max_ps(mx2, mx3))));
        for (int64_t jj = 0; jj < c0; jj += 16) _mm256_storeu_si256((__m256i*)(pr + jj), _mm256_setzero_si256());
        __m512 sum = _mm512_setzero_ps();
        for (int64_t jj = c0; jj < c1; jj += 16) {  // writes bytes [2jj, 2jj + 32): floats already read
            const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr + jj), cv, m);
            const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 f = _mm512_sub_ps(x, n);
            __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(9.6181291e-3f), f, _mm512_set1_ps(5.5504109e-2f));
            e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(2.4022651e-1f));
            e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(6.9314718e-1f));
            e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(1.0f));
            e = _mm512_scalef_ps(e, n);
            if (jj < j0 || jj + 16 > j1) e = _mm512_maskz_mov_ps(range_mask(jj, j0, j1), e);
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i*)(pr + jj), (__m256i)_mm512_cvtneps_pbh(e));
        }
        for (int64_t jj = c1; jj < width; jj += 16) _mm256_storeu_si256((__m256i*)(pr + jj), _mm256_setzero_si256());
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    // P . V over the keys any row sees, 32 output dimensions at a time
    const int64_t k0 = (lo - base) / 32 * 32, k1 = (hi - base + 31) / 32 * 32;
    const uint16_t* p0 = (const uint16_t*)s;
    const uint16_t* p1 = (const uint16_t*)(s + 16 * width);
    alignas(64) float c[AR * 32];
    for (int d0 = 0; d0 < D; d0 += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kk = k0; kk < k1; kk += 32) {
            const uint16_t* vb = vp + (base + kk) * D + d0 * 2;
            _tile_loadd(4, p0 + kk, lds);
            _tile_loadd(5, p1 + kk, lds);
            _tile_loadd(6, vb, D * 4);
            _tile_loadd(7, vb + 32, D * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c, 128);
        _tile_stored(1, c + 16, 128);
        _tile_stored(2, c + 16 * 32, 128);
        _tile_stored(3, c + 16 * 32 + 16, 128);
        for (int64_t r = 0; r < R; r++) {
            const __m512 iv = _mm512_set1_ps(inv[r]);
            // vcvtne2ps2bf16: round to nearest even, as to_bf16 (outputs below 2^-126 flush to 0)
            _mm512_storeu_si512(orow[r] + d0, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_load_ps(c + r * 32 + 16), iv),
                                                                           _mm512_mul_ps(_mm512_load_ps(c + r * 32), iv)));
        }
    }
}

// The call's heap blocks (bytes, before aligned_alloc's rounding to 64): K packed, V packed, every thread's scores.
struct AmxScratch {
    int64_t k, v, scores;
};
AmxScratch amx_scratch(int64_t Tk, int64_t D, int nthreads) {
    const int64_t padded = (Tk + KB - 1) / KB * KB;
    return {padded * D * 2, padded * D * 2, (int64_t)(nthreads > 0 ? nthreads : 1) * AR * padded * 4};
}

template <int D>
int run_amx(const Args& a) {
    const int64_t G = a.Hq / a.Hkv, rows = a.Tq * G, nrb = (rows + AR - 1) / AR;
    const int64_t blocks = (a.Tk + KB - 1) / KB, padded = blocks * KB;
    const int nt = a.nthreads > 0 ? a.nthreads : 1;
    const AmxScratch sz = amx_scratch(a.Tk, D, nt);
    Aligned kmem((size_t)sz.k), vmem((size_t)sz.v), smem((size_t)sz.scores);
    if (!kmem.p || !vmem.p || !smem.p) return -5;
    const uint16_t *k = (const uint16_t*)a.k, *v = (const uint16_t*)a.v;
    for (int64_t h = 0; h < a.Hkv; h++) {
        pack_k_amx(k + h * a.k_hs, a.k_ts, a.Tk, D, (uint32_t*)kmem.p);
        pack_v_amx(v + h * a.v_hs, a.v_ts, a.Tk, D, padded, (uint16_t*)vmem.p);
#pragma omp parallel num_threads(nt)
        {
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            amx_config();
            alignas(64) uint16_t qp[AR * D];  // rows past R: whatever is there (only their own output rows, unused)
            float* s = (float*)smem.p + (int64_t)tid * AR * padded;
#pragma omp for schedule(dynamic, 1)
            for (int64_t rb = 0; rb < nrb; rb++) {
                const int64_t i0 = rb * AR, R = rows - i0 < AR ? rows - i0 : AR;
                block_amx<D>(a, h, i0, R, (const uint16_t*)kmem.p, (const uint16_t*)vmem.p, s, qp);
            }
            _tile_release();
        }
    }
    return 0;
}

int attend_amx(const Args& a) {
    if (a.Tq < 0 || a.Tk < a.Tq || a.Hkv <= 0 || a.Hq % a.Hkv != 0) return -1;
    if (a.Tq == 0) return 0;
    if (memfit_amx_available() != 1) return -4;
    if (a.k_ts > (1 << 26)) return attend<BF16>(a);  // pack_k_amx's gather offsets (16 keys) must fit in 32 bits
    switch (a.D) {
        case 32: return run_amx<32>(a);
        case 64: return run_amx<64>(a);
        case 96: return run_amx<96>(a);
        case 128: return run_amx<128>(a);
        default: return -2;
    }
}

}  // namespace
#pragma GCC pop_options
#endif  // MEMFIT_PREFILL_AMX

extern "C" {

// q (Tq, Hq, D), k/v (Tk, Hkv, D), out (Tq, Hq, D): token and head strides in elements, D contiguous.
// window <= 0: none. Returns 0, -1 for bad shapes, -2 for an unsupported head size.
#define MEMFIT_PREFILL(NAME, E, T)                                                                                    \
    int NAME(const T* q, int64_t q_ts, int64_t q_hs, const T* k, int64_t k_ts, int64_t k_hs, const T* v, int64_t v_ts, \
             int64_t v_hs, T* out, int64_t o_ts, int64_t o_hs, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv,        \
             int64_t D, float scale, int64_t window, int nthreads) {                                                  \
        return attend<E>(Args{q, k, v, out, q_ts, q_hs, k_ts, k_hs, v_ts, v_hs, o_ts, o_hs, Tq, Tk, Hq, Hkv, D,       \
                              window, scale, nthreads});                                                              \
    }
MEMFIT_PREFILL(memfit_prefill_attention_bf16, BF16, uint16_t)
MEMFIT_PREFILL(memfit_prefill_attention_f32, F32, float)

// Several prompts' chunks with no cached prefix in one call (a prefill step's layer: 32 prompts were 32 calls, each
// paying ctypes' argument conversion and the wrapper's checks): chunk i is rows [rows[2i], rows[2i] + rows[2i + 1])
// of q, k, v and out, attending over its own rows only (Tq = Tk = its length), exactly as a call of the function above on that
// chunk's rows. Returns 0, or the first chunk's error (the chunks before it are done).
#define MEMFIT_PREFILL_FRESH(NAME, E, T)                                                                              \
    int NAME(const T* q, int64_t q_ts, int64_t q_hs, const T* k, int64_t k_ts, int64_t k_hs, const T* v, int64_t v_ts, \
             int64_t v_hs, T* out, int64_t o_ts, int64_t o_hs, const int64_t* rows, int64_t chunks, int64_t Hq,       \
             int64_t Hkv, int64_t D, float scale, int64_t window, int nthreads) {                                     \
        for (int64_t i = 0; i < chunks; i++) {                                                                        \
            const int64_t r = rows[2 * i], n = rows[2 * i + 1];                                                         \
            const int rc = attend<E>(Args{q + r * q_ts, k + r * k_ts, v + r * v_ts, out + r * o_ts, q_ts, q_hs, k_ts, \
                                          k_hs, v_ts, v_hs, o_ts, o_hs, n, n, Hq, Hkv, D, window, scale, nthreads});   \
            if (rc != 0) return rc;                                                                                   \
        }                                                                                                             \
        return 0;                                                                                                     \
    }
MEMFIT_PREFILL_FRESH(memfit_prefill_attention_fresh_bf16, BF16, uint16_t)
MEMFIT_PREFILL_FRESH(memfit_prefill_attention_fresh_f32, F32, float)

// The same on AMX tiles (bf16 only): also -4 where this process can't use AMX (no AMX-BF16, Linux refused the
// tile state, or a compiler without AMX intrinsics), -5 where the scratch could not be allocated.
int memfit_prefill_attention_bf16_amx(const uint16_t* q, int64_t q_ts, int64_t q_hs, const uint16_t* k, int64_t k_ts,
                                      int64_t k_hs, const uint16_t* v, int64_t v_ts, int64_t v_hs, uint16_t* out,
                                      int64_t o_ts, int64_t o_hs, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv,
                                      int64_t D, float scale, int64_t window, int nthreads) {
#ifdef MEMFIT_PREFILL_AMX
    return attend_amx(Args{q, k, v, out, q_ts, q_hs, k_ts, k_hs, v_ts, v_hs, o_ts, o_hs, Tq, Tk, Hq, Hkv, D, window,
                           scale, nthreads});
#else
    (void)q, (void)q_ts, (void)q_hs, (void)k, (void)k_ts, (void)k_hs, (void)v, (void)v_ts, (void)v_hs, (void)out;
    (void)o_ts, (void)o_hs, (void)Tq, (void)Tk, (void)Hq, (void)Hkv, (void)D, (void)scale, (void)window, (void)nthreads;
    return -4;
#endif
}

// The largest heap block the AMX path holds during a call over Tk keys of head size D on nthreads threads
// (`which` 0: K packed, 1: V packed, 2: every thread's score rows, one block), before aligned_alloc rounds it up to
// 64 bytes; all three live for the whole call and are freed when it returns. 0 where there is no AMX path.
int64_t memfit_prefill_amx_scratch_bytes(int64_t Tk, int64_t D, int nthreads, int which) {
#ifdef MEMFIT_PREFILL_AMX
    const AmxScratch sz = amx_scratch(Tk, D, nthreads);
    return which == 0 ? sz.k : which == 1 ? sz.v : which == 2 ? sz.scores : 0;
#else
    (void)Tk, (void)D, (void)nthreads, (void)which;
    return 0;
#endif
}

}  // extern "C"
