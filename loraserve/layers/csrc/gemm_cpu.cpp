// Dense projections y = x @ W.T + b over weights packed in 32-column panels.
//
// Why our own GEMM: decode steps multiply a few rows (1-64) by every weight of
// the model, so the weights are the traffic. oneDNN's prepacked GEMM reaches
// ~21-25 GB/s at one row on a 2-core EPYC with ~40 us of fixed cost per call;
// streaming a panel layout with AVX-512 reaches 25-46 GB/s (1.6-2x per call at
// one row) and, register-blocked 12 rows x 32 columns, ~200 GFLOP/s at 32 rows
// (1.2-1.5x oneDNN), while prefill-sized inputs (4,096 rows) stay within ~5% of it.
//
// The register kernels, their tile and the panel layout are in panel_kernels.h, shared with the
// fused decode LoRA pass (gemm_lora_cpu.cpp); this file holds the entry points of plain
// projections and the walk of their work items over the threads.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "over_rows.h"
#include "panel_hook.h"
#include "panel_kernels.h"
#include "simd.h"

using namespace fp32_panel;

bool panel_gemm_available() {
  return LORASERVE_SIMD != 0;  // a build without AVX2+FMA keeps oneDNN (layers/ops_cpu.py decides)
}

void fp32_panel::check_panel_args(const at::Tensor& x, const at::Tensor& w, int64_t n,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [M, K] tensor with contiguous rows");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 3 && w.is_contiguous() && w.size(2) == kNR,
              "w must be a contiguous float32 [P, K, 32] panel tensor");
  const int64_t K = x.size(1), P = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x has ", K, " columns, the weight ", w.size(1));
  TORCH_CHECK(n > (P - 1) * kNR && n <= P * kNR, "n = ", n, " does not match ", P, " panels");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "bias must be a contiguous float32 [n] tensor");
  }
}

bool panel_walk_chunk_major(int64_t M, int64_t K, int64_t P) {
  const int64_t chunks = (M + kMC - 1) / kMC;
  return chunks == 1 || grid_chunk_major_fp32(M, K, chunks, P * K * kNR * 4);
}

// x [M, K] (rows contiguous, any row stride), w [P, K, 32] -> [M, n]
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                        const std::optional<at::Tensor>& bias) {
  check_panel_args(x, w, n, bias);
  auto y = at::empty({x.size(0), n}, x.options());
  panel_linear_out(x, w, n, bias, y, nullptr);
  return y;
}

// panel_linear into y [M, n] (contiguous), with `after` (if any) run on each work item by the
// thread that just stored it, on the item's rows and columns while they are still in its cache:
// the prefill LoRA's expand (lora_cpu.cpp `panel_linear_lora_rows`) adds onto them there.
void panel_linear_out(const at::Tensor& x, const at::Tensor& w, int64_t n,
                      const std::optional<at::Tensor>& bias, const at::Tensor& y, const PanelItemHook* after) {
  check_panel_args(x, w, n, bias);
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 && y.size(0) == x.size(0) &&
                  y.size(1) == n,
              "y must be a contiguous float32 [M, n] tensor");
#if LORASERVE_SIMD
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  if (M == 0) return;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), chunks = (M + kMC - 1) / kMC;
  const bool major = panel_walk_chunk_major(M, K, P);
  // decode sizes take panels one by one, which splits 18 or 30 panels evenly over the threads
  const int64_t per = chunks > 1 ? kPanelsPerItem : 1, groups = (P + per - 1) / per;
  // one work item: a chunk of rows x one panel (or, AVX-512 prefill, two adjacent ones)
  at::parallel_for(0, groups * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const auto [g, c] = grid_item(it, groups, chunks, major);
      const int64_t p0 = per * g, np = std::min(per, P - p0);
      // chunks of equal size (64 rows: one chunk; 100 rows: 50 + 50, not 96 + 4)
      const int64_t r0 = M * c / chunks, rows = M * (c + 1) / chunks - r0;
      if (chunks == 1) {  // decode sizes: items are panels, the next one this thread's next item
        decode_panel(xp, ldx, M, K, wp, n, bp, p0, it + 1 < hi, yp);
      } else {
        Tile tiles[kPanelsPerItem];
        for (int64_t q = 0; q < np; ++q) tiles[q] = Tile::of(wp, K, bp, n, p0 + q);
        panel_rows(xp + r0 * ldx, ldx, tiles, np, rows, yp + r0 * n + p0 * kNR, n);
      }
      if (after) (*after)(r0, rows, p0 * kNR, std::min(n, (p0 + np) * kNR));
    }
  });
#else
  TORCH_CHECK(false, "panel_linear needs an AVX-512 or AVX2+FMA build");
#endif
}

// Panels [p0, p1) of panel_linear's product for at most kMC rows, each panel computed exactly as
// panel_linear computes it there (one work item per panel): the decode stack's threads each take a
// range inside one parallel region (decode_stack_cpu.cpp), and the split cannot change a bit.
void panel_linear_range(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t n,
                        const float* bias, int64_t p0, int64_t p1, float* y) {
#if LORASERVE_SIMD
  for (int64_t p = p0; p < p1; ++p) decode_panel(x, ldx, M, K, w, n, bias, p, p + 1 < p1, y);
#endif
}
