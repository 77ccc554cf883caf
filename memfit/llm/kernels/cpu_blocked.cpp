// memfit's blocked CPU matmul for decode batches of a few to a few dozen rows: y = x W^T (+ b).
//
// The weight W (N, K) is packed once into panels of NB = 16 * P output columns (P = 2, 3 or 4 zmm
// registers wide), each panel stored K-step-major so that one step's weights for the panel's NB columns are
// P contiguous 64-byte lines:
//   bf16: panel[s][n][2] = (W[n][2s], W[n][2s+1])  (VNNI pairs; s < ceil(K/2), odd K padded with 0)
//   fp32: panel[s][n]    = W[n][s]
// N is padded with zero columns to a whole panel. A step multiplies the panel's P registers by one
// broadcast x value (a bf16 pair for vdpbf16ps, a float for FMA) per x row and adds into MR x P fp32
// accumulators of 16 output columns each: no horizontal reductions, and each weight load feeds MR
// multiply-adds, each x broadcast P. The whole packed W is one sequential stream (panel after panel), which
// the hardware prefetcher follows; with several row tiles, a panel is consumed in K chunks small enough
// for L1 so that tiles after the first re-read it from cache, not memory. The kernel also prefetches the
// stream into L2 itself (from 6 rows on all of it, spread over the tiles, so that memory keeps streaming
// while the FMAs run: there it is compute-bound about as much as memory-bound).
// Measured on one Zen 4 core (benchmarks/blocked_linear.py, Llama layer stacks): P = 4 (NB = 64) is the best
// all-rounder; against oneDNN's prepacked matmul about 1.55-1.6x at 8 rows and 1.13-1.24x at 32, and at 1-2
// rows 1.15-1.6x the row-major kernel (cpu_linear.cpp).
// x is first packed (per row tile, step-major: xs[s][m]) so the kernel addresses it with one pointer.
// Compiled by memfit/llm/kernels/build.py with -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -fopenmp.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <utility>
#include <vector>

#include "silu_table.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

#ifndef BLK_CHUNK_BYTES
#define BLK_CHUNK_BYTES 16384  // bytes of one panel's K chunk (several row tiles): fits L1 with the x chunk
#endif
// Software prefetch of the weight stream into L2, PF_BYTES ahead. From PF_MIN_ROWS rows on, every line
// (split over the row tiles): measured on Zen 4 it gains 15-30% there, where without it memory sits idle
// while the FMAs run. Below, the first line of each step only (a quarter of the lines at NB = 64): it
// keeps the hardware prefetchers ahead, +5-10%, where prefetching every line costs up to 25%.
// Into L2 (T1) below PF_L1_ROWS rows; from there on into L1 (T0): with many row tiles each chunk is re-read
// from L1 several times and the stream has time to arrive. benchmarks/blocked_linear.py at 32 rows, one Zen 4
// thread: 0.5b stack bf16 101 -> 107 GMAC/s, fp32 51 -> 54 with T0. While choosing the threshold (a C loop
// over the packed 0.5b stack, not kept) T0 tied T1 at 20-24 rows and lost 20-35% at 6-16, where the
// prefetched lines evict the chunk still being read.
constexpr int64_t PF_BYTES = 32768;
constexpr int64_t PF_MIN_ROWS = 6;
constexpr int64_t PF_L1_ROWS = 24;

// The two element types. S: what one step broadcasts per x row (a bf16 pair as 32 bits, or a float);
// SPAN: K elements per step; fma: 16 fp32 lanes += w * broadcast(s).
struct BF16 {
    using T = uint16_t;
    using S = uint32_t;
    static constexpr int SPAN = 2;
    static inline __m512 fma(__m512 acc, __m512i w, __m512i xb) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)xb); }
    static inline __m512i bcast(const S* p) { return _mm512_set1_epi32((int)*p); }
    static inline __m512i load(const T* p) { return _mm512_loadu_si512(p); }
    static constexpr int LANES = 32;  // weight elements per register
    using W = __m512i;
};

