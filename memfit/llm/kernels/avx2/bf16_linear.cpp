// bf16 linears on x86 cores with AVX2 + FMA but no native bf16 multiply (no avx512_bf16, no AMX): Zen 2/3,
// Haswell to Alder Lake. Built as a library of its own (memfit/llm/kernels/avx2_build.py) with -mavx2 -mfma, so
// it needs no AVX-512 and leaves the AVX-512 kernel family (../cpu_*.cpp) as it is.
//
// A bf16 number is the top 16 bits of a float32, so widening is exact: zero-extend 16 -> 32 bits and shift left
// by 16. The multiply-adds run in float32 (FMA) and each output is rounded to bf16 once, at the store.
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#include <cstring>
#include <memory>

namespace {

inline __m256 load_bf16x8(const uint16_t* p) {  // 8 bf16 -> 8 float32, exact
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as PyTorch's .to(torch.bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// TM rows of x (float32, row stride ldx) against TN rows of w (bf16, row-major (N, K)): TM x TN dot products of
// length K, each with its own 8-lane accumulator (TM x TN <= 12: with TM x-vectors and one w-vector, about the
// 16 ymm registers). The w rows (TN x K x 2 bytes) stay in L1 while the caller walks x's rows past them.
template <int TM, int TN>
inline void tile(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float out[TM][TN]) {
  __m256 acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < TN; ++j) {
      __m256 wv = load_bf16x8(w + j * K + k);
      for (int i = 0; i < TM; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[i * ldx + t] * bf16_to_f32(w[j * K + t]);  // K % 8 tail
      out[i][j] = s;
    }
}

template <int TM, int TN>
inline void rows_tile(const float* x, int64_t ldx, const uint16_t* wn, const float* bias, uint16_t* y, int64_t ldy,
                      int64_t m, int64_t n0, int64_t K) {
  float out[TM][TN];
  tile<TM, TN>(x + m * ldx, ldx, wn, K, out);
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) y[(m + i) * ldy + n0 + j] = f32_to_bf16(out[i][j] + bias[j]);
}

// Every row of x against weight rows n0..n0+TN-1, 4 rows of x at a time, then 2, then 1. Each output is one
// accumulator's sum in the same order whatever the tile, so a row's results don't depend on M (the bits of a
// request's token are the same whatever the batch it decodes in).
template <int TN>
inline void column_block(const float* x, int64_t ldx, const uint16_t* w, const uint16_t* b, uint16_t* y,
                         int64_t ldy, int64_t M, int64_t n0, int64_t K) {
  float bias[TN];
  for (int j = 0; j < TN; ++j) bias[j] = b ? bf16_to_f32(b[n0 + j]) : 0.0f;
  const uint16_t* wn = w + n0 * K;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows_tile<4, TN>(x, ldx, wn, bias, y, ldy, m, n0, K);
  for (; m + 2 <= M; m += 2) rows_tile<2, TN>(x, ldx, wn, bias, y, ldy, m, n0, K);
  if (m < M) rows_tile<1, TN>(x, ldx, wn, bias, y, ldy, m, n0, K);
}

// The product of x (M, K) float32, row stride ldx, and w: columns split over `nthreads` OpenMP threads in blocks
// of 3 weight rows (8 at M = 1); each weight row is read from memory once per call (few rows: decode), whatever M.
void linear_f32x(const float* x, int64_t ldx, const uint16_t* w, const uint16_t* b, uint16_t* y, int64_t ldy,
                 int64_t M, int64_t N, int64_t K, int nthreads) {
  if (M == 1) {  // bound by reading w: 8 rows at a time keep 8 streams and 8 FMA chains in flight
    const int64_t blocks = N / 8;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t nb = 0; nb < blocks; ++nb) column_block<8>(x, ldx, w, b, y, ldy, M, nb * 8, K);
    for (int64_t n = blocks * 8; n < N; ++n) column_block<1>(x, ldx, w, b, y, ldy, M, n, K);
    return;
  }
  // 3 weight rows against 4 x rows: 12 accumulators, fewer widenings per FMA than 4 x 2 (Zen 3, 1 thread,
  // M = 8, (2048 x 768): 33-35 G multiply-adds per CPU second against 25-27; the widening shares the FMA ports)
  const int64_t blocks = N / 3;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t nb = 0; nb < blocks; ++nb) column_block<3>(x, ldx, w, b, y, ldy, M, nb * 3, K);
  for (int64_t n = blocks * 3; n < N; ++n) column_block<1>(x, ldx, w, b, y, ldy, M, n, K);
}

}  // namespace

extern "C" {

// y (M, N) bf16, row stride ldy = x (M, K) bf16, row stride ldx @ w (N, K) bf16 row-major ^T + b (N) bf16 or null.
// x is widened here, once per call, into M x K float32 of the heap (exact; freed on return): doing it in Python
// (x.float()) cost an ATen call and an allocation per linear, ~5 us of a 20-40 us decode linear of a 0.1B model.
void memfit_avx2_linear_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, const uint16_t* b, uint16_t* y,
                             int64_t ldy, int64_t M, int64_t N, int64_t K, int nthreads) {
  if (M <= 0 || N <= 0) return;
  std::unique_ptr<float[]> xf(new float[M * K]);  // (M, K), row stride K; uninitialised: every value written below
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* src = x + m * ldx;
    float* dst = xf.get() + m * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load_bf16x8(src + k));
    for (; k < K; ++k) dst[k] = bf16_to_f32(src[k]);
  }
  linear_f32x(xf.get(), K, w, b, y, ldy, M, N, K, nthreads);
}

// The core's float32 FMA peak: `iters` rounds of 12 independent 8-lane FMA chains per thread (enough to cover
// two FMA pipes of 4-5 cycles' latency). Returns the sum of the accumulators so the loop can't be removed;
// multiply-adds done = iters x 12 x 8 per thread.
double memfit_avx2_peak_macs(int64_t iters, float a, float b, int nthreads) {
  double total = 0.0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
  {
    __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
    __m256 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(av, bv, acc[i]);
    __m256 s = acc[0];
    for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
    total += hsum(s);
  }
  return total;
}

}  // extern "C"
