// Dense projections y = x @ W.T + b over weights packed in 32-column panels.
//
// Why our own GEMM: decode steps multiply a few rows (1-64) by every weight of
// the model, so the weights are the traffic. oneDNN's prepacked GEMM reaches
// ~21-25 GB/s at one row on a 2-core EPYC with ~40 us of fixed cost per call;
// streaming a panel layout with AVX-512 reaches 25-46 GB/s (1.6-2x per call at
// one row) and, register-blocked 12 rows x 32 columns, ~200 GFLOP/s at 32 rows
// (1.2-1.5x oneDNN), while prefill-sized inputs (4,096 rows) stay within ~5% of it.
//
// Layout: W [N, K] becomes P = ceil(N / 32) panels of [K, 32] (zero-padded
// columns), each contiguous: a panel is one sequential stream, and one k-step of
// it is two AVX-512 registers (four AVX2 ones) that every row in flight multiplies against.
//
// Two register kernels, chosen by the build's -march (simd.h): AVX-512 (below) and AVX2+FMA
// (further down: 16 registers of 8 floats, so 6 rows x 16 columns, half a panel, per block). A
// build with neither has no panel GEMM: projections stay on oneDNN (layers/ops_cpu.py decides).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>

#include "simd.h"

namespace {

constexpr int64_t kNR = 32;      // columns per panel: two AVX-512 registers, four AVX2 ones
constexpr int64_t kMC = 96;      // most rows per work item: they stay in L2 while panels pass by
// Weights up to this size are walked once per row chunk (re-read from L3, the rows stay in L2:
// 15-25% faster than panel-major at 4,096 rows; an extra pass that interleaves each block's
// rows for sequential broadcasts measured slower); bigger ones (an lm_head) once in all, panel-major.
constexpr int64_t kL3Weights = 8 << 20;

struct Tile {
  const float* w;  // one panel [K, 32]
  int64_t k;
  const float* bias;  // this panel's 32 entries of the bias, or null
  int64_t cols;       // columns that exist (the last panel may be partial)
};

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
template <int MR, int NT>
void block(const float* __restrict__ x, int64_t ldx, const Tile* t, float* __restrict__ y, int64_t ldy) {
  __m512 acc[MR][2 * NT];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 2 * NT; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < t[0].k; ++k) {
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
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NT; ++j) store_row(y + m * ldy + j * kNR, t[j], acc[m][2 * j], acc[m][2 * j + 1]);
}

// One row (batch-1 decode, the lm_head of one sequence): a pure stream of the panel, four
// k-steps in flight so the FMA latency never throttles the loads.
void stream_row(const float* __restrict__ x, const Tile& t, float* __restrict__ y) {
  __m512 a[4], c[4];
  for (int u = 0; u < 4; ++u) a[u] = c[u] = _mm512_setzero_ps();
  const float* __restrict__ w = t.w;
  int64_t k = 0;
  for (; k + 4 <= t.k; k += 4) {
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
  store_row(y, t, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
            _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3])));
}
constexpr int kWideMR = 6;

template <int MR>
void rows_block(int mr, const float* x, int64_t ldx, const Tile& t, float* y, int64_t ldy) {
  if constexpr (MR > 1) {
    if (mr < MR) return rows_block<MR - 1>(mr, x, ldx, t, y, ldy);
    block<MR, 1>(x, ldx, &t, y, ldy);
  } else {
    stream_row(x, t, y);
  }
}