struct F32 {
    using T = float;
    using S = float;
    static constexpr int SPAN = 1;
    static inline __m512 fma(__m512 acc, __m512 w, __m512 xb) { return _mm512_fmadd_ps(w, xb, acc); }
    static inline __m512 bcast(const S* p) { return _mm512_set1_ps(*p); }
    static inline __m512 load(const T* p) { return _mm512_loadu_ps(p); }
    static constexpr int LANES = 16;
    using W = __m512;
};

#include "bf16x16.h"
#include "omp_split.h"  // for_runs: one contiguous run of panels per thread, so each streams its part of W

// Row m's step-s broadcast value read straight from x (run_large): the bf16 pair (p[0], p[1]) or the float.
template <typename E> inline auto bcast_at(const typename E::T* p);
template <> inline auto bcast_at<BF16>(const uint16_t* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32((int)v);
}
template <> inline auto bcast_at<F32>(const float* p) { return _mm512_set1_ps(*p); }

// One row tile: MR x rows against P registers of a panel (w: [step][P * LANES]) for `steps` steps; acc
// (ld = 16 P floats) holds the running sums (zero first when `first`). x: packed step-major (xs:
// [step][MR], run), or DIRECT: row m's step-s value at x + m * ldx + s * SPAN (run_large).
template <typename E, int MR, int P, bool L1, bool DIRECT>
inline void tile(const void* x, int64_t ldx, const typename E::T* __restrict w, int64_t steps, float* __restrict acc,
                 bool first, const char* pf, int64_t pf_stride, int pf_lines) {
    constexpr int NB = 16 * P;
    const typename E::S* xs = (const typename E::S*)x;
    const typename E::T* xd = (const typename E::T*)x;
    __m512 a[MR][P];
    _Pragma("GCC unroll 16")
    for (int m = 0; m < MR; m++)
        _Pragma("GCC unroll 4")
        for (int j = 0; j < P; j++) a[m][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * NB + j * 16);
    for (int64_t s = 0; s < steps; s++) {
        for (int l = 0; l < pf_lines; l++) _mm_prefetch(pf + l * 64, L1 ? _MM_HINT_T0 : _MM_HINT_T1);
        pf += pf_stride;
        typename E::W wv[P];
        _Pragma("GCC unroll 4")
        for (int j = 0; j < P; j++) wv[j] = E::load(w + j * E::LANES);
        _Pragma("GCC unroll 16")
        for (int m = 0; m < MR; m++) {
            const auto xb = DIRECT ? bcast_at<E>(xd + m * ldx) : E::bcast(xs + m);
            _Pragma("GCC unroll 4")
            for (int j = 0; j < P; j++) a[m][j] = E::fma(a[m][j], wv[j], xb);
        }
        if (DIRECT) xd += E::SPAN;
        else xs += MR;
        w += P * E::LANES;
    }
    _Pragma("GCC unroll 16")
    for (int m = 0; m < MR; m++)
        _Pragma("GCC unroll 4")
        for (int j = 0; j < P; j++) _mm512_storeu_ps(acc + m * NB + j * 16, a[m][j]);
}

template <int P> constexpr int mr_max() { return P == 2 ? 12 : P == 3 ? 8 : 6; }

using TileFn = void (*)(const void*, int64_t, const void*, int64_t, float*, bool, const char*, int64_t, int);

template <typename E, int MR, int P, bool L1, bool DIRECT>
void tile_erased(const void* x, int64_t ldx, const void* w, int64_t steps, float* acc, bool first, const char* pf,
                 int64_t pf_stride, int pf_lines) {
    tile<E, MR, P, L1, DIRECT>(x, ldx, (const typename E::T*)w, steps, acc, first, pf, pf_stride, pf_lines);
}

template <typename E, int P, bool L1, bool DIRECT, int... MRs>
constexpr TileFn pick(int mr, std::integer_sequence<int, MRs...>) {
    TileFn fns[] = {tile_erased<E, MRs + 1, P, L1, DIRECT>...};
    return fns[mr - 1];
}

