// memfit's blocked matmul for many rows (prefill) on AMX tiles: y = x W^T (+ b), bf16 in, fp32 sums, bf16 out.
//
// It reads the weight in the blocked layout cpu_blocked.cpp packs once (no second copy of any weight):
//   panel[s][c][2] = (W[p*NB + c][2s], W[p*NB + c][2s+1])   (NB = 32, 48 or 64 columns a panel)
// which is the layout TDPBF16PS wants for its B tile: a tile of 16 steps (32 K values) by 16 columns is 16
// rows of 64 bytes, each NB * 4 bytes after the last, so TILELOADD reads it in place with that stride. x is
// copied per row block into tiles of 16 rows x 32 K values, 1 KiB each, 64-byte aligned (rows past M zero).
// Each 32-row by 32-column block of y sums in 4 accumulator tiles (tmm0-3) from 2 A tiles (tmm4-5) and 2 B
// tiles (tmm6-7), over K in chunks. Two column blocks go side by side: their chunks of W stay in L1 while every
// row tile passes over both, so each row tile's chunk of x comes from L2 once for the two (x from L2 bounded the
// kernel), and the next chunks are prefetched meanwhile. A block goes out to y (bf16, with the bias) right after
// its last chunk; the fused MLP pairs a gate block with its up block and writes only SiLU(gate) * up.
//
// Each output row is computed from its own x row alone, by the same instructions in the same K order
// whatever M is, so a row's bits do not depend on the call's rows: the MLP's row blocks (models/llama.py)
// change no bit. The bits differ from the AVX-512 kernel's (TDPBF16PS and VDPBF16PS add a pair's products in
// their own order), so decode steps, which run there, never come here (kernels/large_m.py chooses).
//
// Linux hands a process AMX's tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); without it, on a
// CPU without AMX-BF16, or built by a compiler without AMX intrinsics, memfit_amx_available() is 0 and
// callers stay on the AVX-512 kernel.
#include <stdint.h>

#include "silu_table.h"
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MEMFIT_AMX 1
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>

namespace {

#include "bf16x16.h"
#include "omp_split.h"

constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
constexpr long XFEATURE_XTILEDATA = 18;
constexpr int64_t AMX_MB_BYTES = 1 << 20;  // x per row block (at most 512 rows): stays in L2 (2 MiB here)
// K values per chunk: two 32-column blocks' chunks of W (8 KiB each) and a 32-row tile's of x (8 KiB) stay in L1
constexpr int64_t AMX_KC = 128;
// Column blocks computed side by side (the fused MLP: gate/up pairs). 2 measured best: with 3 or 4 (their W
// chunks at 128 or 64 K values) the 0.1b layer's matmuls ran 0-20% slower, 256 K values a chunk 5-15% slower.
constexpr int GROUP = 2;
static_assert(GROUP % 2 == 0, "the fused MLP takes gate/up pairs");

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};


bool cpu_has_amx_bf16() {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    return (d >> 22) & 1 && (d >> 24) & 1;  // AMX-BF16, AMX-TILE
}

void load_config() {
    TileConfig cfg;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;  // C: 16 fp32; A: 32 bf16; B: 16 steps x 16 columns x 2 bf16 = 64 bytes a row
    }
    _tile_loadconfig(&cfg);
}

// 16 bf16 -> 16 floats (exact: a bf16 is a float's top half).
inline __m512 widen_bf16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

// acc (16 rows of ldc floats: the tile stored as is) + bias -> y rows [0, rows), columns [n0, n0 + 16) cut at N.
void store_tile(const float* acc, int64_t ldc, const uint16_t* b, uint16_t* y, int64_t ldy, int64_t rows, int64_t n0,
                int64_t N) {
    const int64_t left = N - n0;
    if (left <= 0) return;
    const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    const __m512 bv = b ? widen_bf16(_mm256_maskz_loadu_epi16(mk, b + n0))
                        : _mm512_setzero_ps();
    for (int64_t m = 0; m < rows; m++)
        _mm256_mask_storeu_epi16(y + m * ldy + n0, mk, to_bf16(_mm512_add_ps(_mm512_loadu_ps(acc + m * ldc), bv)));
}

