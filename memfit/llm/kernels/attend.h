// Single-token (decode) attention over a KV cache, shared by memfit's two cache readers: cpu_decode.cpp (the
// virtual cache: each sequence at a fixed stride) and cpu_paged.cpp (the paged cache: fixed-size blocks through
// a block table). Each .cpp includes it inside its own namespace, after <immintrin.h>, bf16.h and exp16.h.
//
// Work item = (row, KV head): its G = Hq / Hkv query heads share every K/V row it reads. Where the rows are is
// the caller's `Rows` accessor (StridedRows or PagedRows below); the arithmetic is one code path for both, so
// the two caches differ only in the address of a row.
//
// Scores: a dot product per (query head, token) along D, which is where each K row is contiguous; 16 tokens'
// dot products are reduced together by one transpose-add tree (hsum16) instead of 16 horizontal sums.
// Softmax in fp32; the output is sum_t p_t V_t, 16 lanes of D at a time, and is rounded once, at the end.
// The includer has <stdint.h>, <math.h>, <algorithm> and <vector> at file scope (this file sits in a namespace).
#pragma once

#include "hsum16.h"

// Query row q (D elements) in registers, in the form `dot_lanes` multiplies a K row by: fp32 lanes, or for
// bf16 the raw bf16 pairs, since AVX512-BF16's dot product (vdpbf16ps) takes K rows as stored, with no
// conversion (q is bf16 already; the products are exact in fp32).
template <typename T, int D>
struct QRow;
template <int D>
struct QRow<float, D> {
    __m512 v[D / 16];
    void load(const float* q) {
        for (int j = 0; j < D / 16; j++) v[j] = _mm512_loadu_ps(q + 16 * j);
    }
    __m512 dot_lanes(const float* row) const {  // partial sums of q . row in 16 lanes
        __m512 a = _mm512_mul_ps(v[0], _mm512_loadu_ps(row));
        _Pragma("GCC unroll 16")
        for (int j = 1; j < D / 16; j++) a = _mm512_fmadd_ps(v[j], _mm512_loadu_ps(row + 16 * j), a);
        return a;
    }
};
template <int D>
struct QRow<uint16_t, D> {
    static_assert(D % 32 == 0, "bf16 rows are read 32 elements at a time");
    __m512bh v[D / 32];
    void load(const uint16_t* q) {
        for (int j = 0; j < D / 32; j++) v[j] = (__m512bh)_mm512_loadu_si512(q + 32 * j);
    }
    __m512 dot_lanes(const uint16_t* row) const {
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), v[0], (__m512bh)_mm512_loadu_si512(row));
        _Pragma("GCC unroll 8")
        for (int j = 1; j < D / 32; j++) a = _mm512_dpbf16_ps(a, v[j], (__m512bh)_mm512_loadu_si512(row + 32 * j));
        return a;
    }
};

