// A whole decode step through every decoder layer in one call: memfit's CPU fast path for decode batches,
// over weights held by either of memfit's matmul kernels (cpu_blocked.cpp, or cpu_linear.cpp's row-major one).
//
// Why: at batch 1 the model's matmuls read the weights at ~90% of the machine's bandwidth, and what is left
// of a 0.1B model's step is the ~15 PyTorch calls per layer between them (~170 us per layer of Python and
// dispatch, measured: 2 of an 11 ms step); larger batches pay the same glue once per step. This file composes the same kernels the PyTorch path calls one by
// one (cpu_decode.cpp, cpu_linear.cpp), in the same order with the same rounding, so both paths give the
// same tokens; it only removes the glue. Layer l:
//   residual, h = add_rms_norm(x, residual)      (layer 0: residual = x)
//   q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv;  rope(q, k);  K/V rows -> the cache at each row's position
//   (the virtual cache's slots, or the paged cache's blocks through the block table)
//   x = attention(q, cache) Wo^T + bo;  residual, h = add_rms_norm(x, residual)
//   x = (silu(h Wg^T + bg) * (h Wu^T + bu)) Wd^T + bd
// and the output is rms_norm(x + residual) with the final norm's weight.
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <vector>

extern "C" {
void memfit_linear_bf16(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t,
                        int64_t, int);
void memfit_linear_f32(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int);
int memfit_blocked_linear_bf16(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t,
                               int64_t, int64_t, int64_t, int);
int memfit_blocked_linear_f32(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int);
void memfit_rmsnorm_bf16(const uint16_t*, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t, const uint16_t*, float,
                         uint16_t*, int64_t, int64_t, int64_t);
void memfit_rmsnorm_f32(const float*, int64_t, const float*, int64_t, float*, int64_t, const float*, float, float*,
                        int64_t, int64_t, int64_t);
void memfit_rope_bf16(uint16_t*, int64_t, int, uint16_t*, int64_t, int, int, const uint16_t*, const uint16_t*, int64_t,
                      int64_t);
void memfit_rope_f32(float*, int64_t, int, float*, int64_t, int, int, const float*, const float*, int64_t, int64_t);
void memfit_silu_mul_bf16(const uint16_t*, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t, int64_t, int64_t);
void memfit_silu_mul_f32(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);
void memfit_decode_attn_bf16(const uint16_t*, int64_t, uint16_t*, uint16_t*, const int64_t*, const int64_t*,
                             const int64_t*, const int64_t*, int64_t, int, int, int, int64_t, float, uint16_t*, int64_t,
                             const uint16_t*, const uint16_t*, int64_t, int);
void memfit_decode_attn_f32(const float*, int64_t, float*, float*, const int64_t*, const int64_t*, const int64_t*,
                            const int64_t*, int64_t, int, int, int, int64_t, float, float*, int64_t, const float*,
                            const float*, int64_t, int);
void memfit_paged_attn_bf16(const uint16_t*, int64_t, uint16_t*, uint16_t*, const int64_t*, const int64_t*,
                            const int64_t*, int64_t, int64_t, const int64_t*, int64_t, int, int, int, int64_t, float,
                            uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, int);
void memfit_paged_attn_f32(const float*, int64_t, float*, float*, const int64_t*, const int64_t*, const int64_t*,
                           int64_t, int64_t, const int64_t*, int64_t, int, int, int, int64_t, float, float*, int64_t,
                           const float*, const float*, int64_t, int);
}

namespace memfit_stack {

template <typename T>
struct Api;
template <>
struct Api<uint16_t> {
    static constexpr auto linear = memfit_linear_bf16;
    static constexpr auto blocked = memfit_blocked_linear_bf16;
    static constexpr auto rmsnorm = memfit_rmsnorm_bf16;
    static constexpr auto rope = memfit_rope_bf16;
    static constexpr auto silu_mul = memfit_silu_mul_bf16;
    static constexpr auto attn = memfit_decode_attn_bf16;
    static constexpr auto paged_attn = memfit_paged_attn_bf16;
};
template <>
struct Api<float> {
    static constexpr auto linear = memfit_linear_f32;
    static constexpr auto blocked = memfit_blocked_linear_f32;
    static constexpr auto rmsnorm = memfit_rmsnorm_f32;
    static constexpr auto rope = memfit_rope_f32;
    static constexpr auto silu_mul = memfit_silu_mul_f32;
    static constexpr auto attn = memfit_decode_attn_f32;
    static constexpr auto paged_attn = memfit_paged_attn_f32;
};

}  // namespace memfit_stack

