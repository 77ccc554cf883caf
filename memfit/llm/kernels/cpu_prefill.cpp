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
// softmax per row in fp32 (max, exp, sum: no online rescaling), then adds the probabilities times V (V read in
// place, bf16 widened in registers) in fp32. What it holds besides the output: K of one head packed (Tk x D
// elements) and the row block's scores.
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

// Scores of R (<= RB) query rows against one packed key block: s[r][0..KB) = scale * q_r . k_j.
template <typename E, int R>
void score_tile(const typename E::T* const* q, const typename E::T* kb, int64_t steps, float scale, float* s, int64_t lds) {
    __m512 a[R][2];
    _Pragma("GCC unroll 12")
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t st = 0; st < steps; st++) {
        const auto w0 = E::load(kb), w1 = E::load(kb + E::LANES);
        _Pragma("GCC unroll 12")
        for (int r = 0; r < R; r++) {
            const auto x = E::bcast(q[r] + st * E::SPAN);
            a[r][0] = E::fma(a[r][0], w0, x);
            a[r][1] = E::fma(a[r][1], w1, x);
        }
        kb += 2 * E::LANES;
    }
    const __m512 sc = _mm512_set1_ps(scale);
    _Pragma("GCC unroll 12")
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(a[r][0], sc));
        _mm512_storeu_ps(s + r * lds + 16, _mm512_mul_ps(a[r][1], sc));
    }
}

template <typename E>
using ScoreFn = void (*)(const typename E::T* const*, const typename E::T*, int64_t, float, float*, int64_t);

template <typename E, int... Rs>
ScoreFn<E> pick_score(int r, std::integer_sequence<int, Rs...>) {
    ScoreFn<E> fns[] = {score_tile<E, Rs + 1>...};
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
    const T *q = (const T*)a.q, *k = (const T*)a.k, *v = (const T*)a.v;
    T* out = (T*)a.out;
    for (int64_t h = 0; h < a.Hkv; h++) {
        pack_k<E>(k + h * a.k_hs, a.k_ts, a.Tk, a.D, kp.data());
        const T* vh = v + h * a.v_hs;
#pragma omp parallel for num_threads(a.nthreads > 0 ? a.nthreads : 1) schedule(dynamic, 1)
        for (int64_t qb = 0; qb < nqb; qb++) {
            const int64_t t0 = qb * tb, nt = a.Tq - t0 < tb ? a.Tq - t0 : tb, R = nt * G;
            // keys any row of this block may see: [lo, hi)
            const int64_t hi = off + t0 + nt;
            int64_t lo = a.window > 0 ? off + t0 - a.window + 1 : 0;
            if (lo < 0) lo = 0;
            const int64_t b0 = lo / KB, b1 = (hi + KB - 1) / KB, base = b0 * KB, width = (b1 - b0) * KB;
            std::vector<float> s((size_t)(R * width));
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
                const auto fn = pick_score<E>(nr, std::make_integer_sequence<int, RB>{});
                for (int64_t b = b0; b < b1; b++)
                    fn(qr.data() + r0, kp.data() + b * steps * KB * E::SPAN, steps, a.scale, s.data() + r0 * width + (b - b0) * KB,
                       width);
            }
            // exact softmax per row over [rlo, rhi); 0 elsewhere in the row's window of the block
            for (int64_t r = 0; r < R; r++) {
                float* sr = s.data() + r * width - base;
                const int64_t j0 = rlo[r], j1 = rhi[r];
                __m512 mx = _mm512_set1_ps(-INFINITY);
                int64_t j = j0;
                for (; j + 16 <= j1; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
                const __mmask16 tail = (__mmask16)((1u << (j1 - j)) - 1u);
                mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, sr + j));
                const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
                __m512 sum = _mm512_setzero_ps();
                for (j = j0; j + 16 <= j1; j += 16) {
                    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m));
                    _mm512_storeu_ps(sr + j, e);
                    sum = _mm512_add_ps(sum, e);
                }
                if (j < j1) {
                    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sr + j), m)));
                    _mm512_mask_storeu_ps(sr + j, tail, e);
                    sum = _mm512_add_ps(sum, e);
                }
                inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
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

}  // extern "C"
