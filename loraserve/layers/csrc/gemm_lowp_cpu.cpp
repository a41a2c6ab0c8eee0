// Dense projections y = x @ W.T (* scale) + b over low-precision weight panels: bf16, or int8
// with one fp32 scale per output column; x, y and every sum are fp32.
//
// Why our own kernel and not oneDNN: a decode step reads every weight once for a few rows, so the
// bytes of the weights are the time. Converting a bf16 or int8 panel to fp32 in registers costs
// one or two register operations per 16 values loaded, so the GEMM reads half (bf16) or a quarter
// (int8) of the fp32 bytes at the same instruction budget per column, with fp32 activations and
// fp32 accumulation. Figures: loraserve/layers/quantized_linear.py.
//
// Layouts (packed by loraserve/layers/quantized_linear.py), P = ceil(N / 32) panels, zero-padded:
// - bf16: [P, ceil(K / 2), 32, 2]: for each pair of k-steps the 32 columns' two values side by
//   side, so one 32-bit lane holds (k even, k odd) of one column: `v << 16` is the even k in
//   fp32, `v & 0xffff0000` the odd one. This is also AMX's B operand layout.
// - int8: [P, K, 32] plus scale [P * 32] (fp32): a column's sum is scaled once, at the end.
//
// Three ways through a panel, by rows (M) and CPU (the first two: lowp_kernels.h):
// - up to one register block of rows (12 with AVX-512; AVX2: bf16 up to 16 rows in blocks of 2,
//   int8 at any row count in blocks of up to 6 rows over half a panel): the panel is converted in
//   registers as it streams (decode); one row of int8 panels streams two panels at once
//   (lowp_kernels.h int8_row_range says why);
// - more rows, no AMX: each panel is converted once into an fp32 scratch copy (L1/L2) that an
//   fp32 register-blocked kernel then reads for every row block, instead of re-converting every
//   weight once per block of rows;
// - AMX (compiler targets it, the kernel grants it), bf16 from kAmxMinRows rows and int8 from
//   kAmxMinRowsInt8: tile multiplies over the same panels (gemm_amx_cpu.cpp says how).
// The portable build (neither AVX2 nor AVX-512) keeps a scalar loop of the same sums.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include "lowp_kernels.h"
#include "lowp_panel.h"
#include "over_rows.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

using lowp::kNR;
using lowp::LowpPath;
using lowp::Panel;
using lowp_fma::panel_rows;
constexpr int64_t kMC = 96;  // most rows per work item of the FMA paths: they stay in L2

}  // namespace

// bf16 panels x many rows with vdpbf16ps (csrc/gemm_bf16dp_cpu.cpp), where the build has AVX512_BF16
bool bf16dp_available();
void bf16dp_linear(const float* x, int64_t ldx, int64_t M, int64_t K, const char* w, int64_t panel_bytes, int64_t P,
                   int64_t n, const float* scale, const float* bias, float* y);
// from this many rows bf16 panels multiply bf16 activations (as AMX does from kAmxMinRows)
constexpr int64_t kBf16DpMinRows = 8;
// int8 panels x fp32 activations by integer dot products (csrc/gemm_int8dp_cpu.cpp), where the
// build has AVX512-VNNI and AVX512-VBMI, for K up to int8dp_max_k() (0: not in this build)
int64_t int8dp_max_k();
void int8dp_linear(const float* x, int64_t ldx, int64_t M, int64_t K, const char* w, int64_t panel_bytes, int64_t P,
                   int64_t n, const float* scale, const float* bias, float* y);

// the paths lowp_panel_linear can take here: AMX (where Linux grants it) replaces bf16 dot
// products from the same row count; int8 dot products serve int8 below AMX's rows either way
std::string lowp_gemm_isa() {
#if LORASERVE_SIMD == 512
  bool amx = false;
#if defined(LORASERVE_AMX)
  amx = lowp::amx_enabled();
#endif
  std::string isa = "avx512";
  if (amx) isa += "+amx";
  else if (bf16dp_available()) isa += "+bf16dp";
  if (int8dp_max_k() > 0) isa += "+int8dp";
  return isa;
#elif LORASERVE_SIMD == 256
  return "avx2";
#else
  return "scalar";
#endif
}

