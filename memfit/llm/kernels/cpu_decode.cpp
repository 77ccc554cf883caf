// memfit's CPU kernels for the non-matmul parts of a decode step: RMSNorm (with the residual add fused),
// rotary embedding in place, SiLU(gate) * up, and single-token attention read straight out of the
// virtual-memory KV cache.
//
// Why by hand: at decode sizes each of these is a few microseconds of arithmetic behind ~5-10 PyTorch ops
// of ~1.5-3 us dispatch each (an RMSNorm is 8 ops: 18 us for one 768-wide bf16 row, measured); on a 0.1B
// model that overhead is ~30% of a batch-1 step. The attention kernel reads each sequence's K/V where the
// cache keeps it (contiguous per sequence: the point of vAttention), so it needs no gather, no padded copy
// and no mask, and GQA query heads share each K/V row they read.
//
// Rounding follows the PyTorch reference path (memfit/llm/models/llama.py) step for step: every value the
// reference stores in bf16 is rounded to bf16 (nearest even) at the same point here, so the two paths
// agree to float32 summation order. Compiled together with cpu_linear.cpp by build.py.
#include <cpuid.h>
#include <unistd.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace memfit_decode {

#include "bf16.h"

inline uint16_t to_bf16(float f) { return f32_to_bf16(f); }
inline float from_bf16(uint16_t h) { return bf16_to_f32(h); }

// Scalar load/store/round per element type: `rnd` is the value the reference would hold in that dtype.
inline float ld(const float* p) { return *p; }
inline float ld(const uint16_t* p) { return from_bf16(*p); }
inline void st(float* p, float v) { *p = v; }
inline void st(uint16_t* p, float v) { *p = to_bf16(v); }
inline float rnd(float v, const float*) { return v; }
inline float rnd(float v, const uint16_t*) { return from_bf16(to_bf16(v)); }

// 16 elements as fp32 lanes.
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

#include "exp16.h"

// 16 lanes rounded to T's precision, still as fp32; and stored as T. bf16 uses AVX512-BF16's conversion
// (round to nearest even, NaN stays NaN, as to_bf16), one instruction instead of an integer rounding
// sequence: it halves SiLU*up's time in bf16. It flushes fp32 denormals (below 1.2e-38) to zero, where
// to_bf16 would keep a bf16 denormal; activations never hold such values.
inline __m512 rnd16(__m512 v, const float*) { return v; }
inline __m512 rnd16(__m512 v, const uint16_t*) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void st16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void st16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }

// ---- RMSNorm ----------------------------------------------------------------------------------------------
// h = x (+ r, rounded to T); r_out = h (when given); y = rnd(w * rnd(h * rsqrt(mean(h^2) + eps))).
template <typename T>
void rmsnorm(const T* x, int64_t ldx, const T* r, int64_t ldr, T* r_out, int64_t ldro, const T* w, float eps, T* y,
             int64_t ldy, int64_t M, int64_t C) {
    static thread_local std::vector<float> hbuf;
    hbuf.resize(C);
    float* h = hbuf.data();
    const int64_t C16 = C / 16 * 16;
    for (int64_t m = 0; m < M; m++) {
        const T* xm = x + m * ldx;
        const T* rm = r ? r + m * ldr : nullptr;
        __m512 ssv = _mm512_setzero_ps();
        for (int64_t c = 0; c < C16; c += 16) {
            __m512 v = ld16(xm + c);
            if (rm) v = rnd16(_mm512_add_ps(v, ld16(rm + c)), x);
            _mm512_storeu_ps(h + c, v);
            ssv = _mm512_fmadd_ps(v, v, ssv);
        }
        float ss = _mm512_reduce_add_ps(ssv);
        for (int64_t c = C16; c < C; c++) {
            float v = ld(xm + c);
            if (rm) v = rnd(v + ld(rm + c), x);
            h[c] = v;
            ss += v * v;
        }
        if (r_out) {
            T* ro = r_out + m * ldro;
            for (int64_t c = 0; c < C16; c += 16) st16(ro + c, _mm512_loadu_ps(h + c));
            for (int64_t c = C16; c < C; c++) st(ro + c, h[c]);
        }
        const float inv = 1.f / sqrtf(ss / (float)C + eps);
        const __m512 iv = _mm512_set1_ps(inv);
        T* ym = y + m * ldy;
        for (int64_t c = 0; c < C16; c += 16)
            st16(ym + c, _mm512_mul_ps(ld16(w + c), rnd16(_mm512_mul_ps(_mm512_loadu_ps(h + c), iv), x)));
        for (int64_t c = C16; c < C; c++) st(ym + c, ld(w + c) * rnd(h[c] * inv, x));
    }
}