// A block's sums (c: `rows` <= 32 rows of 32 floats, tile (r, c) at rows 16r, columns 16c) + bias -> y rows
// [0, rows), columns [n0, n0 + 16 or 32) cut at N. Called right after the block's last K chunk, while its sums
// are still in L1 (a pass over the column block's sums afterwards read them back from L2: ~5% of the kernel's
// time at 512 rows); 32 whole columns go out as one 64-byte store a row instead of two halves.
void store_block(const float* c, const uint16_t* b, uint16_t* y, int64_t ldy, int64_t rows, int64_t n0, int64_t N,
                 bool two) {
    if (two && n0 + 32 <= N) {
        __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        if (b) {
            b0 = widen_bf16(_mm256_loadu_si256((const __m256i*)(b + n0)));
            b1 = widen_bf16(_mm256_loadu_si256((const __m256i*)(b + n0 + 16)));
        }
        for (int64_t m = 0; m < rows; m++) {
            const __m256i lo = to_bf16(_mm512_add_ps(_mm512_loadu_ps(c + m * 32), b0));
            const __m256i hi = to_bf16(_mm512_add_ps(_mm512_loadu_ps(c + m * 32 + 16), b1));
            _mm512_storeu_si512(y + m * ldy + n0, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
        }
        return;
    }
    const int64_t top = rows < 16 ? rows : 16;
    store_tile(c, 32, b, y, ldy, top, n0, N);
    if (two) store_tile(c + 16, 32, b, y, ldy, top, n0 + 16, N);
    if (rows > 16) {
        store_tile(c + 16 * 32, 32, b, y + 16 * ldy, ldy, rows - 16, n0, N);
        if (two) store_tile(c + 16 * 32 + 16, 32, b, y + 16 * ldy, ldy, rows - 16, n0 + 16, N);
    }
}

// The fused MLP epilogue for one row tile: the gate block's sums cg and the up block's cu (each as store_block's
// c: `rows` <= 32 rows of 32 floats) + their biases -> bf16 g and u, rounded as the unfused path stores the
// gate/up matmul's output; y rows [0, rows), columns [ng, ng + 16 or 32) = bf16(SiLU(g) * u), SiLU(g) looked up in
// memfit_silu_table(), the product rounded as cpu_decode.cpp's silu_mul rounds it: the bits of the unfused path (the
// matmul into (M, 2I), then silu_mul over it), with neither half written out.
void store_silu(const float* cg, const float* cu, const uint16_t* b, uint16_t* y, int64_t ldy, int64_t rows,
                int64_t ng, int64_t nu, bool two) {
    const uint16_t* tab = memfit_silu_table();
    for (int h = 0; h < (two ? 2 : 1); h++) {
        __m512 bg = _mm512_setzero_ps(), bu = _mm512_setzero_ps();
        if (b) {
            bg = widen_bf16(_mm256_loadu_si256((const __m256i*)(b + ng + 16 * h)));
            bu = widen_bf16(_mm256_loadu_si256((const __m256i*)(b + nu + 16 * h)));
        }
        for (int64_t m = 0; m < rows; m++) {
            const __m256i g = to_bf16(_mm512_add_ps(_mm512_loadu_ps(cg + m * 32 + 16 * h), bg));
            const __m512 u = widen_bf16(to_bf16(_mm512_add_ps(_mm512_loadu_ps(cu + m * 32 + 16 * h), bu)));
            // 32 bits at byte 2g: the entry in the low half, its neighbour shifted out
            const __m512i t = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(g), (const void*)tab, 2);
            const __m512 sg = _mm512_castsi512_ps(_mm512_slli_epi32(t, 16));
            _mm256_storeu_si256((__m256i*)(y + m * ldy + ng + 16 * h), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sg, u)));
        }
    }
}

// Asked once per process (a function-local static: thread-safe).
bool amx_enable() {
    static const bool ok = cpu_has_amx_bf16() && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ok;
}

