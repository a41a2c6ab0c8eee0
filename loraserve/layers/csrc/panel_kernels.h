// The fp32 panel GEMM's register kernels and tile, shared by the plain projections
// (gemm_cpu.cpp: panel_linear and its prefill / decode-stack entry points) and the fused decode
// pass that runs each row's own LoRA between the panels (gemm_lora_cpu.cpp: panel_lora_linear).
// Why a header: both passes must run the same blocks in the same order, so the fused pass's base
// product is panel_linear's bit for bit; templates over the prefetch policy (PF) let each caller
// add what it fetches without a second copy of the kernels.
//
// Layout: W [N, K] becomes P = ceil(N / 32) panels of [K, 32] (zero-padded columns), each
// contiguous: a panel is one sequential stream, and one k-step of it is two AVX-512 registers
// (four AVX2 ones) that every row in flight multiplies against.
//
// Two register kernels, chosen by the build's -march (simd.h): AVX-512 (below) and AVX2+FMA
// (further down: 16 registers of 8 floats, so 6 rows x 16 columns, half a panel, per block). A
// build with neither has no panel GEMM: projections stay on oneDNN (layers/ops_cpu.py decides).
#pragma once

#include "aten_min.h"

#include <algorithm>
#include <cstdint>
#include <optional>

#include "fetch_policy.h"
#include "over_rows.h"
#include "simd.h"

namespace fp32_panel {

constexpr int64_t kNR = 32;      // columns per panel: two AVX-512 registers, four AVX2 ones
constexpr int64_t kMC = 96;      // most rows per work item: they stay in L2 while panels pass by
// fewest rows whose decode-sized products prefetch their next panel (SpanPf); one row streams
// its panel at the memory's pace with the hardware prefetcher alone
constexpr int64_t kSpanPfMinRows = 2;

struct Tile {
  const float* w;  // one panel [K, 32]
  int64_t k;
  const float* bias;  // this panel's 32 entries of the bias, or null
  int64_t cols;       // columns that exist (the last panel may be partial)

  // panel p of w [P, K, 32] (covering n columns) and its share of the bias, if any
  static Tile of(const float* w, int64_t K, const float* bias, int64_t n, int64_t p) {
    return Tile{w + p * K * kNR, K, bias ? bias + p * kNR : nullptr, std::min(kNR, n - p * kNR)};
  }
};

// What the register kernels prefetch alongside their k-steps (fetch_policy.h says how): nothing
// (plain projections and one-row streams), the next panel of a decode-sized product (SpanPf), or
// that plus the adapter rows the fused decode pass runs right after the panel (LoraPf,
// gemm_lora_cpu.cpp). The register kernels are never inlined, so the cursors of the blocks
// around them cannot spill their accumulators.
using fetch_policy::no_pf;
using fetch_policy::NoPf;

#if LORASERVE_SIMD
// The next panel of a decode-sized product, one line per k-step from its start: a panel's first
// register block otherwise waits on DRAM (the hardware prefetcher runs a few lines ahead of a
// stream that wants ~35 GB/s per core) and its other blocks leave memory idle. 30 layers of the
// SmolLM projections (425 MB, so from DRAM), 2-core Xeon: AVX-512 build 8 / 32 / 64 rows
// 28 / 43 / 65 -> 21 / 34 / 55 ms (24.5 ms at 32 rows with the weights in cache); AVX2 build
// 38 / 63 / 96 -> 25 / 49 / 81 ms. Two lines per k-step measured 10-15 % slower than one from 16 rows.
struct SpanPf {
  static constexpr bool kOn = true;
  const char* base = nullptr;  // the next panel
  int64_t pos = 0, end = 0;    // lines of it fetched so far, and in all
  // the whole panel at `next` ([K, 32] fp32)
  static SpanPf panel(const float* next, int64_t K) {
    return SpanPf{reinterpret_cast<const char*>(next), 0, K * kNR * 4 / 64};
  }
  __attribute__((always_inline)) void step() {
    if (pos < end) _mm_prefetch(base + 64 * pos++, _MM_HINT_T1);
  }
};
#endif

#if LORASERVE_SIMD == 512
constexpr int kMR = 12;  // rows per register block: 24 accumulators + 2 weights + 1 broadcast
constexpr int64_t kPanelsPerItem = 2;  // prefill-sized inputs take panels in pairs (block<6, 2>)

inline void store_row(float* y, const Tile& t, __m512 a0, __m512 a1) {
  const __mmask16 lo = simd::mask(t.cols), hi = simd::mask(t.cols - 16);
  if (t.bias) {
    a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(lo, t.bias));
    a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(hi, t.bias + 16));
  }
  _mm512_mask_storeu_ps(y, lo, a0);
  _mm512_mask_storeu_ps(y + 16, hi, a1);
}