// ---- rotary embedding, in place -------------------------------------------------------------------------
// Each (token, head) row x of length D becomes rnd(rnd(x * cos) + rnd(roll(x, D/2) * sin_signed)), with the
// token's cos/sin rows (the sign of rotate-half folded into sin_signed, as in llama.py's RopeAt).
template <typename T>
void rope_rows(T* x, int64_t ldx, int H, int D, const T* cos, const T* sin, int64_t ldc, int64_t N) {
    const int half = D / 2;
    if (D % 32 == 0 && D <= 256) {  // whole 16-lane chunks on each side of the half
        const int DV = D / 16, HV = half / 16;
        for (int64_t n = 0; n < N; n++) {
            __m512 cv[16], sv[16], xv[16];
            for (int j = 0; j < DV; j++) cv[j] = ld16(cos + n * ldc + 16 * j), sv[j] = ld16(sin + n * ldc + 16 * j);
            for (int h = 0; h < H; h++) {
                T* p = x + n * ldx + (int64_t)h * D;
                for (int j = 0; j < DV; j++) xv[j] = ld16(p + 16 * j);
                for (int j = 0; j < DV; j++) {
                    const __m512 a = rnd16(_mm512_mul_ps(xv[j], cv[j]), p);
                    const __m512 b = rnd16(_mm512_mul_ps(xv[(j + HV) % DV], sv[j]), p);
                    st16(p + 16 * j, _mm512_add_ps(a, b));
                }
            }
        }
        return;
    }
    std::vector<float> row(D);
    for (int64_t n = 0; n < N; n++) {
        const T* c = cos + n * ldc;
        const T* s = sin + n * ldc;
        for (int h = 0; h < H; h++) {
            T* p = x + n * ldx + (int64_t)h * D;
            for (int d = 0; d < D; d++) row[d] = ld(p + d);
            for (int d = 0; d < D; d++) {
                const float a = rnd(row[d] * ld(c + d), p);
                const float b = rnd(row[(d + half) % D] * ld(s + d), p);
                st(p + d, a + b);
            }
        }
    }
}

// ---- SiLU(gate) * up ---------------------------------------------------------------------------------------
// y = rnd(rnd(g / (1 + exp(-g))) * u): SiLU rounded to T first, as F.silu's output is.
template <typename T>
void silu_mul(const T* g, int64_t ldg, const T* u, int64_t ldu, T* y, int64_t ldy, int64_t M, int64_t I) {
    const int64_t I16 = I / 16 * 16;
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t m = 0; m < M; m++) {
        const T* gm = g + m * ldg;
        const T* um = u + m * ldu;
        T* ym = y + m * ldy;
        for (int64_t i = 0; i < I16; i += 16) {
            const __m512 a = ld16(gm + i);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), a));
            st16(ym + i, _mm512_mul_ps(rnd16(_mm512_div_ps(a, _mm512_add_ps(one, e)), g), ld16(um + i)));
        }
        for (int64_t i = I16; i < I; i++) {
            const float a = ld(gm + i);
            st(ym + i, rnd(a / (1.f + expf(-a)), g) * ld(um + i));
        }
    }
}

// SiLU of every bf16 value, as bf16: tab[g] = bf16(g / (1 + exp16(-g))), computed by the instructions silu_mul
// above runs on each lane, so a lookup has its bits. The fused MLP stores (cpu_amx.cpp's store_silu,
// blocked_large.h's store_silu_panel) look SiLU up here instead of running exp16 and the division (~14% of the AMX
// fused call's time at 256 rows). 128 KiB, plus 2 bytes so a 32-bit gather at the last entry stays inside; filled
// by the first caller (a function-local static: thread-safe, filled before anyone reads it).
}  // namespace memfit_decode

