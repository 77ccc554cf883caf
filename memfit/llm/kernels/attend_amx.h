// Single-token (decode) attention on AMX tiles, bf16: attend.h's attend_group with both products on the tile unit
// (TDPBF16PS), for a CPU with AMX-BF16 whose tile state Linux granted this process (cpu_amx.cpp's
// memfit_amx_available; kernels/decode.py sets the mode with memfit_decode_set_amx: by default "auto", the tiles
// where a sequence's rows lie in runs, see decode_amx_takes; MEMFIT_DECODE_AMX=1 everywhere, 0 nowhere). Both cache readers
// (cpu_decode.cpp: strided rows; cpu_paged.cpp: blocks through a table) call it with their own `Rows` accessor,
// so the two caches stay on one arithmetic, as on the AVX-512 path.
//
// Why: on an AMX host vLLM-CPU's attention runs on the tile unit, and the AVX-512 form (dot products along D
// reduced by hsum16, then o += p_t V_t with FMAs) takes 1.3-2x its time (benchmarks/paged_vllm.py). The tile unit
// does a 16 x 16 x 32 multiply-add an instruction, so the arithmetic becomes nearly free and the K/V reads decide.
//
// Work item = (row, KV head), G = Hq / Hkv query heads (G <= 16: one tile's columns).
// - Scores, transposed so K is read in place: S^T (16 tokens x G) = K (16 tokens x D, the A tiles: each token's D
//   values are contiguous and tokens sit at one stride, whatever the layout) . Q^T (D x G, the B tiles: Q's
//   columns in VNNI pairs, packed once a call). 64 tokens a step, four groups of 16 on four accumulator tiles
//   (score_block); rows of a paged block shorter than 16 are copied to a 16-row scratch first; the last L % 16
//   tokens are scored by attend.h's AVX-512 dot product.
// - Softmax in fp32 as attend.h's; P rounded to bf16 (as the AMX prefill path and flash attention round it; at
//   most 2^-9 relative per weight) and written in place over the first half of its own fp32 score row.
// - O (G x D) = P (G x 32 tokens, A tile) . V (32 tokens x D), V's rows paired for the B tiles (VNNI: tokens 2r and
//   2r + 1 interleaved) into a 32-token scratch in L1 as they are read; 64 columns of O a pass in 4 accumulator
//   tiles (kept in the tiles for D <= 64, else loaded and stored around each 32-token step).
// The includer has attend.h and exp16.h (inside its own namespace, as they are); this file puts its code under
// `#pragma GCC target("amx-tile,amx-bf16,...")` and defines MEMFIT_DECODE_AMX where the compiler has AMX intrinsics
// (GCC 11 on); elsewhere it is empty and the callers stay on AVX-512.
#pragma once

#include "bf16x16.h"
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MEMFIT_DECODE_AMX 1
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")

// The process-wide mode kernels/decode.py sets (memfit_decode_set_amx in cpu_decode.cpp) for bf16 decode attention
// with G <= 16 and D <= 128: 0 AVX-512 (attend.h), 1 here, 2 here where decode_amx_takes says.
extern "C" int g_memfit_decode_amx;