// The tile kernel for mr rows; l1: prefetch into L1 rather than L2 (see PF_L1_ROWS); direct: x in place.
template <typename E, int P>
TileFn tile_fn(int mr, bool l1, bool direct = false) {
    constexpr auto mrs = std::make_integer_sequence<int, mr_max<P>()>{};
    if (direct) return pick<E, P, true, true>(mr, mrs);  // run_large: many tiles re-read each chunk from L1
    return l1 ? pick<E, P, true, false>(mr, mrs) : pick<E, P, false, false>(mr, mrs);
}

// xs for one row tile of mr rows: xs[s * mr + m] = the step-s broadcast value of row m.
inline void pack_x(const uint16_t* x, int64_t ldx, int64_t K, int mr, uint32_t* xs) {
    const int64_t full = K / 2, steps = (K + 1) / 2;
    for (int m = 0; m < mr; m++) {
        const uint16_t* r = x + m * ldx;
        for (int64_t s = 0; s < full; s++) {
            uint32_t v;
            memcpy(&v, r + 2 * s, 4);
            xs[s * mr + m] = v;
        }
        if (steps > full) xs[full * mr + m] = r[K - 1];  // odd K: the pair's second half is 0
    }
}

inline void pack_x(const float* x, int64_t ldx, int64_t K, int mr, float* xs) {
    for (int m = 0; m < mr; m++)
        for (int64_t s = 0; s < K; s++) xs[s * mr + m] = x[m * ldx + s];
}

inline void store_row(uint16_t* y, __m512 v, __mmask16 mk) { _mm256_mask_storeu_epi16(y, mk, to_bf16(v)); }
inline void store_row(float* y, __m512 v, __mmask16 mk) { _mm512_mask_storeu_ps(y, mk, v); }
inline __m512 load_bias(const uint16_t* b, __mmask16 mk) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, b)), 16));
}
inline __m512 load_bias(const float* b, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, b); }

// Row tiles: M rows split into ceil(M / MRMAX) tiles of near-equal size.
struct Tiles {
    int n = 0;
    std::vector<int64_t> r0;
    std::vector<int> mr;
};

// acc (rows, NB) + bias -> y[:rows, n0 : n0 + NB] (ldy), masked at the N tail.
template <typename T, int P>
void store_panel(const float* acc, const T* b, T* y, int64_t ldy, int64_t rows, int64_t n0, int64_t N) {
    constexpr int NB = 16 * P;
    for (int j = 0; j < P; j++) {
        const int64_t left = N - (n0 + j * 16);
        if (left <= 0) break;
        const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        const __m512 bv = b ? load_bias(b + n0 + j * 16, mk) : _mm512_setzero_ps();
        for (int64_t m = 0; m < rows; m++)
            store_row(y + m * ldy + n0 + j * 16, _mm512_add_ps(_mm512_loadu_ps(acc + m * NB + j * 16), bv), mk);
    }
}