const uint16_t* memfit_silu_table() {
    alignas(64) static uint16_t tab[65536 + 2];
    static const bool filled = [] {
        using namespace memfit_decode;
        const __m512 one = _mm512_set1_ps(1.f);
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for (int i = 0; i < 65536; i += 16) {
            const __m512 g = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(i)), 16));
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            _mm256_storeu_si256((__m256i*)(tab + i), (__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(g, _mm512_add_ps(one, e))));
        }
        return true;
    }();
    (void)filled;
    return tab;
}

namespace memfit_decode {

// ---- decode attention over the cache -----------------------------------------------------------------------
// One query token per row b, attending to the first lens[b] positions of cache slot slots[b] (or the last
// `window` of them). K element (slot, t, h, d) is at k + slot*ks[0] + t*ks[1] + h*ks[2] + d (V likewise with
// vs): each (sequence, head) is one strided run of rows. The arithmetic is attend.h's, shared with the paged
// cache's reader (cpu_paged.cpp).

#include "attend.h"
#include "attend_amx.h"

// Whether bf16 attention of this shape, read a sequence at a time, runs on the tiles (attend_amx.h).
template <typename T>
inline bool amx_reads(int G, int D, int64_t step, int Hkv) {
#ifdef MEMFIT_DECODE_AMX
    return sizeof(T) == 2 && decode_amx_takes(G, D, step, Hkv, true);
#else
    (void)G, (void)D, (void)step, (void)Hkv;
    return false;
#endif
}

// One (sequence, KV head)'s attention: on AMX tiles where kernels/decode.py turned them on and the shape fits
// (attend_amx.h), else attend.h's AVX-512 form.
template <typename T, int D, typename Rows>
inline void attend_one(const T* q, const Rows& kr, const Rows& vr, int64_t L, int G, int Hkv, float scale, T* out,
                       std::vector<float>& sc) {
#ifdef MEMFIT_DECODE_AMX
    if constexpr (sizeof(T) == 2 && D % 32 == 0 && D <= 128) {
        if (decode_amx_takes(G, D, kr.step, Hkv, false)) return attend_group_amx<D>(q, kr, vr, L, G, scale, out, sc);
    }
#endif
    attend_group<T, D>(q, kr, vr, L, G, scale, out, sc);
}

// Contexts from this many tokens on read all heads of a sequence in one pass (attend_heads); shorter ones head
// by head (at 8 x 40 tokens the one-pass form took 1.05x the time, decode_ab, not kept).
constexpr int64_t BY_SEQ_MIN_LEN = 256;
// ... and only where the step reads at least this many bytes of K and V a layer (all its sequences' contexts):
// below, head-by-head passes over the strided rows are faster. One Zen 4 core, the Llama-1B-shaped layer of
// benchmarks/kv_cache.py over 12 layers, bf16: head by head 1.38-1.49x faster at batch 1 (4096-8192 tokens, 8-16
// MiB), 1.15x at 2 x 4096 (16 MiB), 1.41x at 8 x 1024 (16 MiB); level at 4 x 4096 (32 MiB); the one pass 1.03x
// faster at 8 x 4096 (64 MiB) and 1.07x on the 0.1b model's 8 x 4000 tokens (31 MiB; benchmarks/decode_throughput).
// On an Intel Sapphire-Rapids-class core it does not carry over: there a sequence's context length decides, not
// the step's bytes. benchmarks/decode_by_seq.py (AVX-512, one thread, the 1B layer (Hkv 8, D 64) unless said,
// interleaved medians, nothing else running, 7 December 00:21 UTC): head by head took 0.95x the one pass's time at
// 1 x 1024 tokens (2 MiB of K + V a sequence), 0.93x at 8 x 512, 0.88x at 32 x 512, but 1.14x at 1 x 1536 (3 MiB),
// 1.36x at 1 x 2048, 1.52x at 8 x 2048, 2.0-2.1x at 4000 tokens; the 0.1b shape (Hkv 4) 0.76x at 1 x 1024 (1 MiB),
// 0.95x at 1 x 2048 and 1.17x at 8 x 2048 (2 MiB); D 128 1.47x at 1 x 1024 (4 MiB). The default below picks the
// faster in 11 of its 12 cells (not the 0.1b shape's 8 x 2048). The turn comes where a sequence's K + V outgrow the
// core's L2 (2 MiB here): head by head re-reads each row's lines once a head, from L2 while they fit, and Intel's L2
// streamer, which follows runs of adjacent lines, does not follow one head's rows (128-256 B every Hkv x D x 2 bytes)
// once they come from further away; the one pass reads whole rows. So on an Intel core (CPUID vendor) a sequence is
// read in one pass when its K + V exceed 1.25x the L2 (sysconf; between the 2 MiB where head by head still won and
// the 3 MiB where the one pass did), whatever the step's total; elsewhere as measured on Zen 4. One host of each
// vendor measured.
constexpr int64_t BY_SEQ_MIN_BYTES = 24 << 20;
inline bool cpu_is_intel() {
    static const bool v = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;  // "GenuineIntel" in EBX, EDX, ECX of leaf 0
        return __get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;
    }();
    return v;
}
inline int64_t l2_bytes() {
    static const int64_t v = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE  // glibc; elsewhere the 2 MiB measured here
        const long s = sysconf(_SC_LEVEL2_CACHE_SIZE);
        if (s > 0) return (int64_t)s;
#endif
        return (int64_t)(2 << 20);
    }();
    return v;
}
// The AVX-512 path's defaults: the step's K + V bytes from which the one pass may run, and the fewest tokens a
// sequence needs for it (row_bytes: one token's K + V, every head).
inline int64_t avx512_by_seq_min_bytes() { return cpu_is_intel() ? 0 : BY_SEQ_MIN_BYTES; }
inline int64_t avx512_by_seq_min_len(int64_t row_bytes) {
    if (!cpu_is_intel() || row_bytes <= 0) return BY_SEQ_MIN_LEN;
    return std::max<int64_t>(BY_SEQ_MIN_LEN, l2_bytes() * 5 / 4 / row_bytes + 1);
}
// memfit_decode_set_by_seq_min_bytes (tests: 0 or 2^62 to pin a path, sequences from BY_SEQ_MIN_LEN on); -1, the
// default: the two above on AVX-512, 0 bytes and BY_SEQ_MIN_LEN on the tiles (below)
static int64_t g_by_seq_min_bytes = -1;

