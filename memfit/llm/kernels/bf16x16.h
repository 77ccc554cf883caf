// 16 floats -> 16 bf16 in registers, shared by memfit's CPU kernels (each .cpp includes it inside its own
// namespace, after <immintrin.h>).
#pragma once

// 16 floats -> 16 bf16 with round-to-nearest-even; NaN stays a quiet NaN (its high half | 0x40); denormals rounded,
// not flushed. In integer ops (to_bf16_sw) every lane costs ~9 instructions; vcvtneps2bf16 does the same in one,
// except that it flushes a denormal input to a signed zero: to_bf16 runs it and falls back to to_bf16_sw for a
// vector holding a denormal (matmul outputs almost never do), so its bits are to_bf16_sw's for every input
// (tests/llm/kernels/test_bf16_round.py checks every denormal, every high half at the rounding boundaries, NaNs).
// One Zen 4 core, the 0.1b prefill matmuls (a /tmp timing loop over the four shapes, not kept): ~0.4% faster.
inline __m256i to_bf16_sw(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

inline __m256i to_bf16(__m512 v) {
    const __m512i a = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));  // |v|'s bits
    // denormal lanes: 0 < |v| < the smallest normal float
    const __mmask16 den = _mm512_mask_cmplt_epu32_mask(_mm512_test_epi32_mask(a, a), a, _mm512_set1_epi32(0x00800000));
    if (__builtin_expect(den != 0, 0)) return to_bf16_sw(v);
    return (__m256i)_mm512_cvtneps_pbh(v);
}