// One block of R x 16 rows and C x 16 columns over `ksteps32` x 32 values of K, added to the sums in c (a
// (32, 32) fp32 tile store, row stride 128 bytes: tile (r, c) at rows 16r, columns 16c) or started from 0.
// a: x at the block's first row and K value (row stride lda elements); bp: the panel at the block's first
// column and K step (row stride ldb_bytes).
template <int R, int C>
void block(const uint16_t* a, int64_t lda, const uint16_t* bp, int64_t ldb_bytes, int64_t ksteps32, float* c,
           bool first) {
    if (first) {
        _tile_zero(0);
        if (C == 2) _tile_zero(1);
        if (R == 2) _tile_zero(2);
        if (R == 2 && C == 2) _tile_zero(3);
    } else {
        _tile_loadd(0, c, 128);
        if (C == 2) _tile_loadd(1, c + 16, 128);
        if (R == 2) _tile_loadd(2, c + 16 * 32, 128);
        if (R == 2 && C == 2) _tile_loadd(3, c + 16 * 32 + 16, 128);
    }
    for (int64_t kk = 0; kk < ksteps32; kk++) {
        const uint16_t* ak = a + kk * 16 * 32;  // packed x: (16, 32) bf16 per step, 64-byte rows
        const char* bk = (const char*)bp + kk * 16 * ldb_bytes;
        _tile_loadd(4, ak, 64);
        _tile_loadd(6, bk, ldb_bytes);
        if (C == 2) _tile_loadd(7, bk + 64, ldb_bytes);
        _tile_dpbf16ps(0, 4, 6);
        if (C == 2) _tile_dpbf16ps(1, 4, 7);
        if (R == 2) {
            _tile_loadd(5, ak + 16 * lda, 64);  // lda: K, the next 16-row tile
            _tile_dpbf16ps(2, 5, 6);
            if (C == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 128);
    if (C == 2) _tile_stored(1, c + 16, 128);
    if (R == 2) _tile_stored(2, c + 16 * 32, 128);
    if (R == 2 && C == 2) _tile_stored(3, c + 16 * 32 + 16, 128);
}

// 64-byte aligned scratch of n floats, uninitialised: zeroing a fresh vector cost more than the work at
// 64-128 rows. Freed at the end of the call, so the kernel holds no memory between calls.
struct Scratch {
    float* p;
    explicit Scratch(int64_t n) : p((float*)aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64))) {}
    ~Scratch() { free(p); }
};

using BlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*, bool);

// Rows of x packed at a time for K values a row (whole 32-row tiles): about AMX_MB_BYTES of bf16, 64-512 rows.
int64_t row_block(int64_t K) {
    const int64_t mb = AMX_MB_BYTES / (K * 2) / 32 * 32;
    return mb < 64 ? 64 : mb > 512 ? 512 : mb;
}

// Bytes of one thread's scratch for a call of M rows: the packed row block (rows rounded up to 32, K bf16 each)
// and GROUP column blocks' fp32 sums (32 a row each), each as the pages malloc may map for it: whole 4 KiB pages plus
// one, since its chunk header and the 64-byte alignment put the block one page further (a 64 KiB block spans 17).
int64_t scratch_bytes(int64_t M, int64_t K) {
    const int64_t rows = ((M < row_block(K) ? M : row_block(K)) + 31) / 32 * 32;
    auto mapped = [](int64_t n) { return (n + 4095) / 4096 * 4096 + 4096; };
    return mapped(rows * 32 * GROUP * 4) + mapped(rows * K * 2);
}