// Sequences a thread at least, heads side by side, some context from min_len tokens on: one item per sequence,
// its long context through attend_heads, a short one head by head. Kept out of line, so calls of short contexts
// run the per-head code below as compiled before it.
template <typename T, int D>
__attribute__((noinline)) void decode_attention_by_seq(
        const T* q, int64_t ldq, T* k, T* v, const int64_t* ks, const int64_t* vs, const int64_t* slots,
        const int64_t* lens, int64_t B, int Hkv, int G, int64_t window, float scale, T* out, int64_t ldo,
        const T* k_new, const T* v_new, int64_t ldn, int nthreads, int64_t min_len) {
    run_items(B, nthreads, [&](int64_t b, std::vector<float>& sc) {
        const int64_t t1 = lens[b], t0 = window > 0 ? std::max<int64_t>(0, t1 - window) : 0;
        for (int h = 0; k_new && h < Hkv; h++) {  // the row's new token, every head, into the cache first
            memcpy(k + slots[b] * ks[0] + (t1 - 1) * ks[1] + h * ks[2], k_new + b * ldn + (int64_t)h * D, D * sizeof(T));
            memcpy(v + slots[b] * vs[0] + (t1 - 1) * vs[1] + h * vs[2], v_new + b * ldn + (int64_t)h * D, D * sizeof(T));
        }
        if (t1 - t0 < min_len) {  // short: a head's rows stay in cache between passes anyway
            for (int h = 0; h < Hkv; h++) {
                const StridedRows<T> kr{k + slots[b] * ks[0] + t0 * ks[1] + h * ks[2], ks[1]};
                const StridedRows<T> vr{v + slots[b] * vs[0] + t0 * vs[1] + h * vs[2], vs[1]};
                attend_one<T, D>(q + b * ldq + (int64_t)h * G * D, kr, vr, t1 - t0, G, Hkv, scale,
                                 out + b * ldo + (int64_t)h * G * D, sc);
            }
            return;
        }
#ifdef MEMFIT_DECODE_AMX
        if constexpr (sizeof(T) == 2 && D % 32 == 0 && D <= 128) {  // the same steps on the tiles (attend_amx.h)
            if (decode_amx_takes(G, D, ks[1], Hkv, true))
                return attend_heads_amx<D>(q + b * ldq, k + slots[b] * ks[0] + t0 * ks[1], ks[1], ks[2],
                                           v + slots[b] * vs[0] + t0 * vs[1], vs[1], vs[2], t1 - t0, Hkv, G, scale,
                                           out + b * ldo, sc);
        }
#endif
        attend_heads<T, D>(q + b * ldq, k + slots[b] * ks[0] + t0 * ks[1], ks[1], ks[2],
                           v + slots[b] * vs[0] + t0 * vs[1], vs[1], vs[2], t1 - t0, Hkv, G, scale, out + b * ldo,
                           sc);
    });
}

