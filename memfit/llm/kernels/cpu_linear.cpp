// memfit's CPU decode matmul: y = x W^T (+ b), W row-major (N, K), x (M, K) with row stride ldx,
// y (M, N) with row stride ldy; bf16 or fp32 in and out, fp32 accumulation, bf16 stored with
// round-to-nearest-even.
//
// Why row-sequential: at decode sizes (M = a few rows) the matmul is a pure read of W, and the hardware
// prefetcher streams one sequential run far better than several interleaved ones. So each weight row is
// read once, start to end, in 64-element (bf16) or 32-element (fp32) chunks = two cache lines; every chunk
// is applied to up to 8 x rows while it sits in registers, and to the next 8 x rows from L1 after that.
// Compiled by memfit/llm/kernels/build.py with -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -fopenmp.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

#include "bf16.h"

#ifndef RB
#define RB 8  // weight rows per block (M > ROW_MAX)
#endif
#ifndef MBLK
#define MBLK 2  // x rows per block
#endif
#ifndef ROW_MAX
#define ROW_MAX 2  // up to this many x rows: the row-sequential kernel
#endif

// The two element types behind one interface: L elements per 512-bit register, a (masked) load, and the
// fused multiply-add into 16 fp32 lanes (bf16: dot products of element pairs, fp32: plain FMA).
struct BF16 {
    using T = uint16_t;
    using V = __m512bh;
    static constexpr int L = 32;
    static V load(const T* p) { return (V)_mm512_loadu_si512(p); }
    static V load_tail(const T* p, int64_t left) {  // left < L elements; the rest load as 0
        return (V)_mm512_maskz_loadu_epi16((__mmask32)((1u << left) - 1u), p);
    }
    static __m512 fma(__m512 acc, V w, V x) { return _mm512_dpbf16_ps(acc, w, x); }
};

struct F32 {
    using T = float;
    using V = __m512;
    static constexpr int L = 16;
    static V load(const T* p) { return _mm512_loadu_ps(p); }
    static V load_tail(const T* p, int64_t left) { return _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1u), p); }
    static __m512 fma(__m512 acc, V w, V x) { return _mm512_fmadd_ps(w, x, acc); }
};

#include "hsum16.h"

// One weight row against MB x rows (M = 1, 2: bandwidth-bound): out[m] = dot(w[0:K], x[m][0:K]). The row is
// read in chunks of two cache lines, one accumulator per line, so a single x row still has two independent
// chains in flight.
template <typename E, int MB>
inline void row(const typename E::T* x, int64_t ldx, const typename E::T* w, int64_t K, float* out, int64_t ldo) {
    constexpr int L = E::L;
    __m512 a0[MB], a1[MB];
    _Pragma("GCC unroll 8")
    for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 * L <= K; k += 2 * L) {
        const auto w0 = E::load(w + k), w1 = E::load(w + k + L);
        _Pragma("GCC unroll 8")
        for (int m = 0; m < MB; m++) {
            a0[m] = E::fma(a0[m], w0, E::load(x + m * ldx + k));
            a1[m] = E::fma(a1[m], w1, E::load(x + m * ldx + k + L));
        }
    }
    for (; k < K; k += L) {
        const int64_t left = K - k;
        const auto w0 = left >= L ? E::load(w + k) : E::load_tail(w + k, left);
        _Pragma("GCC unroll 8")
        for (int m = 0; m < MB; m++)
            a0[m] = E::fma(a0[m], w0, left >= L ? E::load(x + m * ldx + k) : E::load_tail(x + m * ldx + k, left));
    }
    _Pragma("GCC unroll 8")
    for (int m = 0; m < MB; m++) out[m * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
}

// R consecutive weight rows against MB x rows (compute-bound sizes): each loaded x chunk feeds R FMAs and
// each weight chunk MB, which halves the loads per FMA against `row`. out[m * ldo + r] = dot(w_r, x_m).
template <typename E, int R, int MB>
inline void block(const typename E::T* x, int64_t ldx, const typename E::T* w, int64_t K, float* out, int64_t ldo) {
    constexpr int L = E::L;
    __m512 acc[MB][R];
    _Pragma("GCC unroll 8")
    for (int m = 0; m < MB; m++)
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + L <= K; k += L) {
        typename E::V wv[R];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) wv[r] = E::load(w + r * K + k);
        _Pragma("GCC unroll 8")
        for (int m = 0; m < MB; m++) {
            const auto xv = E::load(x + m * ldx + k);
            _Pragma("GCC unroll 8")
            for (int r = 0; r < R; r++) acc[m][r] = E::fma(acc[m][r], wv[r], xv);
        }
    }
    if (k < K) {
        const int64_t left = K - k;
        typename E::V wv[R];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) wv[r] = E::load_tail(w + r * K + k, left);
        _Pragma("GCC unroll 8")
        for (int m = 0; m < MB; m++) {
            const auto xv = E::load_tail(x + m * ldx + k, left);
            _Pragma("GCC unroll 8")
            for (int r = 0; r < R; r++) acc[m][r] = E::fma(acc[m][r], wv[r], xv);
        }
    }
    if constexpr (R * MB == 16) {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, hsum16(&acc[0][0]));  // tmp[m * R + r]
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < R; r++) out[m * ldo + r] = tmp[m * R + r];
    } else {
        _Pragma("GCC unroll 8")
        for (int m = 0; m < MB; m++)
            _Pragma("GCC unroll 8")
            for (int r = 0; r < R; r++) out[m * ldo + r] = _mm512_reduce_add_ps(acc[m][r]);
    }
}