// half > 0: the fused MLP (memfit_amx_linear_silu_bf16): N = 2 half, W's columns [0, half) the gate's and
// [half, N) the up's, half a multiple of nb (so the up column block of gate block cb is cb + half / nb blocks on);
// each thread's column blocks are the gate's, each followed by its up block, whose store writes the product.
bool run(const uint16_t* x, int64_t ldx, const uint16_t* wp, const uint16_t* b, uint16_t* y, int64_t ldy, int64_t M,
         int64_t N, int64_t K, int64_t nb, int nthreads, int64_t half = 0) {
    const int64_t steps = K / 2, panel_elems = steps * nb * 2, ldb = nb * 4, k32 = K / 32;
    // K chunk in 32s; rows a block (whole 32-row tiles). Tuned on one Sapphire-Rapids-class core, a loop over 12
    // layers' weights of the 0.1b shapes (so W comes from L3, as in the model), one process alternating builds:
    // with two column blocks side by side at 128 K values, qkv at 2048 rows 575 -> 639 G MAC/s, gate/up (fused)
    // at 256 rows 390 -> 458 (372 -> 441 in another round), down 532 -> 579 against one block at 256 values.
    const int64_t kc = AMX_KC / 32, MB = row_block(K);
    // Column blocks of 32 inside each panel (a panel of 48 holds one of 32 and one of 16).
    const int64_t per_panel = (nb + 31) / 32, cblocks = (N + nb - 1) / nb * per_panel;
    const int64_t up_off = half / nb * per_panel;  // fused: gate block cb's up block is cb + up_off
    std::atomic<bool> failed{false};  // scratch memory refused (by any thread)
    auto work = [&](int64_t cb0, int64_t cb1) {
        load_config();
        const int64_t rows_max = ((M < MB ? M : MB) + 31) / 32 * 32;  // a block's rows, in whole 32-row tiles
        Scratch acc_mem(rows_max * 32 * GROUP), ap_mem(rows_max * K / 2);  // scratch_bytes(M, K) in all
        if (!acc_mem.p || !ap_mem.p) {
            failed.store(true);
            _tile_release();
            return;
        }
        float* const acc = acc_mem.p;  // the sums of the GROUP column blocks in flight, rows_max x 32 each
        // The row block's x, packed tile by tile: for each 16-row tile and 32-value K step, 16 x 64 contiguous
        // bytes (rows past M zero), so an A tile is one 1 KiB stream instead of 16 lines strided by ldx.
        // 64-byte aligned: a tile row that straddles two cache lines loads ~6x slower (measured: 16.5 against
        // 2.6 ns a 1 KiB tile).
        uint16_t* const ap = (uint16_t*)ap_mem.p;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mrows = M - m0 < MB ? M - m0 : MB;
            const int64_t tiles16 = (mrows + 15) / 16;
            for (int64_t t = 0; t < tiles16; t++) {
                // K step outermost: each 1 KiB tile is written in one pass, 64-byte stores in address order
                // (row by row over K, the stores 1 KiB apart, took ~2.5% of the prefill in store stalls)
                uint16_t* dst = ap + t * 16 * K;
                const int64_t live = mrows - t * 16 < 16 ? mrows - t * 16 : 16;  // rows of this tile inside M
                const uint16_t* xt = x + (m0 + t * 16) * ldx;
                for (int64_t kk = 0; kk < k32; kk++) {
                    uint16_t* d = dst + kk * 16 * 32;
                    for (int64_t r = 0; r < live; r++)
                        _mm512_store_si512((void*)(d + r * 32), _mm512_loadu_si512((const void*)(xt + r * ldx + kk * 32)));
                    if (live < 16) memset(d + live * 32, 0, (size_t)(16 - live) * 64);
                }
            }
            // Two column blocks side by side (c2 < 0: c1 alone), K chunk by K chunk and row tile by row tile: the
            // row tile's x chunk, loaded from L2 for the first block, is in L1 for the second (x from L2 bounded the
            // kernel; the figures are the tuning note's above). Each block's sums
            // see the same instructions in the same K order whatever the pairing, so the bits do not change.
            // `n1`, `n2`: the blocks computed next (their first K chunk is prefetched meanwhile), -1 for none.
            // `fused`: c1 a gate block, c2 its up block; their sums meet in store_silu, neither half written out.
            auto group = [&](const int64_t* cs, const int64_t* ns, bool fused) {
                struct Blk {
                    const char* bp = nullptr;  // the block's panel at its first column, K step 0
                    int64_t n0 = 0;  // its first column of y
                    bool two = false, live = false;  // a second 16 columns in this panel, and used; inside N
                };
                auto at = [&](int64_t cb) {
                    Blk o;
                    if (cb < 0) return o;
                    const int64_t p = cb / per_panel, col = cb % per_panel * 32;
                    o.n0 = p * nb + col;
                    o.live = o.n0 < N;
                    o.two = col + 16 < nb && o.n0 + 16 < N;
                    o.bp = (const char*)(wp + p * panel_elems + col * 2);
                    return o;
                };
                Blk bl[GROUP], nx[GROUP];
                for (int j = 0; j < GROUP; j++) bl[j] = at(cs[j]), nx[j] = at(ns[j]);
                const int64_t ntiles = (mrows + 31) / 32;
                for (int64_t k0 = 0; k0 < k32; k0 += kc) {
                    const int64_t ks = k32 - k0 < kc ? k32 - k0 : kc, off = k0 * 16 * ldb;  // off: bytes into a panel
                    // Prefetched meanwhile, a share of its rows (2 lines each: a block's 32 columns) per row tile
                    // (its first tile would wait on L3 otherwise), into L2 (into L1 measured 2-5% slower): the
                    // next K chunk of these blocks, or the next blocks' first.
                    const char* next[GROUP] = {};
                    int64_t next_rows = 0;
                    if (k0 + kc < k32) {
                        for (int j = 0; j < GROUP; j++) next[j] = bl[j].live ? bl[j].bp + off + kc * 16 * ldb : nullptr;
                        next_rows = (k32 - k0 - kc < kc ? k32 - k0 - kc : kc) * 16;
                    } else {
                        for (int j = 0; j < GROUP; j++) next[j] = nx[j].live ? nx[j].bp : nullptr;
                        next_rows = (kc < k32 ? kc : k32) * 16;
                    }
                    const int64_t share = (next_rows + ntiles - 1) / ntiles;
                    for (int64_t r0 = 0; r0 < mrows; r0 += 32) {
                        const int64_t i0 = r0 / 32 * share, i1 = i0 + share < next_rows ? i0 + share : next_rows;
                        for (int j = 0; j < GROUP; j++)
                            if (next[j])
                                for (int64_t i = i0; i < i1; i++) {
                                    _mm_prefetch(next[j] + i * ldb, _MM_HINT_T1);
                                    _mm_prefetch(next[j] + i * ldb + 64, _MM_HINT_T1);
                                }
                        const int64_t rows = mrows - r0 < 32 ? mrows - r0 : 32;
                        const uint16_t* a = ap + r0 * K + k0 * 16 * 32;
                        const bool last = k0 + kc >= k32;
                        for (int j = 0; j < GROUP; j++) {
                            if (!bl[j].live) continue;
                            const bool two = bl[j].two;
                            BlockFn fn = rows > 16 ? (two ? block<2, 2> : block<2, 1>) : (two ? block<1, 2> : block<1, 1>);
                            fn(a, K, (const uint16_t*)(bl[j].bp + off), ldb, ks, acc + (j * rows_max + r0) * 32, k0 == 0);
                            if (last && !fused)
                                store_block(acc + (j * rows_max + r0) * 32, b, y + (m0 + r0) * ldy, ldy, rows, bl[j].n0, N, two);
                        }
                        if (last && fused)
                            for (int j = 0; j < GROUP; j += 2)
                                if (bl[j].live)
                                    store_silu(acc + (j * rows_max + r0) * 32, acc + ((j + 1) * rows_max + r0) * 32, b,
                                               y + (m0 + r0) * ldy, ldy, rows, bl[j].n0, bl[j + 1].n0, bl[j].two);
                    }
                }
            };
            // GROUP blocks a pass: cb0, cb0 + 1, ... or, fused, GROUP / 2 gate blocks each followed by its up block
            const int64_t per = half ? GROUP / 2 : GROUP;
            for (int64_t cb = cb0; cb < cb1; cb += per) {
                int64_t cs[GROUP], ns[GROUP];
                for (int j = 0; j < GROUP; j++) cs[j] = ns[j] = -1;
                for (int j = 0; j < per; j++) {
                    const int64_t c = cb + j < cb1 ? cb + j : -1, n = cb + per + j < cb1 ? cb + per + j : -1;
                    if (half) {
                        cs[2 * j] = c, cs[2 * j + 1] = c < 0 ? -1 : c + up_off;
                        ns[2 * j] = n, ns[2 * j + 1] = n < 0 ? -1 : n + up_off;
                    } else {
                        cs[j] = c, ns[j] = n;
                    }
                }
                group(cs, ns, half != 0);
            }
        }
        _tile_release();
    };
    for_runs(half ? up_off : cblocks, nthreads, work);
    return !failed.load();
}