template <typename E, int P>
void run(const typename E::T* x, int64_t ldx, const typename E::T* wp, const typename E::T* b, typename E::T* y,
         int64_t ldy, int64_t M, int64_t N, int64_t K, int nthreads) {
    using T = typename E::T;
    using S = typename E::S;
    constexpr int NB = 16 * P, MRX = mr_max<P>();
    const int64_t steps = (K + E::SPAN - 1) / E::SPAN;
    const int64_t panels = (N + NB - 1) / NB;
    const int64_t panel_elems = steps * NB * E::SPAN;
    Tiles t;
    t.n = (int)((M + MRX - 1) / MRX);
    for (int i = 0, r = 0; i < t.n; i++) {
        const int mr = (int)((M - r) / (t.n - i) + ((M - r) % (t.n - i) != 0));
        t.r0.push_back(r);
        t.mr.push_back(mr);
        r += mr;
    }
    // x packed per tile: tile i's block starts at r0[i] * steps (step-major inside).
    std::vector<S> xs((size_t)(M * steps));
    for (int i = 0; i < t.n; i++) pack_x(x + t.r0[i] * ldx, ldx, K, t.mr[i], xs.data() + t.r0[i] * steps);
    std::vector<TileFn> fns;
    for (int i = 0; i < t.n; i++) fns.push_back(tile_fn<E, P>(t.mr[i], M >= PF_L1_ROWS));
    // K chunk: the whole K for a single tile (nothing is re-read), else steps of BLK_CHUNK_BYTES of weight.
    const int64_t chunk = t.n == 1 ? steps : (int64_t)(BLK_CHUNK_BYTES / (NB * E::SPAN * sizeof(T))) > 0
                                                  ? (int64_t)(BLK_CHUNK_BYTES / (NB * E::SPAN * sizeof(T))) : 1;

    const int64_t pf_bytes = PF_BYTES;
    auto work = [&](int64_t p0, int64_t p1) {
        std::vector<float> acc((size_t)(M * NB));
        for (int64_t p = p0; p < p1; p++) {
            const T* w = wp + p * panel_elems;
            for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
                const int64_t cs = steps - c0 < chunk ? steps - c0 : chunk;
                // Software prefetch: the bytes pf_bytes ahead of this chunk, split over the tiles so that
                // memory keeps streaming while later tiles re-read the chunk from L1.
                const T* wc = w + c0 * NB * E::SPAN;
                const int64_t cbytes = cs * NB * E::SPAN * (int64_t)sizeof(T), share = cbytes / t.n;
                const int64_t stride = share / cs;
                const int lines = !pf_bytes ? 0 : M >= PF_MIN_ROWS ? (int)((stride + 63) / 64) : 1;
                for (int i = 0; i < t.n; i++)
                    fns[i](xs.data() + t.r0[i] * steps + c0 * t.mr[i], 0, wc, cs, acc.data() + t.r0[i] * NB, c0 == 0,
                           (const char*)wc + pf_bytes + i * share, stride, lines);
            }
            store_panel<T, P>(acc.data(), b, y, ldy, M, p * NB, N);
        }
    };
    for_runs(panels, nthreads, work);
}

#include "blocked_large.h"  // run_large, run_large_silu: the many-row path

template <typename E>
int linear(const typename E::T* x, int64_t ldx, const typename E::T* wp, const typename E::T* b, typename E::T* y,
           int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t nb, int nthreads) {
    if (M < 0 || N < 0 || K < 0) return -1;
    if (M == 0 || N == 0) return 0;
    if (K == 0) {  // no products: y = b (or 0)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * ldy + n] = b ? b[n] : (typename E::T)0;
        return 0;
    }
    // Many rows: x in place, blocked over M (run_large); an odd bf16 K keeps the packed path, whose padded
    // last step reads no element past a row's end.
    if (M >= large_m() && K % E::SPAN == 0) {
        switch (nb) {
            case 32: run_large<E, 2>(x, ldx, wp, b, y, ldy, M, N, K, nthreads); return 0;
            case 48: run_large<E, 3>(x, ldx, wp, b, y, ldy, M, N, K, nthreads); return 0;
            case 64: run_large<E, 4>(x, ldx, wp, b, y, ldy, M, N, K, nthreads); return 0;
            default: return -2;
        }
    }
    switch (nb) {
        case 32: run<E, 2>(x, ldx, wp, b, y, ldy, M, N, K, nthreads); return 0;
        case 48: run<E, 3>(x, ldx, wp, b, y, ldy, M, N, K, nthreads); return 0;
        case 64: run<E, 4>(x, ldx, wp, b, y, ldy, M, N, K, nthreads); return 0;
        default: return -2;
    }
}

inline bool nb_ok(int64_t nb) { return nb == 32 || nb == 48 || nb == 64; }

// Packed <-> row-major, panel by panel: out[p][s][c][e] = W[p * nb + c][s * span + e] (0 past N or K).
// Inside a panel, a step touches nb rows at span elements each; those rows' cache lines stay in L1 for the
// following steps, so W is read about once.
template <typename T>
void pack(const T* w, int64_t ldw, T* out, int64_t N, int64_t K, int64_t nb, int span) {
    const int64_t steps = (K + span - 1) / span, panels = (N + nb - 1) / nb;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t s = 0; s < steps; s++)
            for (int64_t c = 0; c < nb; c++) {
                const int64_t n = p * nb + c;
                for (int e = 0; e < span; e++) {
                    const int64_t k = s * span + e;
                    *out++ = n < N && k < K ? w[n * ldw + k] : (T)0;
                }
            }
}

