// The many-row path of cpu_blocked.cpp (prefill: x read in place, cache blocking over M), and the MLP's fused
// gate/up + SiLU x up call built on it. Included by cpu_blocked.cpp inside its anonymous namespace, after the
// tiles (tile_fn, mr_max), store_panel, load_bias, to_bf16 and for_runs it uses; silu_table.h at file scope.
// A header of its own only to keep cpu_blocked.cpp to one subject a file (the decode-sized path); one
// translation unit, so nothing crosses a library boundary.
#pragma once

// ---- many rows (prefill): x read in place, cache blocking over M ------------------------------------------
// From LARGE_M rows on, packing x step-major (pack_x) costs a pass over x per call and the packed copy, like
// the (M, NB) accumulators, outgrows L2 (M = 512, K = 2048: 2 MiB), so every panel re-reads both from L3.
// run_large instead broadcasts straight from x's rows (each row one sequential stream) and works through M in
// blocks of about BLK_MB_BYTES of x: a block stays in L2 while every panel passes over it, each panel's K
// chunk stays in L1 while the block's row tiles re-read it. Tuned on one Zen 5 core over the 0.1b layer's
// four matmuls at 512 rows (a C loop timing compiled variants, not kept): 128 KiB blocks of x and 32 KiB
// weight chunks 193 GMAC/s against 177 with 256/16 KiB, 184 for the packed path (run); at 2048 rows 199
// against 187 (and 145 for run, whose packed x no longer fits L2). oneDNN's F.linear: 1.0-1.1x of it.
#ifndef BLK_LARGE_M
#define BLK_LARGE_M 64
#endif
#ifndef BLK_MB_BYTES
#define BLK_MB_BYTES 131072
#endif
#ifndef BLK_LARGE_CHUNK_BYTES
#define BLK_LARGE_CHUNK_BYTES 32768
#endif

static int64_t g_large_m = BLK_LARGE_M;
inline int64_t large_m() { return g_large_m; }

// One panel's sums over one block of rows (run_large): acc (rows, NB) = x's rows [0, rows) (row stride ldx)
// times the panel w's `steps` steps, chunk by chunk, each chunk re-read from L1 by every row tile while the
// next one is prefetched into L1 (split over the tiles, as in run).
template <typename E, int P>
inline void panel_sums(const typename E::T* xb, int64_t ldx, const typename E::T* w, int64_t steps, int64_t chunk,
                       int64_t rows, const TileFn* fns, float* acc) {
    constexpr int NB = 16 * P, MRX = mr_max<P>();
    using T = typename E::T;
    const int64_t ntiles = (rows + MRX - 1) / MRX;
    for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
        const int64_t cs = steps - c0 < chunk ? steps - c0 : chunk;
        const T* wc = w + c0 * NB * E::SPAN;
        const int64_t cbytes = cs * NB * E::SPAN * (int64_t)sizeof(T), share = cbytes / ntiles;
        const int64_t stride = share / cs;
        const int lines = (int)((stride + 63) / 64);
        for (int64_t i = 0; i < ntiles; i++) {
            const int64_t r0 = i * MRX;
            const int mr = (int)(rows - r0 < MRX ? rows - r0 : MRX);
            fns[mr - 1](xb + r0 * ldx + c0 * E::SPAN, ldx, wc, cs, acc + r0 * NB, c0 == 0,
                        (const char*)wc + PF_BYTES + i * share, stride, lines);
        }
    }
}

// Row blocks of x: at most about BLK_MB_BYTES of x a block (it stays in L2 while every panel passes over it), a
// whole number of row tiles and, where M allows, at least four, so that each weight chunk is re-read from L1.
// Every block streams the whole weight matrix once, so a block of a few rows (a 256-row MLP block at K = 768 cut
// into 84 + 84 + 84 + 4) streams it for next to no arithmetic, at memory speed. M's row tiles are spread over as
// many blocks as the size limit needs, the first blocks taking one more tile where they do not divide (84 x 3 + 4
// -> 66 + 66 + 66 + 58; 271 rows at K = 2048: 9 x 30 + 1 -> 6 x 30 + 3 x 24 + 19). Returns the blocks' first rows
// and M: block i is rows [b[i], b[i + 1]); the first block is the largest.
template <typename E, int P>
std::vector<int64_t> large_blocks(int64_t M, int64_t K) {
    constexpr int MRX = mr_max<P>();
    int64_t mb = (int64_t)BLK_MB_BYTES / (K * (int64_t)sizeof(typename E::T)) / MRX * MRX;
    if (mb < 4 * MRX) mb = 4 * MRX;
    std::vector<int64_t> starts{0};
    if (mb >= M) {
        starts.push_back(M);
        return starts;
    }
    const int64_t tiles = (M + MRX - 1) / MRX, blocks = (M + mb - 1) / mb;  // tiles <= blocks * mb / MRX
    const int64_t per = tiles / blocks, extra = tiles % blocks;
    for (int64_t i = 0, r = 0; i < blocks; i++) {
        r += (per + (i < extra ? 1 : 0)) * MRX;
        starts.push_back(r < M ? r : M);
    }
    return starts;
}