template <typename T, int D>
void decode_attention(const T* q, int64_t ldq, T* k, T* v, const int64_t* ks, const int64_t* vs,
                      const int64_t* slots, const int64_t* lens, int64_t B, int Hq, int Hkv, int64_t window,
                      float scale, T* out, int64_t ldo, const T* k_new, const T* v_new, int64_t ldn, int nthreads) {
    const int G = Hq / Hkv;
    const int64_t items = B * Hkv;
    auto work = [&](int64_t i, std::vector<float>& sc) {
        const int h = (int)(i % Hkv);
        const int64_t b = i / Hkv;
        const int64_t t1 = lens[b], t0 = window > 0 ? std::max<int64_t>(0, t1 - window) : 0;
        if (k_new) {  // this row's new token, head h, into the cache first (each item writes only its own head)
            memcpy(k + slots[b] * ks[0] + (t1 - 1) * ks[1] + h * ks[2], k_new + b * ldn + (int64_t)h * D, D * sizeof(T));
            memcpy(v + slots[b] * vs[0] + (t1 - 1) * vs[1] + h * vs[2], v_new + b * ldn + (int64_t)h * D, D * sizeof(T));
        }
        const StridedRows<T> kr{k + slots[b] * ks[0] + t0 * ks[1] + h * ks[2], ks[1]};
        const StridedRows<T> vr{v + slots[b] * vs[0] + t0 * vs[1] + h * vs[2], vs[1]};
        const int64_t head0 = (int64_t)h * G;
        attend_one<T, D>(q + b * ldq + head0 * D, kr, vr, t1 - t0, G, Hkv, scale, out + b * ldo + head0 * D, sc);
    };
    run_items(items, nthreads, work);
}

// D in HEAD_DIMS (the caller checks); G <= 64.
template <typename T>
void decode_attention_any(const T* q, int64_t ldq, T* k, T* v, const int64_t* ks, const int64_t* vs,
                          const int64_t* slots, const int64_t* lens, int64_t B, int Hq, int Hkv, int D, int64_t window,
                          float scale, T* out, int64_t ldo, const T* k_new, const T* v_new, int64_t ldn, int nthreads) {
    // A token's heads side by side (the per-layer layout), a sequence a thread at least, a long context and a
    // step that reads min_bytes of K and V or more: all heads of a sequence in one pass over its rows (attend.h's
    // attend_heads: the same bits).
    bool by_seq = Hkv > 1 && Hkv <= 16 && ks[2] < ks[1] && vs[2] < vs[1] && B >= std::max(nthreads, 1);
    const bool tiles = amx_reads<T>(Hq / Hkv, D, ks[1], Hkv);
    const int64_t row_bytes = (int64_t)Hkv * D * (int64_t)sizeof(T) * 2;
    const int64_t min_len = g_by_seq_min_bytes >= 0 || tiles ? BY_SEQ_MIN_LEN : avx512_by_seq_min_len(row_bytes);
    if (by_seq) {
        bool long_one = false;
        int64_t tokens = 0;
        for (int64_t b = 0; b < B; b++) {
            const int64_t n = lens[b] - (window > 0 ? std::max<int64_t>(0, lens[b] - window) : 0);
            long_one = long_one || n >= min_len;
            tokens += n;
        }
        // On the tiles the one pass at any size (measured on the 1B layer's 1 KiB rows, before 526d952 gave the
        // tile reader four accumulators): the kernel waits on memory, and a token's row of every
        // head is one run (benchmarks/paged_vllm.py's layer, one thread, interleaved, load ~3: 1 x 8192 tokens 1132 against
        // 1631 us head by head, 8 x 2048 2479 against 3925, 32 x 512 2341 against 3326; 1 x 512 level). Not settled:
        // a later run with the other jobs paused had head by head the faster at 8 x 4000 (6125 against 7119 us),
        // while the 0.1b shape (Hkv 4) took 1995 against 2748 there.
        const int64_t min_bytes = g_by_seq_min_bytes >= 0 ? g_by_seq_min_bytes : tiles ? 0 : avx512_by_seq_min_bytes();
        by_seq = long_one && tokens * row_bytes >= min_bytes;
    }
#define MEMFIT_ATTN_CASE(DIM) \
    case DIM: \
        if (by_seq) \
            decode_attention_by_seq<T, DIM>(q, ldq, k, v, ks, vs, slots, lens, B, Hkv, Hq / Hkv, window, scale, out, \
                                            ldo, k_new, v_new, ldn, nthreads, min_len); \
        else \
            decode_attention<T, DIM>(q, ldq, k, v, ks, vs, slots, lens, B, Hq, Hkv, window, scale, out, ldo, k_new, \
                                     v_new, ldn, nthreads); \
        break;
    switch (D) {  // keep in step with HEAD_DIMS in kernels/decode.py
        MEMFIT_ATTN_CASE(32)
        MEMFIT_ATTN_CASE(64)
        MEMFIT_ATTN_CASE(96)
        MEMFIT_ATTN_CASE(128)
        MEMFIT_ATTN_CASE(256)
        default: break;
    }
#undef MEMFIT_ATTN_CASE
}