// One V row as D/16 fp32 vectors. bf16: each 32-element load splits into its even elements (shifted up)
// and its odd ones (masked): two instructions per 32 instead of three per 16. The lanes are then
// de-interleaved (vector 2j = even elements of block j, 2j+1 = odd), which `store_out` undoes.
template <int D>
inline void v_lanes(const float* row, __m512* vv) {
    for (int j = 0; j < D / 16; j++) vv[j] = _mm512_loadu_ps(row + 16 * j);
}
template <int D>
inline void v_lanes(const uint16_t* row, __m512* vv) {
    for (int j = 0; j < D / 32; j++) {
        const __m512i x = _mm512_loadu_si512(row + 32 * j);
        vv[2 * j] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        vv[2 * j + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
    }
}
// o[g] += p_g * V_t for the gn (<= GC) query heads of a group: a V row's fp32 lanes `row` (v_lanes), p_g read at
// pcol[g * stride] (a column of the score rows). Both decode kernels' V pass, so both add in the same order.
template <typename T, int D, int GC>
inline void add_pv(const T* row, const float* pcol, size_t stride, int gn, __m512 (*o)[D / 16]) {
    constexpr int DV = D / 16;
    __m512 vv[DV];
    v_lanes<D>(row, vv);
    _Pragma("GCC unroll 8")
    for (int g = 0; g < GC; g++) {
        if (g >= gn) break;
        const __m512 p = _mm512_set1_ps(pcol[g * stride]);
        _Pragma("GCC unroll 16")
        for (int j = 0; j < DV; j++) o[g][j] = _mm512_fmadd_ps(p, vv[j], o[g][j]);
    }
}

template <int D>
inline void store_out(float* dst, const __m512* o, float inv) {
    for (int j = 0; j < D / 16; j++) _mm512_storeu_ps(dst + 16 * j, _mm512_mul_ps(o[j], _mm512_set1_ps(inv)));
}
template <int D>
inline void store_out(uint16_t* dst, const __m512* o, float inv) {
    alignas(64) float ev[16], od[16];
    for (int j = 0; j < D / 32; j++) {
        _mm512_store_ps(ev, _mm512_mul_ps(o[2 * j], _mm512_set1_ps(inv)));
        _mm512_store_ps(od, _mm512_mul_ps(o[2 * j + 1], _mm512_set1_ps(inv)));
        for (int e = 0; e < 16; e++) dst[32 * j + 2 * e] = f32_to_bf16(ev[e]), dst[32 * j + 2 * e + 1] = f32_to_bf16(od[e]);
    }
}

// Prefetch one head row (D elements) into L1. Prefetches never fault, so reading ahead past a sequence's
// end is harmless.
template <typename T, int D>
inline void prefetch_row(const T* p) {
    for (int i = 0; i < (int)(D * sizeof(T)); i += 64) _mm_prefetch((const char*)p + i, _MM_HINT_T0);
}

// The same into L2. The kernels' passes that read K or V from memory request rows into L2 in order, a few at each
// step of the work, well ahead of their use (attend_heads: RowStream below, which says what it bought).
template <typename T, int D>
inline void prefetch_row_l2(const T* p) {
    for (int i = 0; i < (int)(D * sizeof(T)); i += 64) _mm_prefetch((const char*)p + i, _MM_HINT_T1);
}
// attend_group: a head's rows requested this far ahead of the one read. A head's rows are one run in the
// head-major layouts (paged blocks, head-major slots), which the hardware prefetcher follows well already: against
// 16 rows ahead into L1, 8 x 4000 tokens head-major took 43-46 against 46-50 ms (16, 64 or 256 rows: the same).
constexpr int64_t ROW_LEAD = 64;

// p = exp(s - m) over one score row, in place, 16 at a time; returns 1 / sum p (the row's max is m).
inline float softmax_in_place(float* s, int64_t L, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) {
        const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
        _mm512_storeu_ps(s + t, p);
        sum = _mm512_add_ps(sum, p);
    }
    if (t < L) {
        const __mmask16 mk = (__mmask16)((1u << (L - t)) - 1u);
        const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), mv));
        _mm512_mask_storeu_ps(s + t, mk, p);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, p));
    }
    return 1.f / _mm512_reduce_add_ps(sum);
}

// Rows of one (sequence, KV head), positions counted from the first one attended to. `at(t)`: row t.
// `run(t, n, step)`: the address of row t, with n set to how many rows from t on lie at a fixed `step`
// apart (at least 1): the kernel walks each run with a pointer instead of computing every row's address.
template <typename T>
struct StridedRows {  // row t at base + t * step (the virtual cache: one slot is one strided run)
    static constexpr bool one_run = true;  // every row at one stride: the kernel's loops need no run checks
    const T* base;
    int64_t step;
    const T* at(int64_t t) const { return base + t * step; }
    const T* run(int64_t t, int64_t L, int64_t& n) const {
        n = L - t;
        return base + t * step;
    }
};

template <typename T>
struct PagedRows {  // position p = t0 + t at base + table[p >> shift] * bstride + (p & mask) * step
    static constexpr bool one_run = false;
    const T* base;  // the pool at block 0, this head
    const int64_t* table;  // this sequence's block ids, in position order
    int64_t bstride, step, t0, mask;
    int shift;  // log2(block size): block sizes are powers of two (checked by the caller)
    const T* at(int64_t t) const {
        const int64_t p = t0 + t;
        return base + table[p >> shift] * bstride + (p & mask) * step;
    }
    const T* run(int64_t t, int64_t L, int64_t& n) const {  // to the end of the block (or of the sequence)
        const int64_t p = t0 + t;
        n = std::min(L - t, mask + 1 - (p & mask));
        return base + table[p >> shift] * bstride + (p & mask) * step;
    }
};