template <typename E>
int64_t large_chunk(int64_t NB) {  // steps of one panel's K chunk (BLK_LARGE_CHUNK_BYTES)
    const int64_t c = (int64_t)(BLK_LARGE_CHUNK_BYTES / (NB * E::SPAN * sizeof(typename E::T)));
    return c > 0 ? c : 1;
}

// The many-row driver: for each row block, every panel's sums (rows, NB) in float, handed to
// store(acc, m0, rows, p) (row block from m0, panel p); run_large stores them plainly, run_large_rope rotated.
template <typename E, int P, typename Store>
void run_large_panels(const typename E::T* x, int64_t ldx, const typename E::T* wp, int64_t M, int64_t N, int64_t K,
                      int nthreads, Store store) {
    constexpr int NB = 16 * P, MRX = mr_max<P>();
    const int64_t steps = K / E::SPAN;  // K is a whole number of steps here (see linear)
    const int64_t panels = (N + NB - 1) / NB;
    const int64_t panel_elems = steps * NB * E::SPAN;
    const std::vector<int64_t> blk = large_blocks<E, P>(M, K);
    const int64_t mb = blk[1] - blk[0], chunk = large_chunk<E>(NB);
    TileFn fns[MRX];
    for (int r = 1; r <= MRX; r++) fns[r - 1] = tile_fn<E, P>(r, true, true);

    auto work = [&](int64_t p0, int64_t p1) {
        std::vector<float> acc((size_t)(mb * NB));
        for (size_t bi = 0; bi + 1 < blk.size(); bi++) {
            const int64_t m0 = blk[bi], rows = blk[bi + 1] - m0;
            for (int64_t p = p0; p < p1; p++) {
                panel_sums<E, P>(x + m0 * ldx, ldx, wp + p * panel_elems, steps, chunk, rows, fns, acc.data());
                store(acc.data(), m0, rows, p);
            }
        }
    };
    for_runs(panels, nthreads, work);
}

template <typename E, int P>
void run_large(const typename E::T* x, int64_t ldx, const typename E::T* wp, const typename E::T* b, typename E::T* y,
               int64_t ldy, int64_t M, int64_t N, int64_t K, int nthreads) {
    run_large_panels<E, P>(x, ldx, wp, M, N, K, nthreads, [&](const float* acc, int64_t m0, int64_t rows, int64_t p) {
        store_panel<typename E::T, P>(acc, b, y + m0 * ldy, ldy, rows, p * 16 * P, N);
    });
}

// ---- the attention's q/k/v matmul with the rotary embedding in its store ------------------------------------
// For heads of D = NB = 64 columns (one panel a head): the first rot_cols columns (q's and k's heads) of y =
// x W^T + b are stored rotated, y[m, head] = rnd(rnd(v * cos_m) + rnd(roll(v, 32) * sin_m)) with v the bf16 the
// plain store writes and cos_m/sin_m row m's (signed-sine) tables: the instructions and roundings of
// cpu_decode.cpp's rope_rows over the plain output (rnd16: vcvtneps2bf16), so the same bits without reading q and k
// back. The columns past rot_cols (v's heads) are stored plain.
inline __m512 widen16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 rnd_ne(__m512 v) { return widen16((__m256i)_mm512_cvtneps_pbh(v)); }

inline void store_rope_panel(const float* acc, const uint16_t* b, uint16_t* y, int64_t ldy, int64_t rows, int64_t n0,
                             const uint16_t* cos, const uint16_t* sin, int64_t ldc) {
    constexpr int NB = 64;
    __m512 bv[4];
    for (int j = 0; j < 4; j++) bv[j] = b ? load_bias(b + n0 + j * 16, 0xffff) : _mm512_setzero_ps();
    for (int64_t m = 0; m < rows; m++) {
        __m512 v[4];
        for (int j = 0; j < 4; j++) v[j] = widen16(to_bf16(_mm512_add_ps(_mm512_loadu_ps(acc + m * NB + j * 16), bv[j])));
        const uint16_t* cm = cos + m * ldc;
        const uint16_t* sm = sin + m * ldc;
        for (int j = 0; j < 4; j++) {
            const __m512 c = widen16(_mm256_loadu_si256((const __m256i*)(cm + 16 * j)));
            const __m512 sn = widen16(_mm256_loadu_si256((const __m256i*)(sm + 16 * j)));
            const __m512 r = _mm512_add_ps(rnd_ne(_mm512_mul_ps(v[j], c)), rnd_ne(_mm512_mul_ps(v[(j + 2) % 4], sn)));
            _mm256_storeu_si256((__m256i*)(y + m * ldy + n0 + j * 16), (__m256i)_mm512_cvtneps_pbh(r));
        }
    }
}