void int8dp_range(const float* x, int64_t ldx, int64_t M, int64_t K, const char* w, int64_t panel_bytes, int64_t p0,
                  int64_t p1, int64_t n, const float* scale, const float* bias, float* y, std::vector<int8_t>& digits);

// the most rows lowp_panel_range takes: below every threshold where lowp_panel_linear switches to
// a kernel that works on all panels at once (AMX, bf16 dot products) or converts rows up front
constexpr int64_t kRangeRows = 4;
static_assert(kRangeRows < kBf16DpMinRows, "lowp_panel_range assumes the per-panel kernels");
#if defined(LORASERVE_AMX)
using lowp::kAmxMinRows;
using lowp::kAmxMinRowsInt8;
static_assert(kRangeRows < kAmxMinRowsInt8 && kRangeRows < kAmxMinRows, "lowp_panel_range assumes no AMX");
// bf16 panels reach AMX only with rounded activations (rounds_activations)
static_assert(kAmxMinRows == kBf16DpMinRows, "AMX and vdpbf16ps round activations from the same row count");
#endif
int64_t lowp_range_rows() { return kRangeRows; }

// Panels [p0, p1) of lowp_panel_linear's product, each panel as lowp_panel_linear computes it:
// the decode stack's threads each take a range inside one parallel region (decode_stack_cpu.cpp,
// at most kRangeRows rows, so no other path applies), and the split cannot change a bit. At decode
// sizes lowp_panel_linear's own threads run their panels through here too, once it has chosen
// the panels.
void lowp_panel_range(const float* x, int64_t ldx, int64_t M, int64_t K, const char* w, bool bf16, int64_t n,
                      const float* scale, const float* bias, int64_t p0, int64_t p1, float* y,
                      std::vector<int8_t>& digits, std::vector<float>& scratch) {
  const int64_t panel_bytes = bf16 ? (K + 1) / 2 * 2 * kNR * 2 : K * kNR;
  if (!bf16 && K <= int8dp_max_k()) {
    int8dp_range(x, ldx, M, K, w, panel_bytes, p0, p1, n, scale, bias, y, digits);
    return;
  }
  auto panel = [&](int64_t p) {
    return Panel{w + p * panel_bytes, K, scale ? scale + p * kNR : nullptr, bias ? bias + p * kNR : nullptr,
                 std::min(kNR, n - p * kNR)};
  };
#if LORASERVE_SIMD
  if (M == 1 && !bf16) {  // one row: two runs of int8 panels at once (the one-row kernels fetch ahead themselves)
    lowp_fma::int8_row_range(x, p0, p1, panel, y);
    return;
  }
#endif
  for (int64_t p = p0; p < p1; ++p) {
    Panel t = panel(p);
    if (p + 1 < p1) t.next = w + (p + 1) * panel_bytes, t.next_bytes = panel_bytes;  // fetched meanwhile
    if (bf16) panel_rows<true>(M, x, ldx, t, y + p * kNR, n, scratch);
    else panel_rows<false>(M, x, ldx, t, y + p * kNR, n, scratch);
  }
}

// Which kernel lowp_panel_linear runs for M rows of K: one rule for every path that multiplies
// bf16: activations are rounded to bf16 from kBf16DpMinRows rows (bf16 panels, or int8 panels of
// a bf16 model), never below; int8 tiles from 6 rows take them as two bf16 parts (fp32) until then
static bool rounds_activations(int64_t M, bool bf16, bool bf16_activations) {
  return (bf16 || bf16_activations) && M >= kBf16DpMinRows;
}

LowpPath lowp_path(int64_t M, int64_t K, bool bf16, bool bf16_activations) {
  const bool round_act = rounds_activations(M, bf16, bf16_activations);
#if defined(LORASERVE_AMX)
  if (M >= (bf16 ? kAmxMinRows : kAmxMinRowsInt8) && lowp::amx_enabled()) return LowpPath::amx;
#endif
  if (round_act && bf16dp_available()) return LowpPath::bf16dp;
  if (!bf16 && K <= int8dp_max_k()) return LowpPath::int8dp;  // fp32 activations as 24-bit integers
  return LowpPath::panels;
}