// Rows [at, upto) of `rows` into L2, a run at a time: a paged block's rows cost one table lookup, and rows that
// touch (a head's run in the head-major layouts) go as one stretch of lines. Against a lookup a row, the paged
// reader at 16-token blocks (benchmarks/paged_vllm.py's 1B-shaped layer, shuffled tables, one run each) took
// 25.9 against 26.3-26.8 ms at 8 x 8192 tokens and 111 against 114-116 ms at 32 x 8192.
template <typename T, int D, typename Rows>
inline void request_l2(const Rows& rows, int64_t& at, int64_t upto) {
    for (int64_t n; at < upto; at += n) {
        const T* p = rows.run(at, upto, n);
        if (rows.step == D) {
            for (int64_t i = 0; i < n * D * (int64_t)sizeof(T); i += 64) _mm_prefetch((const char*)p + i, _MM_HINT_T1);
        } else {
            for (int64_t r = 0; r < n; r++) prefetch_row_l2<T, D>(p + r * rows.step);
        }
    }
}

template <typename T, int D, typename Rows>
void attend_group(const T* q, const Rows& krows, const Rows& vrows, int64_t L, int G, float scale, T* out,
                  std::vector<float>& sc) {
    constexpr int DV = D / 16;
    constexpr int GC = DV <= 2 ? 8 : DV <= 4 ? 4 : DV <= 8 ? 2 : 1;  // query heads whose outputs stay in registers in the V pass
    const int64_t kstep = krows.step, vstep = vrows.step;
    sc.resize((size_t)G * (size_t)std::max<int64_t>(L, 1));
    for (int64_t i = 0; i < 16 && i < L; i++) prefetch_row<T, D>(krows.at(i)), prefetch_row<T, D>(vrows.at(i));
    int64_t kat = std::min<int64_t>(16, L), vat = kat;  // K and V rows requested so far
    float inv[64];
    for (int g = 0; g < G; g++) {
        QRow<T, D> qr;
        qr.load(q + (int64_t)g * D);
        float* s = sc.data() + (size_t)g * L;
        const __m512 sv = _mm512_set1_ps(scale);
        __m512 mx = _mm512_set1_ps(-INFINITY);
        int64_t t = 0, n;
        for (; t + 16 <= L; t += 16) {
            const T* kb = krows.run(t, L, n);
            if (g == 0)  // the first head's pass reads K from memory: rows ROW_LEAD on into L2
                request_l2<T, D>(krows, kat, std::min(t + 16 + ROW_LEAD, L));
            __m512 acc[16];
            if (Rows::one_run || n >= 16) {  // 16 rows at one stride (always, for the virtual cache and 16-aligned blocks)
                _Pragma("GCC unroll 16")
                for (int i = 0; i < 16; i++) acc[i] = qr.dot_lanes(kb + i * kstep);
            } else {
                for (int i = 0; i < 16; i++) acc[i] = qr.dot_lanes(krows.at(t + i));
            }
            const __m512 r = _mm512_mul_ps(hsum16(acc), sv);
            _mm512_storeu_ps(s + t, r);
            mx = _mm512_max_ps(mx, r);
        }
        float m = _mm512_reduce_max_ps(mx);
        for (; t < L; t++) {
            const float r = _mm512_reduce_add_ps(qr.dot_lanes(krows.at(t))) * scale;
            s[t] = r;
            m = std::max(m, r);
        }
        inv[g] = softmax_in_place(s, L, m);
    }
    for (int g0 = 0; g0 < G; g0 += GC) {
        const int gn = std::min(GC, G - g0);
        __m512 o[GC][DV];
        _Pragma("GCC unroll 8")
        for (int g = 0; g < GC; g++)
            _Pragma("GCC unroll 16")
            for (int j = 0; j < DV; j++) o[g][j] = _mm512_setzero_ps();
        for (int64_t t0 = 0, n; t0 < L; t0 += n) {  // run by run: within one, rows are `vstep` apart
            const T* vb = vrows.run(t0, L, n);
            for (int64_t i = 0; i < n; i++) {
                if (g0 == 0)  // the first group's pass reads V from memory: rows ROW_LEAD on into L2
                    if (vat - (t0 + i) < ROW_LEAD / 2) request_l2<T, D>(vrows, vat, std::min(t0 + i + ROW_LEAD, L));
                add_pv<T, D, GC>(vb + i * vstep, sc.data() + (size_t)g0 * L + t0 + i, (size_t)L, gn, o);
            }
        }
        for (int g = 0; g < gn; g++) store_out<D>(out + (int64_t)(g0 + g) * D, o[g], inv[g0 + g]);
    }
}