extern "C" {

// One layer's tensors (data pointers; a bias may be NULL). Field order is mirrored by kernels/stack.py.
// Fused projections (models/fusion.py): wq/bq hold q|k|v and wg/bg gate|up, with wk, wv and wu NULL.
struct MemfitLayer {
    const void *ln1, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo, *ln2, *wg, *bg, *wu, *bu, *wd, *bd;
    void *kcache, *vcache;  // this layer's K and V, element (slot 0, token 0, head 0, 0), or the paged pools' block 0
};

struct MemfitStep {
    int64_t M, C, Hq, Hkv, D, I, window;  // rows; hidden; heads; KV heads; head dim; MLP width; 0 = no window
    float eps, scale;
    int nthreads;
    int64_t blocked_nb;          // 0: weights row-major (N, K) for cpu_linear.cpp; else packed by cpu_blocked.cpp
    const int64_t *ks, *vs;      // cache strides (slot, token, head), in elements
    const int64_t *slots, *lens;  // (M,): each row's cache slot, and its length including the new token
    const void *cos, *sin;       // (M, D) rotary rows at each row's position (sin with rotate-half's sign)
    const void* final_norm;      // (C,)
    // The paged cache (cpu_paged.cpp): tables non-NULL, (M, ldt) block ids per row; ks/vs are then the pools'
    // (block, token, head) strides and slots is unused.
    const int64_t* tables;
    int64_t ldt, block_size;
    // Nonzero: rows may be consecutive positions of one sequence (speculative verification: a sequence's last
    // token and its drafts, lens ascending). Every row's K/V is then written to the cache before any row
    // attends, so row j reads rows < j of its sequence: causal within the chunk. 0: one row per sequence, each
    // writing its own K/V inside the attention call (the decode step).
    int64_t kv_first;
};

}  // extern "C"