// MR rows x NT adjacent panels (32 * NT columns): each k-step loads the panels' 2 * NT
// registers once for all MR rows. NT = 1, MR <= 12 for decode sizes; NT = 2, MR = 6 for
// prefill-sized inputs (over 96 rows), where each broadcast then feeds four FMAs instead of two
// (10 loads per 24 FMAs instead of 14): at 4,032 rows 4-7% faster than 12 x 32, level with oneDNN.
template <int MR, int NT, class PF = NoPf>
__attribute__((noinline)) void block(const float* __restrict__ x, int64_t ldx, const Tile* t,
                                     float* __restrict__ y, int64_t ldy, PF& pf = no_pf) {
  __m512 acc[MR][2 * NT];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 2 * NT; ++c) acc[m][c] = _mm512_setzero_ps();
  PF cur = pf;
  const int64_t K = t[0].k;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    cur.step();
    __m512 w[2 * NT];
    for (int j = 0; j < NT; ++j) {
      w[2 * j] = _mm512_loadu_ps(t[j].w + k * kNR);
      w[2 * j + 1] = _mm512_loadu_ps(t[j].w + k * kNR + 16);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * ldx + k]);
      for (int c = 0; c < 2 * NT; ++c) acc[m][c] = _mm512_fmadd_ps(xv, w[c], acc[m][c]);
    }
  }
  if constexpr (PF::kOn) pf = cur;
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NT; ++j) store_row(y + m * ldy + j * kNR, t[j], acc[m][2 * j], acc[m][2 * j + 1]);
}

// One row (batch-1 decode, the lm_head of one sequence): a pure stream of the panel, four
// k-steps in flight so the FMA latency never throttles the loads.
template <class PF = NoPf>
__attribute__((noinline)) void stream_row(const float* __restrict__ x, const Tile& t, float* __restrict__ y,
                                          PF& pf = no_pf) {
  __m512 a[4], c[4];
  for (int u = 0; u < 4; ++u) a[u] = c[u] = _mm512_setzero_ps();
  const float* __restrict__ w = t.w;
  int64_t k = 0;
  PF cur = pf;
  for (; k + 4 <= t.k; k += 4) {
    cur.step();
    for (int u = 0; u < 4; ++u) {
      const __m512 xv = _mm512_set1_ps(x[k + u]);
      a[u] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + (k + u) * kNR), a[u]);
      c[u] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + (k + u) * kNR + 16), c[u]);
    }
  }
  for (; k < t.k; ++k) {
    const __m512 xv = _mm512_set1_ps(x[k]);
    a[0] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + k * kNR), a[0]);
    c[0] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + k * kNR + 16), c[0]);
  }
  if constexpr (PF::kOn) pf = cur;
  store_row(y, t, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
            _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3])));
}
constexpr int kWideMR = 6;

// k-steps a decode-sized panel takes over M rows (one panel, register blocks of at most kMR rows)
inline int64_t panel_k_steps(int64_t M, int64_t K) { return M == 1 ? K / 4 : K * ((M + kMR - 1) / kMR); }

template <int MR, class PF>
void rows_block(int mr, const float* x, int64_t ldx, const Tile& t, float* y, int64_t ldy, PF& pf) {
  if constexpr (MR > 1) {
    if (mr < MR) return rows_block<MR - 1>(mr, x, ldx, t, y, ldy, pf);
    block<MR, 1>(x, ldx, &t, y, ldy, pf);
  } else {
    stream_row(x, t, y, pf);
  }
}

// `rows` rows (at most kMC) x `np` adjacent panels (1, or 2 for prefill-sized inputs)
template <class PF = NoPf>
void panel_rows(const float* x, int64_t ldx, const Tile* t, int64_t np, int64_t rows, float* y, int64_t ldy,
                PF& pf = no_pf) {
  int64_t done = 0;
  if (np == 2) {  // prefill-sized (over 96 rows): 6 x 64 blocks; up to 96, 12 x 32 measured faster
    for (; done + kWideMR <= rows; done += kWideMR) block<kWideMR, 2>(x + done * ldx, ldx, t, y + done * ldy, ldy);
  }
  for (int64_t q = 0; q < np; ++q) {
    // the rest spread evenly over register blocks (32 rows: 11 + 11 + 10, not 12 + 12 + 8)
    const float* xd = x + done * ldx;
    float* yd = y + done * ldy + q * kNR;
    over_blocks(rows - done, kMR, [&](int64_t r, int mr) { rows_block<kMR>(mr, xd + r * ldx, ldx, t[q], yd + r * ldy, ldy, pf); });
  }
}

#elif LORASERVE_SIMD == 256
// AVX2+FMA has 16 registers of 8 floats: a whole panel k-step is 4 of them, so 6 rows x 16
// columns (12 accumulators + 2 weights + 1 broadcast) is the register block, run over both
// halves of the panel; one row streams the whole panel (8 accumulators: two k-steps in flight),
// two rows take it whole too (8 accumulators + 4 weights). The half-panel passes re-read the
// panel from L2, which the 6-row blocks' FLOPs hide.
constexpr int kMR = 6;
constexpr int64_t kPanelsPerItem = 1;