template <typename T>
void unpack(const T* packed, T* w, int64_t N, int64_t K, int64_t nb, int span) {
    const int64_t steps = (K + span - 1) / span, panels = (N + nb - 1) / nb;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t s = 0; s < steps; s++)
            for (int64_t c = 0; c < nb; c++) {
                const int64_t n = p * nb + c;
                for (int e = 0; e < span; e++, packed++) {
                    const int64_t k = s * span + e;
                    if (n < N && k < K) w[n * K + k] = *packed;
                }
            }
}

}  // namespace

extern "C" {

int memfit_blocked_abi_version(void) { return 1; }

// y[i] = to_bf16(x[i]) for n floats (bf16x16.h's rounding, which every bf16 store of these kernels runs; tests).
void memfit_bf16_round(const float* x, uint16_t* y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i*)(y + i), to_bf16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1u);
        _mm256_mask_storeu_epi16(y + i, mk, to_bf16(_mm512_maskz_loadu_ps(mk, x + i)));
    }
}

// Rows from which the many-row path runs (for benchmarks comparing the two paths); returns the old value.
int64_t memfit_blocked_set_large_m(int64_t m) {
    const int64_t old = g_large_m;
    if (m > 0) g_large_m = m;
    return old;
}

// The many-row path's row blocks for M rows of K (large_blocks): writes up to `cap` first rows and M into
// `starts`; returns how many values it has (blocks + 1), or -1 for a bad nb. For tests.
int64_t memfit_blocked_row_blocks(int64_t M, int64_t K, int64_t nb, int is_bf16, int64_t* starts, int64_t cap) {
    if (!nb_ok(nb) || M < 1 || K < 1) return -1;
    std::vector<int64_t> b;
    if (is_bf16)
        b = nb == 32 ? large_blocks<BF16, 2>(M, K) : nb == 48 ? large_blocks<BF16, 3>(M, K) : large_blocks<BF16, 4>(M, K);
    else
        b = nb == 32 ? large_blocks<F32, 2>(M, K) : nb == 48 ? large_blocks<F32, 3>(M, K) : large_blocks<F32, 4>(M, K);
    for (size_t i = 0; i < b.size() && (int64_t)i < cap; i++) starts[i] = b[i];
    return (int64_t)b.size();
}

// Elements (bf16 or fp32) of the packed form of an (N, K) weight with panels of nb columns; -1: bad nb.
int64_t memfit_blocked_packed_elems(int64_t N, int64_t K, int64_t nb, int is_bf16) {
    if (!nb_ok(nb) || N < 0 || K < 0) return -1;
    const int span = is_bf16 ? 2 : 1;
    return ((N + nb - 1) / nb) * ((K + span - 1) / span) * nb * span;
}

// w: row-major (N, K) with row stride ldw; out: memfit_blocked_packed_elems(...) elements. 0, or -1: bad nb.
int memfit_blocked_pack_bf16(const uint16_t* w, int64_t ldw, uint16_t* out, int64_t N, int64_t K, int64_t nb) {
    if (!nb_ok(nb)) return -1;
    pack(w, ldw, out, N, K, nb, 2);
    return 0;
}

int memfit_blocked_pack_f32(const float* w, int64_t ldw, float* out, int64_t N, int64_t K, int64_t nb) {
    if (!nb_ok(nb)) return -1;
    pack(w, ldw, out, N, K, nb, 1);
    return 0;
}

// The inverse: packed -> contiguous row-major (N, K).
int memfit_blocked_unpack_bf16(const uint16_t* packed, uint16_t* w, int64_t N, int64_t K, int64_t nb) {
    if (!nb_ok(nb)) return -1;
    unpack(packed, w, N, K, nb, 2);
    return 0;
}

int memfit_blocked_unpack_f32(const float* packed, float* w, int64_t N, int64_t K, int64_t nb) {
    if (!nb_ok(nb)) return -1;
    unpack(packed, w, N, K, nb, 1);
    return 0;
}