template <typename E>
inline void row_any(int mb, const typename E::T* x, int64_t ldx, const typename E::T* w, int64_t K, float* out, int64_t ldo) {
    switch (mb) {
        case 1: row<E, 1>(x, ldx, w, K, out, ldo); break;
        case 2: row<E, 2>(x, ldx, w, K, out, ldo); break;
        case 3: row<E, 3>(x, ldx, w, K, out, ldo); break;
        default: row<E, 4>(x, ldx, w, K, out, ldo); break;
    }
}

template <typename E>
inline void block_any(int mb, const typename E::T* x, int64_t ldx, const typename E::T* w, int64_t K, float* out, int64_t ldo) {
    switch (mb) {
        case 1: block<E, RB, 1>(x, ldx, w, K, out, ldo); break;
        case 2: block<E, RB, 2>(x, ldx, w, K, out, ldo); break;
        case 3: block<E, RB, 3>(x, ldx, w, K, out, ldo); break;
        default: block<E, RB, MBLK>(x, ldx, w, K, out, ldo); break;
    }
}

inline void store(uint16_t* y, float v) { *y = f32_to_bf16(v); }
inline void store(float* y, float v) { *y = v; }
inline float bias_at(const uint16_t* b, int64_t n) { return b ? bf16_to_f32(b[n]) : 0.f; }
inline float bias_at(const float* b, int64_t n) { return b ? b[n] : 0.f; }

// Weight rows [n0, n1). M <= ROW_MAX: one row at a time, one sequential stream over W. Larger M: RB rows at
// a time (RB short streams, still read once), the x rows in chunks of MBLK, read from L1/L2.
template <typename E>
void rows(const typename E::T* x, int64_t ldx, const typename E::T* w, const typename E::T* b, typename E::T* y,
          int64_t ldy, int64_t M, int64_t K, int64_t n0, int64_t n1) {
    float out[MBLK * RB];
    int64_t n = n0;
    if (M > ROW_MAX) {
        for (; n + RB <= n1; n += RB) {
            for (int64_t m0 = 0; m0 < M; m0 += MBLK) {
                const int mb = (int)(M - m0 < MBLK ? M - m0 : MBLK);
                block_any<E>(mb, x + m0 * ldx, ldx, w + n * K, K, out, RB);
                for (int m = 0; m < mb; m++)
                    for (int r = 0; r < RB; r++) store(y + (m0 + m) * ldy + n + r, out[m * RB + r] + bias_at(b, n + r));
            }
        }
    }
    for (; n < n1; n++) {
        const float bn = bias_at(b, n);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mb = (int)(M - m0 < 4 ? M - m0 : 4);
            row_any<E>(mb, x + m0 * ldx, ldx, w + n * K, K, out, 1);
            for (int m = 0; m < mb; m++) store(y + (m0 + m) * ldy + n, out[m] + bn);
        }
    }
}

template <typename E>
void linear(const typename E::T* x, int64_t ldx, const typename E::T* w, const typename E::T* b, typename E::T* y,
            int64_t ldy, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M <= 0 || N <= 0) return;
    if (nthreads <= 1) {
        rows<E>(x, ldx, w, b, y, ldy, M, K, 0, N);
        return;
    }
    // One contiguous run of rows per thread (a multiple of RB): each thread still streams sequentially.
#pragma omp parallel num_threads(nthreads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        const int64_t per = ((N + nthreads - 1) / nthreads + RB - 1) / RB * RB;
        const int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
        if (n0 < n1) rows<E>(x, ldx, w, b, y, ldy, M, K, n0, n1);
    }
}

}  // namespace

extern "C" {

int memfit_linear_abi_version(void) { return 1; }

// Pointers are to bf16 values as uint16_t; b may be NULL.
void memfit_linear_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, const uint16_t* b, uint16_t* y, int64_t ldy,
                        int64_t M, int64_t N, int64_t K, int nthreads) {
    linear<BF16>(x, ldx, w, b, y, ldy, M, N, K, nthreads);
}

void memfit_linear_f32(const float* x, int64_t ldx, const float* w, const float* b, float* y, int64_t ldy,
                       int64_t M, int64_t N, int64_t K, int nthreads) {
    linear<F32>(x, ldx, w, b, y, ldy, M, N, K, nthreads);
}

}  // extern "C"