namespace memfit_stack {

// y (M, N) = x (M, K) W^T + b through whichever kernel holds the model's weights.
template <typename T>
inline void matmul(const MemfitStep* s, const T* x, int64_t ldx, const void* w, const void* b, T* y, int64_t N, int64_t K) {
    if (s->blocked_nb)
        Api<T>::blocked(x, ldx, (const T*)w, (const T*)b, y, N, s->M, N, K, s->blocked_nb, s->nthreads);
    else
        Api<T>::linear(x, ldx, (const T*)w, (const T*)b, y, N, s->M, N, K, s->nthreads);
}

// Every row's new K/V (k, v: (M, Hkv*D) with row stride ldkv, after RoPE) into the cache at position lens[b] - 1,
// through the row's slot or its block-table row, as the attention kernels address them.
template <typename T>
void write_kv(const MemfitStep* s, const MemfitLayer& L, const T* k, const T* v, int64_t ldkv) {
    const int64_t D = s->D, *ks = s->ks, *vs = s->vs;
    for (int64_t b = 0; b < s->M; b++) {
        const int64_t p = s->lens[b] - 1;
        T* kd = (T*)L.kcache;
        T* vd = (T*)L.vcache;
        if (s->tables) {
            const int64_t blk = s->tables[b * s->ldt + p / s->block_size], off = p % s->block_size;
            kd += blk * ks[0] + off * ks[1], vd += blk * vs[0] + off * vs[1];
        } else {
            kd += s->slots[b] * ks[0] + p * ks[1], vd += s->slots[b] * vs[0] + p * vs[1];
        }
        for (int64_t h = 0; h < s->Hkv; h++) {
            memcpy(kd + h * ks[2], k + b * ldkv + h * D, D * sizeof(T));
            memcpy(vd + h * vs[2], v + b * ldkv + h * D, D * sizeof(T));
        }
    }
}

template <typename T>
void run(const MemfitStep* s, const MemfitLayer* layers, int nlayers, T* x, T* out) {
    using A = Api<T>;
    const int64_t M = s->M, C = s->C, D = s->D, I = s->I, Hq = s->Hq, Hkv = s->Hkv;
    const int64_t QD = Hq * D, KD = Hkv * D;
    static thread_local std::vector<T> buf;
    buf.resize((size_t)(M * (3 * C + QD + 2 * KD + QD + 3 * I)));
    T* resid = buf.data();
    T* h = resid + M * C;
    T* xx = h + M * C;  // the running block output (x, layer by layer)
    T* qkv = xx + M * C;  // q, k, v: three (M, *) blocks, or one fused (M, QD + 2 KD) matmul output
    T* att = qkv + M * (QD + 2 * KD);
    T* gu = att + M * QD;  // gate, up: two (M, I) blocks, or one fused (M, 2 I) output
    T* act = gu + 2 * M * I;
    const T* cur = x;  // layer 0 reads the embeddings
    for (int l = 0; l < nlayers; l++) {
        const MemfitLayer& L = layers[l];
        // residual (+)= x, h = norm(residual): rmsnorm reads a whole row before it writes r_out, so in place is safe
        A::rmsnorm(cur, C, l ? resid : nullptr, C, resid, C, (const T*)L.ln1, s->eps, h, C, M, C);
        T *q, *k, *v;
        int64_t ldq, ldkv;
        if (L.wk) {  // separate projections
            q = qkv, k = q + M * QD, v = k + M * KD, ldq = QD, ldkv = KD;
            matmul<T>(s, h, C, L.wq, L.bq, q, QD, C);
            matmul<T>(s, h, C, L.wk, L.bk, k, KD, C);
            matmul<T>(s, h, C, L.wv, L.bv, v, KD, C);
        } else {  // wq holds q/k/v fused (models/fusion.py): column slices of one output
            q = qkv, k = q + QD, v = k + KD, ldq = ldkv = QD + 2 * KD;
            matmul<T>(s, h, C, L.wq, L.bq, qkv, QD + 2 * KD, C);
        }
        A::rope(q, ldq, (int)Hq, k, ldkv, (int)Hkv, (int)D, (const T*)s->cos, (const T*)s->sin, D, M);
        // The new token's K/V rows go into the cache inside the attention call, or all of them first (kv_first).
        if (s->kv_first) write_kv<T>(s, L, k, v, ldkv);
        const T* k_new = s->kv_first ? nullptr : k;
        const T* v_new = s->kv_first ? nullptr : v;
        if (s->tables)
            A::paged_attn(q, ldq, (T*)L.kcache, (T*)L.vcache, s->ks, s->vs, s->tables, s->ldt, s->block_size, s->lens,
                          M, (int)Hq, (int)Hkv, (int)D, s->window, s->scale, att, QD, k_new, v_new, ldkv, s->nthreads);
        else
            A::attn(q, ldq, (T*)L.kcache, (T*)L.vcache, s->ks, s->vs, s->slots, s->lens, M, (int)Hq, (int)Hkv, (int)D,
                    s->window, s->scale, att, QD, k_new, v_new, ldkv, s->nthreads);
        matmul<T>(s, att, QD, L.wo, L.bo, xx, C, QD);
        A::rmsnorm(xx, C, resid, C, resid, C, (const T*)L.ln2, s->eps, h, C, M, C);
        if (L.wu) {
            matmul<T>(s, h, C, L.wg, L.bg, gu, I, C);
            matmul<T>(s, h, C, L.wu, L.bu, gu + M * I, I, C);
            A::silu_mul(gu, I, gu + M * I, I, act, I, M, I);
        } else {  // wg holds gate/up fused
            matmul<T>(s, h, C, L.wg, L.bg, gu, 2 * I, C);
            A::silu_mul(gu, 2 * I, gu + I, 2 * I, act, I, M, I);
        }
        matmul<T>(s, act, I, L.wd, L.bd, xx, C, I);
        cur = xx;
    }
    A::rmsnorm(cur, C, nlayers ? resid : nullptr, C, nullptr, C, (const T*)s->final_norm, s->eps, out, C, M, C);
}

}  // namespace memfit_stack

extern "C" {

// x: (M, C) token embeddings; out: (M, C) final hidden states (after the model's last norm).
void memfit_decode_stack_bf16(const MemfitStep* s, const MemfitLayer* layers, int nlayers, uint16_t* x, uint16_t* out) {
    memfit_stack::run<uint16_t>(s, layers, nlayers, x, out);
}
void memfit_decode_stack_f32(const MemfitStep* s, const MemfitLayer* layers, int nlayers, float* x, float* out) {
    memfit_stack::run<float>(s, layers, nlayers, x, out);
}

}  // extern "C"
