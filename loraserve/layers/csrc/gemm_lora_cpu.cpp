// The fused decode pass over fp32 panels: the panel GEMM plus every row's own LoRA in one call
// (panel_lora_linear; fused_lora.h says why and runs the adapter side), and the same deltas
// alone for the decode stack's one-region step (lora_deltas). The base product is panel_linear's
// bit for bit: the same register kernels (panel_kernels.h) over the same panels.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "fused_lora.h"
#include "panel_kernels.h"
#include "simd.h"
#include "slot_table.h"

using namespace fp32_panel;

namespace {

#if LORASERVE_SIMD
using fused_lora::LoraRows;
using fetch_policy::Lines;

// SpanPf's next panel, plus the spans the adapter rows that run right after this panel read
struct LoraPf {
  static constexpr bool kOn = true;
  SpanPf panel;
  fetch_policy::Spans lora;
  __attribute__((always_inline)) void step() {
    panel.step();
    lora.step();
  }
};

// decode_panel for the fused pass: also fetches the adapter rows' spans (`lines` lines in all),
// spread evenly over the panel's k-steps; the driver gives spans only from kLoraPfMinRows rows
void decode_panel_lora(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t n,
                       const float* bias, int64_t p, bool next, const Lines* spans, int nspans,
                       int64_t lines, float* y) {
  if (nspans == 0) return decode_panel(x, ldx, M, K, w, n, bias, p, next, y);
  const Tile t = Tile::of(w, K, bias, n, p);
  LoraPf pf;
  if (next) pf.panel = SpanPf::panel(w + (p + 1) * K * kNR, K);
  pf.lora = fetch_policy::Spans::over(spans, nspans, lines, panel_k_steps(M, K));
  panel_rows(x, ldx, &t, 1, M, y + p * kNR, n, pf);
}
#endif

}  // namespace

// y = x @ W.T + b, plus for every n: y[rows[n]] += (x[rows[n]] @ a[slots[n]]) @ [bs[0] | bs[1] | ...][slots[n]]
// (the members' outputs side by side, as in lora_rows). Decode sizes only (at most 96 rows): each
// row's LoRA runs between two panels, into a delta buffer added once every panel is stored.
// Each panel also fetches, spread evenly over its k-steps (LoraPf), the A and B of the rows that
// run right after it, so they read L2 instead of DRAM and their stream overlaps the GEMM's FMAs.
// 30 layers of the SmolLM projections, 32 rows, 32 distinct rank-16 adapters, 2-core Zen 4 EPYC
// (AVX-512, ~31 GB/s), alternated in one process: 56.2 -> 49.4-51.0 ms (base GEMM alone 36.3);
// 16 rows 36.4 -> 31.0-33.8 ms. The fetch alone (no rows run) costs the GEMM 8 ms there: the
// two streams share ~23 GB/s. Earlier, on a 2-core Xeon with AMX (~14 GB/s a core), a list of
// the next rows' lines, one prefetch per k-step, lost to fetching nothing (70.5 vs 66.6 ms), as
// did every 2nd / 4th line, the first line of each 4 KB page, demand loads and two lines per
// k-step (72-86 ms); that list cost a load per line and came in bursts, where this walks a few
// spans at the rate the rows need.
at::Tensor panel_lora_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                             const std::optional<at::Tensor>& bias, const at::Tensor& rows,
                             const at::Tensor& slots, const at::Tensor& a, const std::vector<at::Tensor>& bs,
                             const std::optional<at::Tensor>& slot_rank) {
  check_panel_args(x, w, n, bias);
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  TORCH_CHECK(M <= kMC, "panel_lora_linear takes at most ", kMC, " rows, got ", M);
  auto y = at::empty({M, n}, x.options());
#if LORASERVE_SIMD
  const LoraRows L = fused_lora::rows_args(x, n, rows, slots, a, bs, slot_rank, false);
  if (M == 0) return y;
  auto d = at::empty({L.e.N, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  fused_lora::run(L, d.data_ptr<float>(), M, P, yp, [&](int64_t p, bool next, const Lines* spans, int ns, int64_t lines) {
    decode_panel_lora(xp, ldx, M, K, wp, n, bp, p, next, spans, ns, lines, yp);
  });
  return y;
#else
  TORCH_CHECK(false, "panel_lora_linear needs an AVX-512 or AVX2+FMA build");
#endif
}

// y [M, n] (contiguous) += what panel_lora_linear adds to its base product: each adapter row's
// delta computed apart, then added. The decode stack's one-region step (decode_stack_cpu.cpp)
// computes the base by panel ranges and then this, so its result is the fused pass's bit for bit.
void lora_deltas(const at::Tensor& x, const at::Tensor& y, const at::Tensor& rows, const at::Tensor& slots,
                 const at::Tensor& a, const std::vector<at::Tensor>& bs,
                 const std::optional<at::Tensor>& slot_rank) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [M, K] tensor with contiguous rows");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0),
              "y must be a contiguous float32 [M, n] tensor");
#if LORASERVE_SIMD
  const LoraRows L = fused_lora::rows_args(x, y.size(1), rows, slots, a, bs, slot_rank, false);
  auto d = at::empty({L.e.N, y.size(1)}, x.options());
  std::vector<float> h(L.t.gr());
  for (int64_t e = 0; e < L.e.N; ++e) fused_lora::lora_unit(L, d.data_ptr<float>(), e, h.data());
  fused_lora::add_deltas(L, d.data_ptr<float>(), y.data_ptr<float>());
#else
  TORCH_CHECK(false, "lora_deltas needs an AVX-512 or AVX2+FMA build");
#endif
}