// The tile unit's peak: 4 independent TDPBF16PS chains on tiles already loaded (16 x 16 x 32 = 8192
// multiply-adds each), no memory traffic in the loop.
double peak(int64_t iters) {
    load_config();
    alignas(64) static uint16_t ones[16 * 32];
    for (int i = 0; i < 16 * 32; i++) ones[i] = 0x3b80;  // 2^-8 in bf16: sums stay exact for checking
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < iters; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    alignas(64) float c[16 * 16];
    _tile_stored(0, c, 64);
    _tile_release();
    return c[0];  // iters * 32 * 2^-16
}

}  // namespace

extern "C" {

// 1 where this process may run the AMX kernels (the CPU has AMX-BF16 and Linux granted the tile state), else 0.
int memfit_amx_available(void) { return amx_enable() ? 1 : 0; }

// y (M, N; row stride ldy) = x (M, K; row stride ldx) W^T + b, W packed by memfit_blocked_pack_bf16 with panels
// of nb columns. 0; -1: bad arguments; -2: bad nb; -3: K not a multiple of 32; -4: no AMX here; -5: no memory
// for the scratch (x's row block packed, two column blocks' sums: memfit_amx_scratch_bytes a thread).
int memfit_amx_linear_bf16(const uint16_t* x, int64_t ldx, const uint16_t* wp, const uint16_t* b, uint16_t* y,
                           int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t nb, int nthreads) {
    if (M < 0 || N < 0 || K < 0 || ldx < K || ldy < N) return -1;
    if (nb != 32 && nb != 48 && nb != 64) return -2;
    if (K % 32 || K == 0) return -3;
    if (!amx_enable()) return -4;
    if (M == 0 || N == 0) return 0;
    return run(x, ldx, wp, b, y, ldy, M, N, K, nb, nthreads) ? 0 : -5;
}

// The MLP's gate/up matmul with SiLU(gate) * up in its store: W (2I, K) packed as memfit_amx_linear_bf16's, rows
// [0, I) the gate, [I, 2I) the up; y (M, I; row stride ldy) = SiLU(x Wg^T + bg) * (x Wu^T + bu), each rounded to
// bf16 where the unfused path (that matmul into (M, 2I), then cpu_decode.cpp's silu_mul) rounds it: the same
// bits. No (M, 2I) output: a gate block and its up block are computed side by side and meet in the store (neither
// half is written to y). Codes as
// memfit_amx_linear_bf16's, and -6: I not a multiple of nb.
int memfit_amx_linear_silu_bf16(const uint16_t* x, int64_t ldx, const uint16_t* wp, const uint16_t* b, uint16_t* y,
                                int64_t ldy, int64_t M, int64_t I, int64_t K, int64_t nb, int nthreads) {
    if (M < 0 || I < 0 || K < 0 || ldx < K || ldy < I) return -1;
    if (nb != 32 && nb != 48 && nb != 64) return -2;
    if (K % 32 || K == 0) return -3;
    if (I % nb) return -6;
    if (!amx_enable()) return -4;
    if (M == 0 || I == 0) return 0;
    return run(x, ldx, wp, b, y, ldy, M, 2 * I, K, nb, nthreads, I) ? 0 : -5;
}

// The most one thread of a call of M rows and K values a row allocates beside y (freed when the call returns);
// a call of T threads holds T times this. 0 without AMX (no call runs).
int64_t memfit_amx_scratch_bytes(int64_t M, int64_t K) {
    return amx_enable() && M > 0 && K > 0 ? scratch_bytes(M, K) : 0;
}

// Multiply-adds per call: iters * 4 * 8192; returns one accumulator's first element (iters * 32 * 2^-16), or
// -1 without AMX.
double memfit_amx_peak(int64_t iters) { return amx_enable() ? peak(iters) : -1.0; }

}  // extern "C"

#pragma GCC pop_options
#else  // no AMX intrinsics in this compiler: the entry points say so

extern "C" {
int memfit_amx_available(void) { return 0; }
int memfit_amx_linear_bf16(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int) { return -4; }
int memfit_amx_linear_silu_bf16(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, uint16_t*, int64_t,
                                int64_t, int64_t, int64_t, int64_t, int) { return -4; }
double memfit_amx_peak(int64_t) { return -1.0; }
int64_t memfit_amx_scratch_bytes(int64_t, int64_t) { return 0; }
}
#endif