// All Hkv KV heads of one sequence at once, for a cache whose heads sit side by side within a token's row (the
// per-layer layout: K row t of head h at kb + t * kstep + h * khead, khead < kstep). attend_group reads a head's
// rows, Hkv x D apart, over the whole context, then the next head's: each pass brings the sequence's K (then V)
// region in from memory again and uses a 1/Hkv share of each line (5.6 GB/s of useful reads at 8 x 4000 tokens,
// docs/benchmarks.md). Here the context goes by in blocks of TB tokens, every head and query head taking its
// turn on a block while it is in L1: each row is read from memory once. Per (KV head, query head) the same
// instructions run on the same values in the same order as attend_group (scores 16 tokens at a time through
// hsum16, the running max, the softmax, then o += p_t V_t in token order, kept in memory between blocks
// instead of registers), so the bits are attend_group's (tests: the paged reader, which keeps attend_group,
// gives identical outputs).
// Every head's row of one token into L2 (prefetches never fault: past the end is harmless); one run when adjacent.
// Kept as written: the same loops through a shared (pointer, byte count) helper, which also served prefetch_row_l2
// and request_l2, took 56-58 against 46-47 ms in the 8 x 4000-token harness (why is not established).
template <typename T, int D>
inline void prefetch_heads_l2(const T* p, int Hkv, int64_t head) {
    const int n = head == D ? Hkv : 1;  // adjacent heads: one run of Hkv rows
    for (int h = 0; h < (head == D ? 1 : Hkv); h++)
        for (int i = 0; i < (int)(n * D * sizeof(T)); i += 64) _mm_prefetch((const char*)(p + h * head) + i, _MM_HINT_T1);
}
// A sequence's token rows requested in order, into L2, a few at a time: each chunk of a block's work asks for its
// share of the rows two blocks on. Against one burst of prefetches to L1 32 tokens ahead, on the first head's
// pass only (what this replaced), decode attention over 12 layers of 8 x 4000-token bf16 KV (Hkv 4, G 3, D 64;
// a harness calling CpuDecodeOps.decode_attention, alternating, load 2-3) took 40-45 against 54-57 ms: a burst
// fills the core's L1 miss slots and the arithmetic waits for them, while requests to L2, spread out, keep memory
// busy under the arithmetic (the same spread into L1: 47-52 ms; into L2 four blocks on: 43-44 ms).
template <typename T, int D>
struct RowStream {
    const T* base;
    int64_t step, L, at;  // rows [0, at) requested
    void advance(int64_t upto, int Hkv, int64_t head) {
        for (upto = std::min(upto, L); at < upto; at++) prefetch_heads_l2<T, D>(base + at * step, Hkv, head);
    }
};

