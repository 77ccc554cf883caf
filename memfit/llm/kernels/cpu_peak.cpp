// The core's multiply-add peak, measured: a register-only loop of independent FMAs (fp32) or vdpbf16ps
// (bf16), no memory traffic. benchmarks/decode_throughput.py divides a decode step's multiply-adds by it to
// get the compute roof beside the bandwidth roof (at batch 8 a bf16 or fp32 step on this kind of core needs
// about as many seconds for one as for the other). Each thread runs `iters` rounds of 24 independent 16-lane
// accumulations (enough to cover the instructions' latency on Zen 4 / Sapphire Rapids), and the function
// returns the sum of all accumulators so that the caller can check that the work was done:
//   fp32: iters * 24 * 16 * a * b per thread; bf16: iters * 24 * 16 * 2 * a * b per thread.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int ACC = 24;

template <bool BF16>
double run_one(int64_t iters, float a, float b) {
    __m512 acc[ACC];
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_setzero_ps();
    __m512 fa = _mm512_set1_ps(a), fb = _mm512_set1_ps(b);
    // bf16 pairs (a, a) and (b, b) from the floats' top halves (exact when a and b are bf16 values):
    // each vdpbf16ps lane adds a*b twice.
    uint32_t ua, ub;
    memcpy(&ua, &a, 4);
    memcpy(&ub, &b, 4);
    __m512i ba = _mm512_set1_epi32((int)((ua >> 16) * 0x10001u)), bb = _mm512_set1_epi32((int)((ub >> 16) * 0x10001u));
    for (int64_t it = 0; it < iters; it++) {
        _Pragma("GCC unroll 24")
        for (int i = 0; i < ACC; i++) {
            if constexpr (BF16) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)ba, (__m512bh)bb);
            else acc[i] = _mm512_fmadd_ps(fa, fb, acc[i]);
        }
        // Keep the compiler from hoisting or folding the loop body.
        __asm__ volatile("" : "+v"(fa), "+v"(ba));
    }
    double s = 0;
    for (int i = 0; i < ACC; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}

}  // namespace

extern "C" {

// Multiply-adds per call: iters * 24 * 16 (fp32) or iters * 24 * 32 (bf16), per thread.
double memfit_peak_macs(int is_bf16, int64_t iters, float a, float b, int nthreads) {
    double total = 0;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) reduction(+ : total) schedule(static, 1)
    for (int t = 0; t < (nthreads > 0 ? nthreads : 1); t++) total += is_bf16 ? run_one<true>(iters, a, b) : run_one<false>(iters, a, b);
    return total;
}

}  // extern "C"