// y (M, N; row stride ldy) = x (M, K; row stride ldx) W^T + b, W packed with panels of nb columns; b may be
// NULL. bf16 values as uint16_t, fp32 accumulation. Returns 0, or a negative code for bad arguments.
int memfit_blocked_linear_bf16(const uint16_t* x, int64_t ldx, const uint16_t* wp, const uint16_t* b, uint16_t* y,
                               int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t nb, int nthreads) {
    return linear<BF16>(x, ldx, wp, b, y, ldy, M, N, K, nb, nthreads);
}

int memfit_blocked_linear_f32(const float* x, int64_t ldx, const float* wp, const float* b, float* y, int64_t ldy,
                              int64_t M, int64_t N, int64_t K, int64_t nb, int nthreads) {
    return linear<F32>(x, ldx, wp, b, y, ldy, M, N, K, nb, nthreads);
}

// The MLP's gate/up matmul with SiLU(gate) * up in its store, for calls of BLK_LARGE_M rows or more (the rows the
// unfused call runs in run_large): W (2I, K) packed by memfit_blocked_pack_bf16, rows [0, I) the gate, [I, 2I) the
// up; y (M, I; row stride ldy) = SiLU(x Wg^T + bg) * (x Wu^T + bu), each rounded to bf16 where the unfused path
// (memfit_blocked_linear_bf16 into (M, 2I), then cpu_decode.cpp's silu_mul) rounds it: the same bits, with no
// (M, 2I) output. 0; -1: bad arguments; -2: bad nb; -6: I not a multiple of nb; -7: fewer than BLK_LARGE_M rows
// or an odd K (the unfused call runs another kernel there: call it instead).
int memfit_blocked_linear_silu_bf16(const uint16_t* x, int64_t ldx, const uint16_t* wp, const uint16_t* b, uint16_t* y,
                                    int64_t ldy, int64_t M, int64_t I, int64_t K, int64_t nb, int nthreads) {
    if (M < 0 || I < 0 || K <= 0 || ldx < K || ldy < I) return -1;
    if (!nb_ok(nb)) return -2;
    if (I % nb) return -6;
    if (M < large_m() || K % 2) return -7;
    if (I == 0) return 0;
    switch (nb) {
        case 32: run_large_silu<2>(x, ldx, wp, b, y, ldy, M, I, K, nthreads); return 0;
        case 48: run_large_silu<3>(x, ldx, wp, b, y, ldy, M, I, K, nthreads); return 0;
        default: run_large_silu<4>(x, ldx, wp, b, y, ldy, M, I, K, nthreads); return 0;
    }
}

// The attention's q/k/v matmul with the rotary embedding in its store (run_large_rope, blocked_large.h): y (M, N;
// row stride ldy) = x W^T + b, its first rot_cols columns (q's and k's heads of 64) rotated by row m's cos/sin
// (bf16 rows of 64, stride ldc; sin signed as models/llama.py's RopeAt folds it): the bits of
// memfit_blocked_linear_bf16 followed by cpu_decode.cpp's memfit_rope_bf16 over those columns. 0; -1: bad
// arguments; -7: not this kernel's case (nb other than 64, rot_cols not whole panels or past N, fewer than
// BLK_LARGE_M rows, an odd K): the caller runs the two calls instead.
int memfit_blocked_linear_rope_bf16(const uint16_t* x, int64_t ldx, const uint16_t* wp, const uint16_t* b, uint16_t* y,
                                    int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t nb, int nthreads,
                                    const uint16_t* cos, const uint16_t* sin, int64_t ldc, int64_t rot_cols) {
    if (M < 0 || N < 0 || K <= 0 || ldx < K || ldy < N || !cos || !sin || ldc < 64) return -1;
    if (nb != 64 || rot_cols < 0 || rot_cols % 64 || rot_cols > N || M < large_m() || K % 2) return -7;
    if (M == 0 || N == 0) return 0;
    run_large_rope(x, ldx, wp, b, y, ldy, M, N, K, nthreads, cos, sin, ldc, rot_cols);
    return 0;
}

}  // extern "C"