// ---- greedy argmax ---------------------------------------------------------------------------------------
// Per lane the largest value and the first index holding it (strict >), then the smallest index among the
// lanes that hold the row maximum: the first index among ties overall, as torch.max / argmax give.
template <typename T>
void argmax_rows(const T* x, int64_t ldx, int64_t M, int64_t N, int64_t* out) {
    for (int64_t m = 0; m < M; m++) {
        const T* r = x + m * ldx;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i bidx = idx;  // a lane that never sees more than -inf keeps its first index
        const __m512i step = _mm512_set1_epi32(16);
        int64_t n = 0;
        for (; n + 16 <= N && N < ((int64_t)1 << 31); n += 16) {
            const __m512 v = ld16(r + n);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            best = _mm512_mask_mov_ps(best, gt, v);
            bidx = _mm512_mask_mov_epi32(bidx, gt, idx);
            idx = _mm512_add_epi32(idx, step);
        }
        float mv = -INFINITY;
        int64_t mi = 0;
        if (n > 0) {
            alignas(64) float bv[16];
            alignas(64) int32_t bi[16];
            _mm512_store_ps(bv, best);
            _mm512_store_si512(bi, bidx);
            mv = bv[0], mi = bi[0];
            for (int l = 1; l < 16; l++)
                if (bv[l] > mv || (bv[l] == mv && bi[l] < mi)) mv = bv[l], mi = bi[l];
        }
        for (; n < N; n++) {  // the tail (and rows too long for 32-bit lanes): strict >, so ties keep the first
            const float v = ld(r + n);
            if (v > mv) mv = v, mi = n;
        }
        out[m] = mi;
    }
}

}  // namespace memfit_decode

using namespace memfit_decode;