template <typename T, int D>
void attend_heads(const T* q, const T* kb, int64_t kstep, int64_t khead, const T* vb, int64_t vstep,
                  int64_t vhead, int64_t L, int Hkv, int G, float scale, T* out, std::vector<float>& sc) {
    constexpr int DV = D / 16;
    constexpr int GC = DV <= 2 ? 8 : DV <= 4 ? 4 : DV <= 8 ? 2 : 1;  // as attend_group's V pass
    constexpr int64_t TB = 64;  // tokens a block: 64 rows of every head (32 KiB at 4 x 64 bf16) stay in L1
    const int H = Hkv * G;
    const int64_t Ls = std::max<int64_t>(L, 1);
    // scores (H, L), then the running maxima (H, 16) and the outputs' fp32 lanes (H, D), 64-byte aligned rows
    sc.resize((size_t)H * (size_t)Ls + (size_t)H * 16 + (size_t)H * D + 16);
    float* const S = sc.data();
    float* const MX = (float*)(((uintptr_t)(S + (size_t)H * Ls) + 63) & ~(uintptr_t)63);
    float* const O = MX + (size_t)H * 16;
    const __m512 sv = _mm512_set1_ps(scale);
    for (int hg = 0; hg < H; hg++) _mm512_store_ps(MX + 16 * hg, _mm512_set1_ps(-INFINITY));
    const int64_t full = L / 16 * 16;  // tokens scored 16 at a time; the rest one by one, as attend_group
    RowStream<T, D> kpf{kb, kstep, L, 0}, vpf{vb, vstep, L, 0};
    kpf.advance(2 * TB, Hkv, khead);  // the first two blocks, ahead of their first use
    const int64_t kchunks = (int64_t)Hkv * G * (TB / 16);  // score chunks a full block
    const int64_t vunits = (int64_t)Hkv * ((G + GC - 1) / GC) * TB;  // V pass steps a full block
    int64_t chunk = 0, vunit = 0;
    for (int64_t b0 = 0; b0 < full; b0 += TB) {
        const int64_t b1 = std::min(b0 + TB, full);
        chunk = 0;
        for (int h = 0; h < Hkv; h++) {
            for (int g = 0; g < G; g++) {
                const int hg = h * G + g;
                QRow<T, D> qr;
                qr.load(q + (int64_t)hg * D);
                __m512 mx = _mm512_load_ps(MX + 16 * hg);
                for (int64_t t = b0; t < b1; t += 16) {
                    const T* k0 = kb + t * kstep + h * khead;
                    // rows two blocks on, a share at each of the block's chunks (at the last block: V's first)
                    chunk++;
                    kpf.advance(b1 + TB + (chunk * TB) / kchunks, Hkv, khead);
                    if (b1 == full) vpf.advance((chunk * TB) / kchunks, Hkv, vhead);
                    __m512 acc[16];
                    _Pragma("GCC unroll 16")
                    for (int i = 0; i < 16; i++) acc[i] = qr.dot_lanes(k0 + i * kstep);
                    const __m512 r = _mm512_mul_ps(hsum16(acc), sv);
                    _mm512_storeu_ps(S + (size_t)hg * Ls + t, r);
                    mx = _mm512_max_ps(mx, r);
                }
                _mm512_store_ps(MX + 16 * hg, mx);
            }
        }
    }
    float inv[64 * 16];  // G <= 64 (the caller checks) and Hkv <= 16 here
    for (int h = 0; h < Hkv; h++) {
        for (int g = 0; g < G; g++) {
            const int hg = h * G + g;
            float* s = S + (size_t)hg * Ls;
            float m = _mm512_reduce_max_ps(_mm512_load_ps(MX + 16 * hg));
            if (full < L) {
                QRow<T, D> qr;
                qr.load(q + (int64_t)hg * D);
                for (int64_t t = full; t < L; t++) {
                    const float r = _mm512_reduce_add_ps(qr.dot_lanes(kb + t * kstep + h * khead)) * scale;
                    s[t] = r;
                    m = std::max(m, r);
                }
            }
            inv[hg] = softmax_in_place(s, L, m);
        }
    }
    for (int64_t i = 0; i < (int64_t)H * D; i += 16) _mm512_store_ps(O + i, _mm512_setzero_ps());
    for (int64_t b0 = 0; b0 < L; b0 += TB) {
        const int64_t b1 = std::min(b0 + TB, L);
        vunit = 0;
        for (int h = 0; h < Hkv; h++) {
            for (int g0 = 0; g0 < G; g0 += GC) {
                const int gn = std::min(GC, G - g0);
                __m512 o[GC][DV];
                _Pragma("GCC unroll 8")
                for (int g = 0; g < GC; g++) {
                    if (g >= gn) break;
                    _Pragma("GCC unroll 16")
                    for (int j = 0; j < DV; j++) o[g][j] = _mm512_load_ps(O + (size_t)(h * G + g0 + g) * D + 16 * j);
                }
                for (int64_t t = b0; t < b1; t++) {
                    vpf.advance(b1 + TB + (++vunit * TB) / vunits, Hkv, vhead);
                    add_pv<T, D, GC>(vb + t * vstep + h * vhead, S + (size_t)(h * G + g0) * Ls + t, (size_t)Ls, gn, o);
                }
                _Pragma("GCC unroll 8")
                for (int g = 0; g < GC; g++) {
                    if (g >= gn) break;
                    _Pragma("GCC unroll 16")
                    for (int j = 0; j < DV; j++) _mm512_store_ps(O + (size_t)(h * G + g0 + g) * D + 16 * j, o[g][j]);
                }
            }
        }
    }
    for (int hg = 0; hg < H; hg++) {
        __m512 o[DV];
        for (int j = 0; j < DV; j++) o[j] = _mm512_load_ps(O + (size_t)hg * D + 16 * j);
        store_out<D>(out + (int64_t)hg * D, o, inv[hg]);
    }
}

// work(i, scores) for i in [0, items), on nthreads OpenMP threads (static schedule), each with its own scores.
template <typename Work>
void run_items(int64_t items, int nthreads, Work&& work) {
#ifdef _OPENMP
    if (nthreads > 1 && items > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            std::vector<float> sc;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < items; i++) work(i, sc);
        }
        return;
    }
#endif
    static thread_local std::vector<float> sc;
    for (int64_t i = 0; i < items; i++) work(i, sc);
}