// run_large<BF16, 4> with store_rope_panel for the panels below rot_cols / 64 (cos, sin: (M, 64), row stride ldc).
inline void run_large_rope(const uint16_t* x, int64_t ldx, const uint16_t* wp, const uint16_t* b, uint16_t* y,
                           int64_t ldy, int64_t M, int64_t N, int64_t K, int nthreads, const uint16_t* cos,
                           const uint16_t* sin, int64_t ldc, int64_t rot_cols) {
    constexpr int P = 4, NB = 64;
    const int64_t rot = rot_cols / NB;
    run_large_panels<BF16, P>(x, ldx, wp, M, N, K, nthreads, [&](const float* acc, int64_t m0, int64_t rows, int64_t p) {
        if (p < rot)
            store_rope_panel(acc, b, y + m0 * ldy, ldy, rows, p * NB, cos + m0 * ldc, sin + m0 * ldc, ldc);
        else
            store_panel<uint16_t, P>(acc, b, y + m0 * ldy, ldy, rows, p * NB, N);
    });
}

// The fused MLP store for one block of rows: the gate panel's sums cg and its up panel's cu (rows, NB) + their
// biases -> bf16 g and u, rounded as store_panel rounds the gate/up matmul's output; y[:rows, ng : ng + NB] =
// bf16(SiLU(g) * u), SiLU(g) looked up in memfit_silu_table(), the product rounded as cpu_decode.cpp's silu_mul
// rounds it: the bits of the unfused path (the matmul into (M, 2I), then silu_mul over it).
template <int P>
void store_silu_panel(const float* cg, const float* cu, const uint16_t* b, uint16_t* y, int64_t ldy, int64_t rows,
                      int64_t ng, int64_t nu, const uint16_t* tab) {
    constexpr int NB = 16 * P;
    for (int j = 0; j < P; j++) {
        const __m512 bg = b ? load_bias(b + ng + j * 16, 0xffff) : _mm512_setzero_ps();
        const __m512 bu = b ? load_bias(b + nu + j * 16, 0xffff) : _mm512_setzero_ps();
        for (int64_t m = 0; m < rows; m++) {
            const __m256i g = to_bf16(_mm512_add_ps(_mm512_loadu_ps(cg + m * NB + j * 16), bg));
            const __m256i u = to_bf16(_mm512_add_ps(_mm512_loadu_ps(cu + m * NB + j * 16), bu));
            // 32 bits at byte 2g: the entry in the low half, its neighbour shifted out
            const __m512i t = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(g), (const void*)tab, 2);
            const __m512 sg = _mm512_castsi512_ps(_mm512_slli_epi32(t, 16));
            const __m512 uf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16));
            _mm256_storeu_si256((__m256i*)(y + m * ldy + ng + j * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sg, uf)));
        }
    }
}

// run_large for the MLP's gate/up matrix (2I rows: the gate's, then the up's; I a multiple of NB): each gate
// panel and its up panel summed over the same block of rows, then stored fused (store_silu_panel), so neither
// half is written out and read back by silu_mul. Threads split the gate panels.
template <int P>
void run_large_silu(const uint16_t* x, int64_t ldx, const uint16_t* wp, const uint16_t* b, uint16_t* y, int64_t ldy,
                    int64_t M, int64_t I, int64_t K, int nthreads) {
    constexpr int NB = 16 * P, MRX = mr_max<P>();
    const int64_t steps = K / BF16::SPAN, half = I / NB;
    const int64_t panel_elems = steps * NB * BF16::SPAN;
    const std::vector<int64_t> blk = large_blocks<BF16, P>(M, K);
    const int64_t mb = blk[1] - blk[0], chunk = large_chunk<BF16>(NB);
    const uint16_t* tab = memfit_silu_table();
    TileFn fns[MRX];
    for (int r = 1; r <= MRX; r++) fns[r - 1] = tile_fn<BF16, P>(r, true, true);

    auto work = [&](int64_t p0, int64_t p1) {
        std::vector<float> acc((size_t)(2 * mb * NB));  // the gate panel's sums, then the up panel's
        float* cg = acc.data();
        float* cu = cg + mb * NB;
        for (size_t bi = 0; bi + 1 < blk.size(); bi++) {
            const int64_t m0 = blk[bi], rows = blk[bi + 1] - m0;
            for (int64_t p = p0; p < p1; p++) {
                panel_sums<BF16, P>(x + m0 * ldx, ldx, wp + p * panel_elems, steps, chunk, rows, fns, cg);
                panel_sums<BF16, P>(x + m0 * ldx, ldx, wp + (p + half) * panel_elems, steps, chunk, rows, fns, cu);
                store_silu_panel<P>(cg, cu, b, y + m0 * ldy, ldy, rows, p * NB, I + p * NB, tab);
            }
        }
    };
    for_runs(half, nthreads, work);
}
