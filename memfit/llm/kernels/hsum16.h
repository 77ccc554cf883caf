// Shared by memfit's CPU kernels (each .cpp includes it inside its own namespace, after <immintrin.h>).
#pragma once

// Sixteen horizontal sums at once: lane i of the result = sum of v[i]'s lanes (a transpose-and-add tree,
// 46 instructions instead of 16 separate reductions of 8).
inline __m512 hsum16(const __m512* v) {
    __m512 u[8], w[4], s[2];
    for (int j = 0; j < 8; j++)  // 128-bit blocks: [a0+a2, a1+a3, b0+b2, b1+b3]
        u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44), _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
    for (int j = 0; j < 4; j++)  // block k of w[j] holds source 4j + k's 4 partial sums
        w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0x88), _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0xDD));
    for (int j = 0; j < 2; j++)
        s[j] = _mm512_add_ps(_mm512_unpacklo_ps(w[2 * j], w[2 * j + 1]), _mm512_unpackhi_ps(w[2 * j], w[2 * j + 1]));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x44), _mm512_shuffle_ps(s[0], s[1], 0xEE));
    // lane 4k + l of r holds source 4l + k: put source i in lane i
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(idx, r);
}