// x [M, K] fp32 with contiguous rows, w low-precision panels covering n columns, their scale and
// bias: what lowp_panel_linear and the fused decode pass (gemm_lowp_lora_cpu.cpp) take
void check_lowp_args(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [M, K] tensor with contiguous rows");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const int64_t K = x.size(1), P = w.size(0);
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  if (bf16) {
    TORCH_CHECK(w.dim() == 4 && w.size(1) == (K + 1) / 2 && w.size(2) == kNR && w.size(3) == 2,
                "a bf16 weight must be [P, ceil(K/2), 32, 2] panels for K = ", K);
    TORCH_CHECK(!scale, "bf16 panels take no scale");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 3 && w.size(1) == K && w.size(2) == kNR,
                "an int8 weight must be [P, K, 32] panels for K = ", K);
    TORCH_CHECK(scale && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->numel() == P * kNR,
                "int8 panels need a contiguous float32 scale of P * 32 entries");
  }
  TORCH_CHECK(n > (P - 1) * kNR && n <= P * kNR, "n = ", n, " does not match ", P, " panels");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "bias must be a contiguous float32 [n] tensor");
  }
}

// x [M, K] fp32 (contiguous rows, any row stride); w: bf16 [P, ceil(K/2), 32, 2] or int8 [P, K, 32]
// with scale [P * 32]; bias [n] -> y [M, n] fp32. bf16 panels multiply bf16-rounded activations
// from kBf16DpMinRows / kAmxMinRows rows where the CPU has bf16 dot products or AMX; int8 panels
// do so only with `bf16_activations` (serving `--dtype bfloat16`), else keep fp32 activations.
at::Tensor lowp_panel_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                             const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& bias, bool bf16_activations) {
  check_lowp_args(x, w, n, scale, bias);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const char* wp = static_cast<const char*>(w.data_ptr());
  const int64_t panel_bytes = bf16 ? (K + 1) / 2 * 2 * kNR * 2 : K * kNR;
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  switch (lowp_path(M, K, bf16, bf16_activations)) {
#if defined(LORASERVE_AMX)
    case LowpPath::amx:
      lowp::amx_linear(bf16, rounds_activations(M, bf16, bf16_activations), xp, ldx, M, K, wp, panel_bytes, P, n, sp,
                       bp, yp);
      return y;
#endif
    case LowpPath::bf16dp:
      bf16dp_linear(xp, ldx, M, K, wp, panel_bytes, P, n, sp, bp, yp);
      return y;
    case LowpPath::int8dp:
      int8dp_linear(xp, ldx, M, K, wp, panel_bytes, P, n, sp, bp, yp);
      return y;
    default:
      break;
  }
  const int64_t chunks = (M + kMC - 1) / kMC;
  const bool major = grid_chunk_major(P * panel_bytes);
  // one work item: a chunk of rows x one panel (over_rows.h: which order)
  at::parallel_for(0, P * chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch;
    if (chunks == 1) {  // decode sizes: items are panels, a thread's run of them as the decode stack's
      std::vector<int8_t> digits;  // int8dp's (not this path)
      lowp_panel_range(xp, ldx, M, K, wp, bf16, n, sp, bp, lo, hi, yp, digits, scratch);
      return;
    }
    for (int64_t it = lo; it < hi; ++it) {
      const auto [p, c] = grid_item(it, P, chunks, major);
      const int64_t r0 = M * c / chunks, rows = M * (c + 1) / chunks - r0;
      const Panel t{wp + p * panel_bytes, K, sp ? sp + p * kNR : nullptr, bp ? bp + p * kNR : nullptr,
                    std::min(kNR, n - p * kNR)};
      if (bf16) panel_rows<true>(rows, xp + r0 * ldx, ldx, t, yp + r0 * n + p * kNR, n, scratch);
      else panel_rows<false>(rows, xp + r0 * ldx, ldx, t, yp + r0 * n + p * kNR, n, scratch);
    }
  });
  return y;
}
