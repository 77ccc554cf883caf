// bf16 <-> fp32 for one value, shared by memfit's CPU kernels (each .cpp includes it inside its own
// namespace, so the definitions never collide across translation units).
#pragma once
#include <stdint.h>
#include <string.h>

// Round to nearest even, as PyTorch's float -> bfloat16 conversion; NaN stays a quiet NaN.
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