struct alignas(64) DecodeTileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Tiles of the P . V phase: 1 = V pairs (B: 16 pairs x 16 columns), 3-6 = O (G x 16 fp32 each), 7 = P (A: G x 32
// bf16). Both kernels score under score_tile_config (below) and take this one for P . V.
inline void decode_tile_config(int G) {
    DecodeTileConfig cfg;
    cfg.rows[1] = 16, cfg.colsb[1] = 64;
    for (int t = 3; t < 8; t++) cfg.rows[t] = (uint8_t)G, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

// Software requests into L2 this many rows ahead of the tile loads (attend.h's request_l2). The tile unit leaves the
// kernel waiting on memory, so it asks further ahead than attend.h's ROW_LEAD.
constexpr int64_t AMX_LEAD = 256;
// Rows [at, upto) into L2 ahead of the tile loads. Rows at a stride (a per-layer head's) as attend.h's request_l2,
// every line; a run of adjacent rows (a paged block's, a head-major slot's) by its first AMX_PRIME bytes and then
// one line every AMX_SPARSE bytes. Why: each software request holds one of L1's few fill buffers until its line
// arrives, which caps the lines in flight; the first lines of a run start the L2 streamer on it, which then runs
// ahead with more. The paged reader at the 1B layer, one thread, interleaved in a fixed order, nothing else running
// (6 December, 22:42 UTC, blocks of 128, both 128 rows ahead): every line 579 us at 8 x 512 tokens, 1050 at 1 x 8192,
// 2033 at 8 x 2048, 2293 at 32 x 512, against 518, 905, 1811 and 1944 us; level at 32 x 2048 (14973 against 15151),
// where K and V (134 MB) come from memory. A later run at AMX_LEAD read the primed form alike, and one in shuffled
// order moved single cells by up to 30% with the order; benchmarks/paged_vllm.py's run is the committed figure.
constexpr int64_t AMX_PRIME = 512, AMX_SPARSE = 1024;
template <int D, typename Rows>
inline void request_runs_l2(const Rows& rows, int64_t& at, int64_t upto) {
    if (rows.step != D) return request_l2<uint16_t, D>(rows, at, upto);
    for (int64_t n; at < upto; at += n) {
        const char* p = (const char*)rows.run(at, upto, n);
        const int64_t bytes = n * D * 2;
        for (int64_t i = 0; i < std::min(bytes, AMX_PRIME); i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
        for (int64_t i = AMX_SPARSE; i < bytes; i += AMX_SPARSE) _mm_prefetch(p + i, _MM_HINT_T1);
    }
}
// A per-layer slot's token rows [0, upto) into L2 ahead of attend_heads_amx, asked for in order a share at a time.
// Where each token's row of every head lies side by side and the rows follow each other (step == Hkv x D, head == D:
// the per-layer layout), the slot's K (or V) is one run of memory and is asked for as request_runs_l2 asks for a
// paged block's: its first AMX_PRIME bytes, then a line every AMX_SPARSE bytes, the L2 streamer fetching the rest;
// elsewhere (rows further apart, a token-major slot's) every line of each head's row, as attend.h's RowStream.
// With attend_heads_amx's 256-token P . V blocks, in one engine (benchmarks/decode_amx_ab.py's setup, 0.1b, 8 x 4000
// tokens, 7 December, scratch runs not kept) the per-layer tile step went from 75.82 to 66.50 ms (0.88x); in a
// 12-layer harness the P . V blocks alone gave 0.94x and these run requests 0.93-0.96x on top.
template <int D>
struct HeadRowsL2 {
    RowStream<uint16_t, D> rows;  // base, step (elements a token), L, rows requested
    int Hkv;
    int64_t head;  // elements between a token's heads
    void advance(int64_t upto) {
        if (rows.step != Hkv * head || head != D) return rows.advance(upto, Hkv, head);
        const char* p = (const char*)rows.base;
        const int64_t row = rows.step * 2, from = rows.at * row, to = std::min(upto, rows.L) * row;
        for (int64_t i = from; i < std::min(to, AMX_PRIME); i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
        for (int64_t i = std::max<int64_t>(1, (from + AMX_SPARSE - 1) / AMX_SPARSE) * AMX_SPARSE; i < to; i += AMX_SPARSE)
            _mm_prefetch(p + i, _MM_HINT_T1);
        rows.at = std::max(rows.at, std::min(upto, rows.L));
    }
};

// Whether a read of rows `step` elements apart takes the tiles, for a cache with Hkv KV heads read a sequence at a
// time (`by_seq`: attend_heads_amx) or head by head (attend_group_amx). Mode 2 ("auto", kernels/decode.py's
// default where AMX runs):
// - a head's rows in runs (step == D: paged blocks and head-major slots, whose runs request_runs_l2 primes): the
//   tiles. In the engine (benchmarks/decode_amx_ab.py, 0.1b, 8 x 4000 tokens) 0.85-0.87x AVX-512's step time on the
//   paged cache, 0.84-0.89x on head-major slots.
// - per-layer rows (step == Hkv x D, a token's heads side by side): the tiles where a KV head has at least
//   AMX_PER_LAYER_G query heads (G, the tiles' columns), read either way, and, a sequence at a time, rows of at most
//   AMX_RUN_ROW_MAX bytes at any G. benchmarks/decode_amx_rows.py (12 layers read in turn, one thread, tiles over
//   AVX-512; docs/benchmarks.md): at G 4 and 7, 256 B to 2 KiB rows (D 64 and 128), 0.58-0.85x a sequence at a
//   time but level at 1 KiB and D 64 (0.92-1.04x over three runs), and 0.51-1.01x head by head; at G 1-3 it goes
//   both ways (a sequence at a time 0.79-1.17x; head by head 0.82-1.30x). Rows of at most 512 B a sequence at a time stay on the tiles at any G
//   though not faster there (G 3, the 0.1b shape: 1.00-1.05x in that harness, 0.91-1.04x in the engine): level, and
//   the tiles give the paged cache's bits. (A paged pool with token-major blocks, which the engine never builds on a
//   CPU, has step == Hkv x D too and is read as per-layer rows.)
// - rows further apart (a token-major slot's, where a token's row holds every layer's): AVX-512, not measured.
constexpr int64_t AMX_RUN_ROW_MAX = 512;
constexpr int AMX_PER_LAYER_G = 4;
inline bool decode_amx_takes(int G, int D, int64_t step, int Hkv, bool by_seq) {
    const int mode = g_memfit_decode_amx;
    const bool per_layer = Hkv > 1 && step == (int64_t)Hkv * D;
    const bool runs = step == D || (per_layer && (G >= AMX_PER_LAYER_G || (by_seq && step * 2 <= AMX_RUN_ROW_MAX)));
    return (mode == 1 || (mode == 2 && runs)) && G >= 1 && G <= 16 && D % 32 == 0 && D <= 128;
}

// The steps below are shared by attend_group_amx (a head at a time) and attend_heads_amx (every head of a
// sequence, a block of tokens at a time): the same instructions on the same values in the same order, so both
// give the same bits (tests/llm/kernels/test_decode_amx.py).

// Q^T of one group in pairs, the B tiles of the scores: qt[c][r][g] = (Q[g][32c + 2r], Q[g][32c + 2r + 1]), 0 past G.
template <int D>
inline void pack_q(const uint16_t* q, int G, uint32_t (*qt)[16][16]) {
    for (int c = 0; c < D / 32; c++)
        for (int r = 0; r < 16; r++) {
            _mm512_store_si512(qt[c][r], _mm512_setzero_si512());
            for (int g = 0; g < G; g++) memcpy(&qt[c][r][g], q + (int64_t)g * D + 32 * c + 2 * r, 4);
        }
}

// Column g of a stored S^T tile (16 tokens x G), scaled, to s + g * lds (row g of S); mx[g] the running maxima.
inline void scores_from_st(const float (*st)[16], int G, float scale, float* s, int64_t lds, __m512* mx) {
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    const __m512 sv = _mm512_set1_ps(scale);
    for (int g = 0; g < G; g++) {
        const __m512 r = _mm512_mul_ps(_mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32(g)), &st[0][0], 4), sv);
        _mm512_storeu_ps(s + (int64_t)g * lds, r);
        mx[g] = _mm512_max_ps(mx[g], r);
    }
}

// Tiles of the score phase (score_block): 0-3 = S^T of four 16-token groups (16 x G fp32), 4-5 = K rows (A),
// 6-7 = Q^T (B; for D <= 64 both chunks stay loaded, else chunks alternate between them). The P . V phase
// reconfigures to decode_tile_config (loading a configuration zeroes every tile).
inline void score_tile_config(int G) {
    DecodeTileConfig cfg;
    for (int t = 0; t < 4; t++) cfg.rows[t] = 16, cfg.colsb[t] = (uint16_t)(4 * G);
    cfg.rows[4] = cfg.rows[5] = 16, cfg.colsb[4] = cfg.colsb[5] = 64;
    cfg.rows[6] = cfg.rows[7] = 16, cfg.colsb[6] = cfg.colsb[7] = (uint16_t)(4 * G);
    _tile_loadconfig(&cfg);
}

// The scores of n <= 4 groups of 16 tokens (group j's rows start at kb[j], ks[j] bytes apart) on four accumulator
// tiles, so the tile unit overlaps the groups' multiply-add chains where one accumulator would wait on each (each
// TDPBF16PS adds to the tile the previous one wrote). A group's S^T is its own D / 32 multiply-adds in order, so a
// group's bits do not depend on n or on the groups beside it. Needs score_tile_config and, for D <= 64, Q^T chunk c
// in tile 6 + c.
template <int D>
inline void score_block(const uint16_t* const* kb, const int64_t* ks, int n, const uint32_t (*qt)[16][16], int G,
                        float scale, float* s, int64_t lds, __m512* mx) {
    _tile_zero(0);
    if (n > 1) _tile_zero(1);
    if (n > 2) _tile_zero(2);
    if (n > 3) _tile_zero(3);
#define MEMFIT_SCORE_GROUP(J, KT, QT) \
    if (n > J) { \
        _tile_loadd(KT, kb[J] + 32 * c, ks[J]); \
        _tile_dpbf16ps(J, KT, QT); \
    }
    _Pragma("GCC unroll 4")
    for (int c = 0; c < D / 32; c++) {
        if (c % 2 == 0) {
            if (D > 64) _tile_loadd(6, &qt[c][0][0], 64);
            MEMFIT_SCORE_GROUP(0, 4, 6)
            MEMFIT_SCORE_GROUP(1, 5, 6)
            MEMFIT_SCORE_GROUP(2, 4, 6)
            MEMFIT_SCORE_GROUP(3, 5, 6)
        } else {
            if (D > 64) _tile_loadd(7, &qt[c][0][0], 64);
            MEMFIT_SCORE_GROUP(0, 4, 7)
            MEMFIT_SCORE_GROUP(1, 5, 7)
            MEMFIT_SCORE_GROUP(2, 4, 7)
            MEMFIT_SCORE_GROUP(3, 5, 7)
        }
    }
#undef MEMFIT_SCORE_GROUP
    alignas(64) float st[4][16][16];
    _tile_stored(0, &st[0][0][0], 64);
    if (n > 1) _tile_stored(1, &st[1][0][0], 64);
    if (n > 2) _tile_stored(2, &st[2][0][0], 64);
    if (n > 3) _tile_stored(3, &st[3][0][0], 64);
    for (int j = 0; j < n; j++) scores_from_st(st[j], G, scale, s + 16 * j, lds, mx);
}

// One score row: the tokens [full, L) that no 16-row tile covered by attend.h's dot product (row(t): K row t), then
// p = exp(s - m) in fp32, rounded to bf16 over the row's first half (zeros to Lp); returns 1 / sum p.
template <int D, typename RowAt>
inline float softmax_row_bf16(const uint16_t* qg, float* s, int64_t full, int64_t L, int64_t Lp, float scale, float m,
                              RowAt row) {
    if (full < L) {
        QRow<uint16_t, D> qr;
        qr.load(qg);
        for (int64_t t = full; t < L; t++) {
            const float r = _mm512_reduce_add_ps(qr.dot_lanes(row(t))) * scale;
            s[t] = r;
            m = std::max(m, r);
        }
    }
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    uint16_t* p = (uint16_t*)s;  // 16 bf16 over the 16 floats already read: the row is read ahead of its writes
    for (int64_t t = 0; t < Lp; t += 16) {
        const __mmask16 mk = t + 16 <= L ? (__mmask16)0xffff : t < L ? (__mmask16)((1u << (L - t)) - 1u) : 0;
        const __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), mv)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i*)(p + t), to_bf16(e));
    }
    return 1.f / _mm512_reduce_add_ps(sum);
}

