// Single-token attention read through a block table: memfit's reader for the paged (vLLM-style) KV cache, the
// honest baseline of the virtual cache. It follows the block table in place, as vLLM's paged-attention kernels
// do, with no gather into a contiguous copy; the arithmetic (GQA grouping, vdpbf16ps scores, fp32 softmax,
// threads over (row, KV head)) is attend.h's, shared with the virtual cache's reader (cpu_decode.cpp), so the
// two caches are compared on the same kernel and differ only in how a row's address is found.
//
// Pools: K element (block, i, h, d) is at k + block*ks[0] + i*ks[1] + h*ks[2] + d (V likewise with vs), blocks
// of `block_size` tokens (a power of two). Row b's position p lives in block tables[b*ldt + p / block_size] at
// offset p % block_size. Compiled with the other kernels by build.py.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace memfit_paged {

#include "bf16.h"
#include "exp16.h"
#include "attend.h"
#include "attend_amx.h"

template <typename T, int D>
void paged_attention(const T* q, int64_t ldq, T* k, T* v, const int64_t* ks, const int64_t* vs, const int64_t* tables,
                     int64_t ldt, int64_t block_size, const int64_t* lens, int64_t B, int Hq, int Hkv, int64_t window,
                     float scale, T* out, int64_t ldo, const T* k_new, const T* v_new, int64_t ldn, int nthreads) {
    const int G = Hq / Hkv;
    const int shift = __builtin_ctzll((unsigned long long)block_size);
    const int64_t mask = block_size - 1;
    auto work = [&](int64_t i, std::vector<float>& sc) {
        const int h = (int)(i % Hkv);
        const int64_t b = i / Hkv;
        const int64_t* table = tables + b * ldt;
        const int64_t t1 = lens[b], t0 = window > 0 ? std::max<int64_t>(0, t1 - window) : 0;
        if (k_new) {  // this row's new token, head h, into its block first (each item writes only its own head)
            const int64_t p = t1 - 1, blk = table[p >> shift], off = p & mask;
            memcpy(k + blk * ks[0] + off * ks[1] + h * ks[2], k_new + b * ldn + (int64_t)h * D, D * sizeof(T));
            memcpy(v + blk * vs[0] + off * vs[1] + h * vs[2], v_new + b * ldn + (int64_t)h * D, D * sizeof(T));
        }
        const PagedRows<T> kr{k + h * ks[2], table, ks[0], ks[1], t0, mask, shift};
        const PagedRows<T> vr{v + h * vs[2], table, vs[0], vs[1], t0, mask, shift};
        const int64_t head0 = (int64_t)h * G;
#ifdef MEMFIT_DECODE_AMX
        if constexpr (sizeof(T) == 2 && D % 32 == 0 && D <= 128) {  // as cpu_decode.cpp's attend_one
            if (decode_amx_takes(G, D, ks[1], Hkv, false))  // head by head
                return attend_group_amx<D>(q + b * ldq + head0 * D, kr, vr, t1 - t0, G, scale, out + b * ldo + head0 * D, sc);
        }
#endif
        attend_group<T, D>(q + b * ldq + head0 * D, kr, vr, t1 - t0, G, scale, out + b * ldo + head0 * D, sc);
    };
    // On the tiles too, head by head: every head of a sequence at once (attend_heads_amx over the blocks, tried) was
    // slower (benchmarks/paged_vllm.py's layer, 16-token blocks, one thread: 1 x 8192 tokens 1838 us and 8 x 2048
    // 4245 us with the other jobs paused, where head by head took 1470 and 2724 us in an earlier run beside them),
    // unlike the per-layer layout, where it is the faster.
    run_items(B * Hkv, nthreads, work);
}

// D in HEAD_DIMS (kernels/decode.py checks), G <= 64, block_size a power of two.
template <typename T>
void paged_attention_any(const T* q, int64_t ldq, T* k, T* v, const int64_t* ks, const int64_t* vs,
                         const int64_t* tables, int64_t ldt, int64_t block_size, const int64_t* lens, int64_t B, int Hq,
                         int Hkv, int D, int64_t window, float scale, T* out, int64_t ldo, const T* k_new,
                         const T* v_new, int64_t ldn, int nthreads) {
#define MEMFIT_PAGED_CASE(DIM)                                                                                     \
    case DIM:                                                                                                      \
        paged_attention<T, DIM>(q, ldq, k, v, ks, vs, tables, ldt, block_size, lens, B, Hq, Hkv, window, scale, out, \
                                ldo, k_new, v_new, ldn, nthreads);                                                 \
        break;
    switch (D) {
        MEMFIT_PAGED_CASE(32)
        MEMFIT_PAGED_CASE(64)
        MEMFIT_PAGED_CASE(96)
        MEMFIT_PAGED_CASE(128)
        MEMFIT_PAGED_CASE(256)
        default: break;
    }
#undef MEMFIT_PAGED_CASE
}

}  // namespace memfit_paged

extern "C" {

// Row b of q attends to positions [0, lens[b]) (the last `window` if > 0) of its sequence, found through row b of
// the block table (row stride ldt). k_new/v_new (optional, row stride ldn): each row's new token, written to
// position lens[b] - 1 first.
void memfit_paged_attn_bf16(const uint16_t* q, int64_t ldq, uint16_t* k, uint16_t* v, const int64_t* ks,
                            const int64_t* vs, const int64_t* tables, int64_t ldt, int64_t block_size,
                            const int64_t* lens, int64_t B, int Hq, int Hkv, int D, int64_t window, float scale,
                            uint16_t* out, int64_t ldo, const uint16_t* k_new, const uint16_t* v_new, int64_t ldn,
                            int nthreads) {
    memfit_paged::paged_attention_any(q, ldq, k, v, ks, vs, tables, ldt, block_size, lens, B, Hq, Hkv, D, window,
                                      scale, out, ldo, k_new, v_new, ldn, nthreads);
}
void memfit_paged_attn_f32(const float* q, int64_t ldq, float* k, float* v, const int64_t* ks, const int64_t* vs,
                           const int64_t* tables, int64_t ldt, int64_t block_size, const int64_t* lens, int64_t B,
                           int Hq, int Hkv, int D, int64_t window, float scale, float* out, int64_t ldo,
                           const float* k_new, const float* v_new, int64_t ldn, int nthreads) {
    memfit_paged::paged_attention_any(q, ldq, k, v, ks, vs, tables, ldt, block_size, lens, B, Hq, Hkv, D, window,
                                      scale, out, ldo, k_new, v_new, ldn, nthreads);
}

}  // extern "C"