// `rows` rows (at most kMC) x `np` adjacent panels (1, or 2 for prefill-sized inputs)
void panel_rows(const float* x, int64_t ldx, const Tile* t, int64_t np, int64_t rows, float* y, int64_t ldy) {
  int64_t done = 0;
  if (np == 2) {  // prefill-sized (over 96 rows): 6 x 64 blocks; up to 96, 12 x 32 measured faster
    for (; done + kWideMR <= rows; done += kWideMR) block<kWideMR, 2>(x + done * ldx, ldx, t, y + done * ldy, ldy);
  }
  for (int64_t q = 0; q < np; ++q) {
    // the rest spread evenly over register blocks (32 rows: 11 + 11 + 10, not 12 + 12 + 8)
    const int64_t left = rows - done, nb = (left + kMR - 1) / kMR;
    for (int64_t b = 0, r = done; b < nb; ++b) {
      const int mr = static_cast<int>((left * (b + 1)) / nb - (left * b) / nb);
      rows_block<kMR>(mr, x + r * ldx, ldx, t[q], y + r * ldy + q * kNR, ldy);
      r += mr;
    }
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
template <int MR, int NV>
void block(const float* __restrict__ x, int64_t ldx, const Tile& t, int64_t c0, float* __restrict__ y,
           int64_t ldy) {
  __m256 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_setzero_ps();
  const float* __restrict__ w = t.w + c0;
  for (int64_t k = 0; k < t.k; ++k) {
    __m256 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = _mm256_loadu_ps(w + k * kNR + 8 * j);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * ldx + k);
      for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      store8(y + m * ldy + c0 + 8 * j, t.bias ? t.bias + c0 + 8 * j : nullptr, t.cols - c0 - 8 * j, acc[m][j]);
}

void stream_row(const float* __restrict__ x, const Tile& t, float* __restrict__ y) {
  __m256 a[2][4];
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < 4; ++j) a[u][j] = _mm256_setzero_ps();
  const float* __restrict__ w = t.w;
  int64_t k = 0;
  for (; k + 2 <= t.k; k += 2) {
    for (int u = 0; u < 2; ++u) {
      const __m256 xv = _mm256_broadcast_ss(x + k + u);
      for (int j = 0; j < 4; ++j) a[u][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + (k + u) * kNR + 8 * j), a[u][j]);
    }
  }
  if (k < t.k) {
    const __m256 xv = _mm256_broadcast_ss(x + k);
    for (int j = 0; j < 4; ++j) a[0][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + k * kNR + 8 * j), a[0][j]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    store8(y + 8 * j, t.bias ? t.bias + 8 * j : nullptr, t.cols - 8 * j, _mm256_add_ps(a[0][j], a[1][j]));
}

template <int MR>
void rows_block(int mr, const float* x, int64_t ldx, const Tile& t, float* y, int64_t ldy) {
  if constexpr (MR > 2) {
    if (mr < MR) return rows_block<MR - 1>(mr, x, ldx, t, y, ldy);
    block<MR, 2>(x, ldx, t, 0, y, ldy);
    if (t.cols > 16) block<MR, 2>(x, ldx, t, 16, y, ldy);
  } else if constexpr (MR == 2) {
    if (mr < 2) return stream_row(x, t, y);
    block<2, 4>(x, ldx, t, 0, y, ldy);
  }
}

void panel_rows(const float* x, int64_t ldx, const Tile* t, int64_t np, int64_t rows, float* y, int64_t ldy) {
  const int64_t nb = (rows + kMR - 1) / kMR;  // evenly: 16 rows are 6 + 5 + 5, not 6 + 6 + 4
  for (int64_t q = 0; q < np; ++q) {
    for (int64_t b = 0, r = 0; b < nb; ++b) {
      const int mr = static_cast<int>((rows * (b + 1)) / nb - (rows * b) / nb);
      rows_block<kMR>(mr, x + r * ldx, ldx, t[q], y + r * ldy + q * kNR, ldy);
      r += mr;
    }
  }
}
#endif

}  // namespace

bool panel_gemm_available() {
  return LORASERVE_SIMD != 0;  // a build without AVX2+FMA keeps oneDNN (layers/ops_cpu.py decides)
}

// x [M, K] (rows contiguous, any row stride), w [P, K, 32] -> [M, n]
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                           const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [M, K] tensor with contiguous rows");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 3 && w.is_contiguous() && w.size(2) == kNR,
              "w must be a contiguous float32 [P, K, 32] panel tensor");
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x has ", K, " columns, the weight ", w.size(1));
  TORCH_CHECK(n > (P - 1) * kNR && n <= P * kNR, "n = ", n, " does not match ", P, " panels");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == n,
                "bias must be a contiguous float32 [n] tensor");
  }
  auto y = torch::empty({M, n}, x.options());
#if LORASERVE_SIMD
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), chunks = (M + kMC - 1) / kMC;
  // decode sizes take panels one by one, which splits 18 or 30 panels evenly over the threads
  const int64_t per = chunks > 1 ? kPanelsPerItem : 1, groups = (P + per - 1) / per;
  const bool chunk_major = P * K * kNR * 4 <= kL3Weights;
  // one work item: a chunk of rows x one panel (or, AVX-512 prefill, two adjacent ones)
  at::parallel_for(0, groups * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t g = chunk_major ? it % groups : it / chunks, c = chunk_major ? it / groups : it % chunks;
      const int64_t p0 = per * g, np = std::min(per, P - p0);
      // chunks of equal size (64 rows: one chunk; 100 rows: 50 + 50, not 96 + 4)
      const int64_t r0 = M * c / chunks, rows = M * (c + 1) / chunks - r0;
      Tile tiles[kPanelsPerItem];
      for (int64_t q = 0; q < np; ++q) {
        const int64_t p = p0 + q;
        tiles[q] = Tile{wp + p * K * kNR, K, bp ? bp + p * kNR : nullptr, std::min(kNR, n - p * kNR)};
      }
      panel_rows(xp + r0 * ldx, ldx, tiles, np, rows, yp + r0 * n + p0 * kNR, n);
    }
  });
  return y;
#else
  TORCH_CHECK(false, "panel_linear needs an AVX-512 or AVX2+FMA build");
#endif
}