// V rows a and b (nullptr: zeros past the context) as one row of pairs: vp[d] = (V[a][d], V[b][d]).
template <int D>
inline void pair_rows(const uint16_t* va, const uint16_t* vb, uint32_t* vp) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                        5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    _Pragma("GCC unroll 4")
    for (int c = 0; c < D / 32; c++) {
        const __m512i x = va ? _mm512_loadu_si512(va + 32 * c) : _mm512_setzero_si512();
        const __m512i y = vb ? _mm512_loadu_si512(vb + 32 * c) : _mm512_setzero_si512();
        _mm512_store_si512(vp + 32 * c, _mm512_permutex2var_epi16(x, lo, y));
        _mm512_store_si512(vp + 32 * c + 16, _mm512_permutex2var_epi16(x, hi, y));
    }
}

// O += P (G rows x 32 tokens at p, rows `ps` bytes apart) . V (the 32 tokens' pairs in vp) for D <= 64, O in tiles
// 3-4 (D 32) or 3-6 (D 64).
template <int D>
inline void pv32_in_tiles(const uint16_t* p, int64_t ps, const uint32_t (*vp)[D]) {
    _tile_loadd(7, p, ps);
    _tile_loadd(1, &vp[0][0], D * 4);
    _tile_dpbf16ps(3, 7, 1);
    _tile_loadd(1, &vp[0][16], D * 4);
    _tile_dpbf16ps(4, 7, 1);
    if (D == 64) {
        _tile_loadd(1, &vp[0][32], D * 4);
        _tile_dpbf16ps(5, 7, 1);
        _tile_loadd(1, &vp[0][48], D * 4);
        _tile_dpbf16ps(6, 7, 1);
    }
}
template <int D>
inline void o_tiles(float* o, bool store) {  // tiles 3-4 (3-6) <-> o (G x D fp32, rows D x 4 bytes apart)
    if (store) {
        _tile_stored(3, o, D * 4);
        _tile_stored(4, o + 16, D * 4);
        if (D == 64) {
            _tile_stored(5, o + 32, D * 4);
            _tile_stored(6, o + 48, D * 4);
        }
    } else {
        _tile_loadd(3, o, D * 4);
        _tile_loadd(4, o + 16, D * 4);
        if (D == 64) {
            _tile_loadd(5, o + 32, D * 4);
            _tile_loadd(6, o + 48, D * 4);
        }
    }
}
// The same for D > 64: O in memory (o: G x D fp32), 64 columns at a time through tiles 3-6.
template <int D>
inline void pv32_in_memory(const uint16_t* p, int64_t ps, const uint32_t (*vp)[D], float* o) {
    _tile_loadd(7, p, ps);
    for (int d0 = 0; d0 < D; d0 += 64) {
        _tile_loadd(3, o + d0, D * 4);
        _tile_loadd(4, o + d0 + 16, D * 4);
        _tile_loadd(1, &vp[0][d0], D * 4);
        _tile_dpbf16ps(3, 7, 1);
        _tile_loadd(1, &vp[0][d0 + 16], D * 4);
        _tile_dpbf16ps(4, 7, 1);
        _tile_stored(3, o + d0, D * 4);
        _tile_stored(4, o + d0 + 16, D * 4);
        if (D - d0 > 32) {
            _tile_loadd(5, o + d0 + 32, D * 4);
            _tile_loadd(6, o + d0 + 48, D * 4);
            _tile_loadd(1, &vp[0][d0 + 32], D * 4);
            _tile_dpbf16ps(5, 7, 1);
            _tile_loadd(1, &vp[0][d0 + 48], D * 4);
            _tile_dpbf16ps(6, 7, 1);
            _tile_stored(5, o + d0 + 32, D * 4);
            _tile_stored(6, o + d0 + 48, D * 4);
        }
    }
}