// the 8 columns at y (valid of them exist), plus their bias; always inlined and called from fully
// unrolled loops, else GCC keeps the accumulators in memory and stores all 12 every k-step
__attribute__((always_inline)) inline void store8(float* y, const float* bias, int64_t valid, __m256 v) {
  if (valid >= 8) {
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(y, v);
  } else if (valid > 0) {
    const simd::M m = simd::mask(valid);
    if (bias) v = _mm256_add_ps(v, _mm256_maskload_ps(bias, m));
    _mm256_maskstore_ps(y, m, v);
  }
}

// MR rows x NV registers: the 8 * NV columns of the panel from column c0
template <int MR, int NV, class PF>
__attribute__((noinline)) void block(const float* __restrict__ x, int64_t ldx, const Tile& t, int64_t c0,
                                     float* __restrict__ y, int64_t ldy, PF& pf) {
  __m256 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_setzero_ps();
  const float* __restrict__ w = t.w + c0;
  PF cur = pf;
  const int64_t K = t.k;
  // unrolled: the loop's own counter, compare and pointer steps were a fifth of its uops
  // (K x 6 x 16 in-cache micro-benchmark, one thread: 89 -> 97 GFLOP/s)
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    cur.step();
    __m256 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = _mm256_loadu_ps(w + k * kNR + 8 * j);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * ldx + k);
      for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  if constexpr (PF::kOn) pf = cur;
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      store8(y + m * ldy + c0 + 8 * j, t.bias ? t.bias + c0 + 8 * j : nullptr, t.cols - c0 - 8 * j, acc[m][j]);
}

template <class PF>
__attribute__((noinline)) void stream_row(const float* __restrict__ x, const Tile& t, float* __restrict__ y,
                                          PF& pf) {
  __m256 a[2][4];
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < 4; ++j) a[u][j] = _mm256_setzero_ps();
  const float* __restrict__ w = t.w;
  int64_t k = 0;
  PF cur = pf;
  for (; k + 2 <= t.k; k += 2) {
    cur.step();
    for (int u = 0; u < 2; ++u) {
      const __m256 xv = _mm256_broadcast_ss(x + k + u);
      for (int j = 0; j < 4; ++j) a[u][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + (k + u) * kNR + 8 * j), a[u][j]);
    }
  }
  if (k < t.k) {
    const __m256 xv = _mm256_broadcast_ss(x + k);
    for (int j = 0; j < 4; ++j) a[0][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + k * kNR + 8 * j), a[0][j]);
  }
  if constexpr (PF::kOn) pf = cur;
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    store8(y + 8 * j, t.bias ? t.bias + 8 * j : nullptr, t.cols - 8 * j, _mm256_add_ps(a[0][j], a[1][j]));
}

// k-steps a decode-sized panel takes over M rows (register blocks of at most kMR rows, each over
// both halves of the panel; two rows take it whole, one row two k-steps at a time)
inline int64_t panel_k_steps(int64_t M, int64_t K) {
  return M == 1 ? K / 2 : M == 2 ? K : 2 * K * ((M + kMR - 1) / kMR);
}

template <int MR, class PF>
void rows_block(int mr, const float* x, int64_t ldx, const Tile& t, float* y, int64_t ldy, PF& pf) {
  if constexpr (MR > 2) {
    if (mr < MR) return rows_block<MR - 1>(mr, x, ldx, t, y, ldy, pf);
    block<MR, 2>(x, ldx, t, 0, y, ldy, pf);
    if (t.cols > 16) block<MR, 2>(x, ldx, t, 16, y, ldy, pf);
  } else if constexpr (MR == 2) {
    if (mr < 2) return stream_row(x, t, y, pf);
    block<2, 4>(x, ldx, t, 0, y, ldy, pf);
  }
}

template <class PF = NoPf>
void panel_rows(const float* x, int64_t ldx, const Tile* t, int64_t np, int64_t rows, float* y, int64_t ldy,
                PF& pf = no_pf) {
  for (int64_t q = 0; q < np; ++q)  // evenly: 16 rows are 6 + 5 + 5, not 6 + 6 + 4
    over_blocks(rows, kMR, [&](int64_t r, int mr) { rows_block<kMR>(mr, x + r * ldx, ldx, t[q], y + r * ldy + q * kNR, ldy, pf); });
}
#endif

#if LORASERVE_SIMD
// Panel p of a decode-sized product (at most kMC rows, one work item per panel) into y [M, n],
// fetching panel p + 1 meanwhile when the same thread takes it next
inline void decode_panel(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t n,
                        const float* bias, int64_t p, bool next, float* y) {
  const Tile t = Tile::of(w, K, bias, n, p);
  if (M >= kSpanPfMinRows && next) {
    SpanPf pf = SpanPf::panel(w + (p + 1) * K * kNR, K);
    panel_rows(x, ldx, &t, 1, M, y + p * kNR, n, pf);
  } else {
    panel_rows(x, ldx, &t, 1, M, y + p * kNR, n);
  }
}
#endif

// The arguments every panel entry point checks: x [M, K] with contiguous rows, w [P, K, 32]
// panels covering n columns, an optional bias [n] (gemm_cpu.cpp)
void check_panel_args(const at::Tensor& x, const at::Tensor& w, int64_t n,
                      const std::optional<at::Tensor>& bias);

}  // namespace fp32_panel
