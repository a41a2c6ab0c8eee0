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
// it is two AVX-512 registers that every row in flight multiplies against.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <optional>

namespace {

constexpr int64_t kNR = 32;      // columns per panel: two AVX-512 registers
constexpr int kMR = 12;          // rows per register block: 24 accumulators + 2 weights + 1 broadcast
constexpr int64_t kMC = 96;      // most rows per work item: they stay in L2 while panels pass by
// Weights up to this size are walked once per row chunk (re-read from L3, the rows stay in L2:
// 15-25% faster than panel-major at 4,096 rows; an extra pass that interleaves each block's
// rows for sequential broadcasts measured slower); bigger ones (an lm_head) once in all, panel-major.
constexpr int64_t kL3Weights = 8 << 20;

#if defined(__AVX512F__)
struct Tile {
  const float* w;  // one panel [K, 32]
  int64_t k;
  const float* bias;  // this panel's 32 entries of the bias, or null
  __mmask16 lo, hi;   // columns that exist (the last panel may be partial)
};

inline void store_row(float* y, const Tile& t, __m512 a0, __m512 a1) {
  if (t.bias) {
    a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(t.lo, t.bias));
    a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(t.hi, t.bias + 16));
  }
  _mm512_mask_storeu_ps(y, t.lo, a0);
  _mm512_mask_storeu_ps(y + 16, t.hi, a1);
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

inline __mmask16 first_n(int64_t n) {
  return n <= 0 ? 0 : n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
#endif

}  // namespace

bool panel_gemm_available() {
#if defined(__AVX512F__)
  return true;
#else
  return false;  // the portable build keeps oneDNN (layers/linear.py decides)
#endif
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
#if defined(__AVX512F__)
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), chunks = (M + kMC - 1) / kMC;
  // prefill-sized inputs take panels in pairs (block<6, 2>); decode sizes one by one, which
  // splits 18 or 30 panels evenly over the threads
  const int64_t per = chunks > 1 ? 2 : 1, groups = (P + per - 1) / per;
  const bool chunk_major = P * K * kNR * 4 <= kL3Weights;
  auto tile = [&](int64_t p) {
    const int64_t cols = std::min(kNR, n - p * kNR);
    return Tile{wp + p * K * kNR, K, bp ? bp + p * kNR : nullptr, first_n(cols), first_n(cols - 16)};
  };
  // one work item: a chunk of rows x one panel, or two adjacent ones
  at::parallel_for(0, groups * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t g = chunk_major ? it % groups : it / chunks, c = chunk_major ? it / groups : it % chunks;
      const int64_t p0 = per * g, np = std::min(per, P - p0);
      // chunks of equal size (64 rows: one chunk; 100 rows: 50 + 50, not 96 + 4)
      const int64_t r0 = M * c / chunks, rows = M * (c + 1) / chunks - r0;
      int64_t done = 0;
      if (np == 2) {  // prefill-sized (over 96 rows): 6 x 64 blocks; up to 96, 12 x 32 measured faster
        const Tile pair[2] = {tile(p0), tile(p0 + 1)};
        for (; done + kWideMR <= rows; done += kWideMR) {
          const int64_t r = r0 + done;
          block<kWideMR, 2>(xp + r * ldx, ldx, pair, yp + r * n + p0 * kNR, n);
        }
      }
      for (int64_t q = p0; q < p0 + np; ++q) {
        const Tile t = tile(q);
        // the rest spread evenly over register blocks (32 rows: 11 + 11 + 10, not 12 + 12 + 8)
        const int64_t left = rows - done, nb = (left + kMR - 1) / kMR;
        for (int64_t b = 0, r = r0 + done; b < nb; ++b) {
          const int mr = static_cast<int>((left * (b + 1)) / nb - (left * b) / nb);
          rows_block<kMR>(mr, xp + r * ldx, ldx, t, yp + r * n + q * kNR, n);
          r += mr;
        }
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "panel_linear needs an AVX-512 build");
#endif
}