inline void store_rows_bf16(const float* o, int G, int D, const float* inv, uint16_t* out) {
    for (int g = 0; g < G; g++)
        for (int j = 0; j < D; j += 16)
            _mm256_storeu_si256((__m256i*)(out + (int64_t)g * D + j),
                                to_bf16(_mm512_mul_ps(_mm512_load_ps(o + (size_t)g * D + j), _mm512_set1_ps(inv[g]))));
}

template <int D, typename Rows>
__attribute__((noinline)) void attend_group_amx(const uint16_t* q, const Rows& krows, const Rows& vrows, int64_t L,
                                                int G, float scale, uint16_t* out, std::vector<float>& sc) {
    const int64_t Lp = (L + 31) / 32 * 32;  // score row stride: P's bf16 rows are read 32 tokens a tile
    sc.resize((size_t)G * (size_t)Lp + (size_t)G * D + 16);
    float* const S = sc.data();
    float* const O = (float*)(((uintptr_t)(S + (size_t)G * Lp) + 63) & ~(uintptr_t)63);  // (G, D) fp32 sums
    alignas(64) uint32_t qt[D / 32][16][16];
    alignas(64) uint16_t krow[4][16][D];  // a group's K rows where they do not lie at one stride (paged blocks < 16)
    alignas(64) uint32_t vp[16][D];  // a step's V pairs
    pack_q<D>(q, G, qt);
    const int64_t full = L / 16 * 16;
    for (int64_t i = 0; i < 16 && i < L; i++) prefetch_row<uint16_t, D>(krows.at(i));
    int64_t kat = std::min<int64_t>(16, L);
    __m512 mx[16];
    for (int g = 0; g < G; g++) mx[g] = _mm512_set1_ps(-INFINITY);
    score_tile_config(G);
    if (D <= 64) {
        _tile_loadd(6, &qt[0][0][0], 64);
        if (D == 64) _tile_loadd(7, &qt[1][0][0], 64);
    }
    for (int64_t t = 0; t < full; t += 64) {  // 64 tokens a step, in four groups of 16
        const int ng = (int)std::min<int64_t>(4, (full - t) / 16);
        request_runs_l2<D>(krows, kat, std::min(t + 64 + AMX_LEAD, L));
        const uint16_t* kb[4];
        int64_t ks[4];
        for (int j = 0; j < ng; j++) {
            int64_t n;
            kb[j] = krows.run(t + 16 * j, L, n);
            ks[j] = krows.step * 2;
            if (!Rows::one_run && n < 16) {  // a paged block ends inside these 16 rows
                for (int i = 0; i < 16; i++) memcpy(krow[j][i], krows.at(t + 16 * j + i), D * 2);
                kb[j] = &krow[j][0][0], ks[j] = D * 2;
            }
        }
        score_block<D>(kb, ks, ng, qt, G, scale, S + t, Lp, mx);
    }
    decode_tile_config(G);  // the P . V phase's tiles
    float inv[16];
    for (int g = 0; g < G; g++)
        inv[g] = softmax_row_bf16<D>(q + (int64_t)g * D, S + (size_t)g * Lp, full, L, Lp, scale,
                                     _mm512_reduce_max_ps(mx[g]), [&](int64_t t) { return krows.at(t); });
    const int64_t ps = Lp * 4;  // bytes between P's rows (each over its fp32 score row)
    const uint16_t* P = (const uint16_t*)S;
    for (int64_t i = 0; i < 16 && i < L; i++) prefetch_row<uint16_t, D>(vrows.at(i));
    int64_t vat = std::min<int64_t>(16, L);
    if (D <= 64) {
        _tile_zero(3);
        _tile_zero(4);
        if (D == 64) {
            _tile_zero(5);
            _tile_zero(6);
        }
    } else {
        for (int64_t i = 0; i < (int64_t)G * D; i += 16) _mm512_store_ps(O + i, _mm512_setzero_ps());
    }
    for (int64_t t0 = 0; t0 < L; t0 += 32) {
        request_runs_l2<D>(vrows, vat, std::min(t0 + 32 + AMX_LEAD, L));
        for (int r = 0; r < 16; r++) {
            const int64_t a = t0 + 2 * r;
            pair_rows<D>(a < L ? vrows.at(a) : nullptr, a + 1 < L ? vrows.at(a + 1) : nullptr, vp[r]);
        }
        if (D <= 64)
            pv32_in_tiles<D>(P + t0, ps, vp);
        else
            pv32_in_memory<D>(P + t0, ps, vp, O);
    }
    if (D <= 64) o_tiles<D>(O, true);
    _tile_release();  // the tile state back to its initial one, as cpu_amx.cpp does after its calls
    store_rows_bf16(O, G, D, inv, out);
}