extern "C" {

int g_memfit_decode_amx = 0;  // attend_amx.h: 0 AVX-512, 1 AMX tiles, 2 auto (memfit_decode_set_amx)

int memfit_decode_abi_version(void) { return 1; }

// Route bf16 decode attention (both caches) to AVX-512 (0), the AMX tiles (1) or the tiles where a sequence's rows
// lie in runs (2, attend_amx.h's decode_amx_takes), or leave it (-1); returns the previous mode, or -1 where this
// library has no AMX path (kernels/decode.py sets 1 or 2 only once memfit_amx_available() says 1).
int memfit_decode_set_amx(int on) {
#ifdef MEMFIT_DECODE_AMX
    const int old = ::g_memfit_decode_amx;
    if (on >= 0) ::g_memfit_decode_amx = on > 2 ? 2 : on;
    return old;
#else
    (void)on;
    return -1;
#endif
}

// The step's K + V bytes from which a per-layer cache is read a sequence at a time (-1: the default, per path, as
// g_by_seq_min_bytes says); returns the previous value. Tests set 0 to run attend_heads on small contexts.
int64_t memfit_decode_set_by_seq_min_bytes(int64_t nbytes) {
    const int64_t old = g_by_seq_min_bytes;
    if (nbytes >= -1) g_by_seq_min_bytes = nbytes;
    return old;
}
// The AVX-512 path's defaults on this CPU: the step's bytes (avx512_by_seq_min_bytes) and, for rows of row_bytes
// (one token's K + V, every head), a sequence's fewest tokens (avx512_by_seq_min_len), as {bytes, tokens}.
void memfit_decode_by_seq_default(int64_t row_bytes, int64_t* out) {
    out[0] = avx512_by_seq_min_bytes();
    out[1] = avx512_by_seq_min_len(row_bytes);
}

void memfit_rmsnorm_bf16(const uint16_t* x, int64_t ldx, const uint16_t* r, int64_t ldr, uint16_t* r_out, int64_t ldro,
                         const uint16_t* w, float eps, uint16_t* y, int64_t ldy, int64_t M, int64_t C) {
    rmsnorm(x, ldx, r, ldr, r_out, ldro, w, eps, y, ldy, M, C);
}
void memfit_rmsnorm_f32(const float* x, int64_t ldx, const float* r, int64_t ldr, float* r_out, int64_t ldro,
                        const float* w, float eps, float* y, int64_t ldy, int64_t M, int64_t C) {
    rmsnorm(x, ldx, r, ldr, r_out, ldro, w, eps, y, ldy, M, C);
}

void memfit_rope_bf16(uint16_t* q, int64_t ldq, int Hq, uint16_t* k, int64_t ldk, int Hkv, int D, const uint16_t* cos,
                      const uint16_t* sin, int64_t ldc, int64_t N) {
    rope_rows(q, ldq, Hq, D, cos, sin, ldc, N);
    rope_rows(k, ldk, Hkv, D, cos, sin, ldc, N);
}
void memfit_rope_f32(float* q, int64_t ldq, int Hq, float* k, int64_t ldk, int Hkv, int D, const float* cos,
                     const float* sin, int64_t ldc, int64_t N) {
    rope_rows(q, ldq, Hq, D, cos, sin, ldc, N);
    rope_rows(k, ldk, Hkv, D, cos, sin, ldc, N);
}

void memfit_silu_mul_bf16(const uint16_t* g, int64_t ldg, const uint16_t* u, int64_t ldu, uint16_t* y, int64_t ldy,
                          int64_t M, int64_t I) {
    silu_mul(g, ldg, u, ldu, y, ldy, M, I);
}
void memfit_silu_mul_f32(const float* g, int64_t ldg, const float* u, int64_t ldu, float* y, int64_t ldy, int64_t M,
                         int64_t I) {
    silu_mul(g, ldg, u, ldu, y, ldy, M, I);
}

// k_new/v_new (optional, row stride ldn): each row's new token's K/V, written to position lens[b] - 1 first.
void memfit_decode_attn_bf16(const uint16_t* q, int64_t ldq, uint16_t* k, uint16_t* v, const int64_t* ks,
                             const int64_t* vs, const int64_t* slots, const int64_t* lens, int64_t B, int Hq, int Hkv,
                             int D, int64_t window, float scale, uint16_t* out, int64_t ldo, const uint16_t* k_new,
                             const uint16_t* v_new, int64_t ldn, int nthreads) {
    decode_attention_any(q, ldq, k, v, ks, vs, slots, lens, B, Hq, Hkv, D, window, scale, out, ldo, k_new, v_new, ldn, nthreads);
}
void memfit_decode_attn_f32(const float* q, int64_t ldq, float* k, float* v, const int64_t* ks,
                            const int64_t* vs, const int64_t* slots, const int64_t* lens, int64_t B, int Hq, int Hkv,
                            int D, int64_t window, float scale, float* out, int64_t ldo, const float* k_new,
                            const float* v_new, int64_t ldn, int nthreads) {
    decode_attention_any(q, ldq, k, v, ks, vs, slots, lens, B, Hq, Hkv, D, window, scale, out, ldo, k_new, v_new, ldn, nthreads);
}

// Greedy pick: out[m] = the index of row m's largest value, the first among ties.
void memfit_argmax_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t N, int64_t* out) { argmax_rows(x, ldx, M, N, out); }
void memfit_argmax_f32(const float* x, int64_t ldx, int64_t M, int64_t N, int64_t* out) { argmax_rows(x, ldx, M, N, out); }

}  // extern "C"