// Every KV head of one sequence a block of TB tokens at a time: attend.h's attend_heads on the tiles. Read head by
// head, each pass over a per-layer cache streams rows Hkv x D apart; here a block of tokens is scored for every
// head while its rows are in cache, then V likewise: a token's row of every head is one run of memory (K row t of
// head h at kb + t * kstep + h * khead, khead < kstep; V likewise). Per (KV head, query head) the steps are
// attend_group_amx's in its order (O kept in memory between blocks: exact), so the bits are attend_group_amx's.
// (A paged cache's blocks read this way, every head at once, measured slower than head by head: cpu_paged.cpp.)
// Memory bounds it: at the 0.1b shape (8 x 4000 tokens, 12 layers, 390 MB of K/V from memory, one thread) it reads
// 8.6-9.4 GB/s, the K and V phases alike, where a plain read of the same bytes reaches 14-16. Tried and measured
// level (a harness calling this kernel, 7 December; same bits, 43-45 ms against 42-45): no software requests at all
// (45 ms), every line requested (45), lines touched with loads a block ahead (53), K copied head-major a block
// ahead and V paired for every head a 256-token block ahead as plain sequential passes, software-pipelined with
// the tile work; those passes alone, without the tile work, took 38-39 ms (10-11 GB/s).
template <int D>
__attribute__((noinline)) void attend_heads_amx(const uint16_t* q, const uint16_t* kb, int64_t kstep, int64_t khead,
                                                const uint16_t* vb, int64_t vstep, int64_t vhead, int64_t L, int Hkv,
                                                int G, float scale, uint16_t* out, std::vector<float>& sc) {
    // tokens a block of the scores, and of P . V (multiples of 32: whole PV steps). P . V keeps a head's O in the
    // tiles over a block, loaded and stored around it: blocks of 256 (128 KiB of V rows at Hkv 4, D 64, which stay in
    // L2 while each head takes its turn) store O a quarter as often as 64's did
    constexpr int64_t TB = 64, TV = 256;
    const int H = Hkv * G;
    const int64_t Lp = (L + 31) / 32 * 32;
    sc.resize((size_t)H * (size_t)Lp + (size_t)H * D + 16);
    float* const S = sc.data();
    float* const O = (float*)(((uintptr_t)(S + (size_t)H * Lp) + 63) & ~(uintptr_t)63);  // (H, D) fp32 sums
    alignas(64) uint32_t qt[16][D / 32][16][16];  // every group's Q^T (Hkv <= 16)
    alignas(64) uint32_t vp[16][D];
    for (int h = 0; h < Hkv; h++) pack_q<D>(q + (int64_t)h * G * D, G, qt[h]);
    const int64_t full = L / 16 * 16;
    // rows into L2 as attend_heads asks for them: each step of a block's work asks for its share of the rows two
    // blocks on (the last block of scores: V's first rows)
    HeadRowsL2<D> kpf{{kb, kstep, L, 0}, Hkv, khead}, vpf{{vb, vstep, L, 0}, Hkv, vhead};
    kpf.advance(2 * TB);
    const int64_t kchunks = (int64_t)Hkv * (TB / 16), vunits = (int64_t)Hkv * (TV / 32);
    __m512 mx[256];  // H <= 256 (G <= 16, Hkv <= 16)
    for (int hg = 0; hg < H; hg++) mx[hg] = _mm512_set1_ps(-INFINITY);
    // a head's 64 tokens of a block on four accumulator tiles (score_block, as attend_group_amx scores): the tile
    // unit overlaps the four groups' multiply-add chains. Before, 16 tokens at a time on one accumulator, waiting on
    // each chain in turn, the tiles took 1.07-1.15x AVX-512's time at 1 KiB rows (now 0.92-1.02x) and 0.67-0.77x at
    // 256 B (now 0.58-0.66x) (benchmarks/decode_amx_rows.py, 7 December, the two trees alternating)
    score_tile_config(G);
    for (int64_t b0 = 0; b0 < full; b0 += TB) {
        const int64_t b1 = std::min(b0 + TB, full);
        const int ng = (int)((b1 - b0) / 16);
        int64_t chunk = 0;
        for (int h = 0; h < Hkv; h++) {
            chunk += ng;
            kpf.advance(b1 + TB + (chunk * TB) / kchunks);
            if (b1 == full) vpf.advance((chunk * TB) / kchunks);
            if (D <= 64) {  // score_block's Q^T tiles: this head's chunks
                _tile_loadd(6, &qt[h][0][0][0], 64);
                if (D == 64) _tile_loadd(7, &qt[h][1][0][0], 64);
            }
            const uint16_t* kbs[4];
            int64_t kss[4];
            for (int j = 0; j < ng; j++) kbs[j] = kb + (b0 + 16 * j) * kstep + h * khead, kss[j] = kstep * 2;
            score_block<D>(kbs, kss, ng, qt[h], G, scale, S + (size_t)h * G * Lp + b0, Lp, mx + h * G);
        }
    }
    decode_tile_config(G);  // the P . V phase's tiles
    float inv[256];
    for (int h = 0; h < Hkv; h++)
        for (int g = 0; g < G; g++) {
            const int hg = h * G + g;
            inv[hg] = softmax_row_bf16<D>(q + (int64_t)hg * D, S + (size_t)hg * Lp, full, L, Lp, scale,
                                          _mm512_reduce_max_ps(mx[hg]),
                                          [&](int64_t t) { return kb + t * kstep + h * khead; });
        }
    const int64_t ps = Lp * 4;
    const uint16_t* P = (const uint16_t*)S;
    for (int64_t i = 0; i < (int64_t)H * D; i += 16) _mm512_store_ps(O + i, _mm512_setzero_ps());
    vpf.advance(2 * TV);
    for (int64_t b0 = 0; b0 < L; b0 += TV) {
        const int64_t b1 = std::min(b0 + TV, L);
        int64_t vunit = 0;
        for (int h = 0; h < Hkv; h++) {
            float* o = O + (size_t)h * G * D;
            if (D <= 64) o_tiles<D>(o, false);
            for (int64_t t0 = b0; t0 < b1; t0 += 32) {
                vpf.advance(b1 + TV + (++vunit * TV) / vunits);
                for (int r = 0; r < 16; r++) {
                    const int64_t a = t0 + 2 * r;
                    pair_rows<D>(a < L ? vb + a * vstep + h * vhead : nullptr,
                                 a + 1 < L ? vb + (a + 1) * vstep + h * vhead : nullptr, vp[r]);
                }
                const uint16_t* p = P + (size_t)h * G * Lp * 2 + t0;  // P's rows of this group, at t0
                if (D <= 64)
                    pv32_in_tiles<D>(p, ps, vp);
                else
                    pv32_in_memory<D>(p, ps, vp, o);
            }
            if (D <= 64) o_tiles<D>(o, true);
        }
    }
    _tile_release();
    store_rows_bf16(O, H, D, inv, out);
}

#pragma GCC pop_options
#endif  // AMX intrinsics
