// The fused decode pass over low-precision weight panels: lowp_panel_linear's product plus every
// row's own LoRA in one call (lowp_panel_lora_linear), for the products that take the FMA kernels
// panel by panel (lowp_lora_fuses says which).
//
// Why: with int8 weights the base GEMM of a 32-row decode step reads a quarter of the fp32 bytes
// at the same FMAs, so the adapters' stream after it (313 MB a step with 32 distinct rank-16 bf16
// adapters on the 135M shape, 625 MB in fp32) weighs more than ever: AVX2 build, 2-core Zen 4,
// int8-bf16, a 75 ms step spent 12.7 ms on it after 39 ms of projections that leave the memory
// bus idle. fused_lora.h's run_by_columns runs the shrinks between the panels, each panel's part
// blocks fetching the A the rows run right after it read (lowp_kernels.h steps the same fetch
// policy as the fp32 kernels, every kPfEvery k-steps), and the expands after the panels (it says
// why). The base product is lowp_panel_linear's bit for bit
// (the same kernels over the same panels; the fetches change no arithmetic); each row's delta is
// the row kernel's (shrink_members, then expand onto y), column for column.
#include "aten_min.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "fused_lora.h"
#include "lowp_kernels.h"
#include "lowp_panel.h"
#include "simd.h"

lowp::LowpPath lowp_path(int64_t M, int64_t K, bool bf16, bool bf16_activations);
void check_lowp_args(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& bias);

#if LORASERVE_SIMD
static_assert(lowp::kNR == fused_lora::kPanelCols, "the expands follow the panels' columns");
#endif

namespace {
constexpr int64_t kMaxRows = 96;  // decode sizes: one chunk of rows (gemm_lowp_cpu.cpp kMC)
}  // namespace

// Whether M rows of K on these panels take the fused pass: from the rows whose panels fetch the
// adapter rows (fused_lora.h kLoraPfMinRows; below, the two passes measured level for fp32 panels
// and the row kernel reads a slot's A and B once for its consecutive rows) up to decode sizes,
// where lowp_panel_linear runs the FMA kernels panel by panel through their part blocks (the
// other paths work on all panels at once, so there is no "between two panels"). Only builds with
// neither AMX, nor bf16 / int8 dot products at these rows, take it: AVX2 machines, AVX-512 ones
// without VNNI.
bool lowp_lora_fuses(int64_t M, int64_t K, bool bf16, bool bf16_activations) {
#if LORASERVE_SIMD
  if (M < fused_lora::kLoraPfMinRows || M > kMaxRows) return false;
  if (lowp_path(M, K, bf16, bf16_activations) != lowp::LowpPath::panels) return false;
  return bf16 ? lowp_fma::by_parts<true>(M) : lowp_fma::by_parts<false>(M);
#else
  return false;
#endif
}

// y = lowp_panel_linear(x, w, n, scale, bias, bf16_activations), plus for every entry:
// y[rows[e]] += (x[rows[e]] @ a[slots[e]]) @ [bs[0] | bs[1] | ...][slots[e]] (members side by
// side, fp32 or bf16 tables), each row's delta computed apart and added once every panel is
// stored. Only where lowp_lora_fuses(M, K, ...) holds (else the caller runs the two passes).
at::Tensor lowp_panel_lora_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                                  bool bf16_activations, const at::Tensor& rows, const at::Tensor& slots,
                                  const at::Tensor& a, const std::vector<at::Tensor>& bs,
                                  const std::optional<at::Tensor>& slot_rank) {
  check_lowp_args(x, w, n, scale, bias);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  TORCH_CHECK(lowp_lora_fuses(M, K, bf16, bf16_activations), "lowp_panel_lora_linear does not take ", M,
              " rows of these panels here (lowp_lora_fuses): run lowp_panel_linear and lora_rows");
#if LORASERVE_SIMD
  const fused_lora::LoraRows L = fused_lora::rows_args(x, n, rows, slots, a, bs, slot_rank, true);
  auto y = at::empty({M, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const char* wp = static_cast<const char*>(w.data_ptr());
  const int64_t panel_bytes = bf16 ? (K + 1) / 2 * 2 * lowp::kNR * 2 : K * lowp::kNR;
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const int64_t steps = lowp_fma::part_pf_steps(M, K);
  fused_lora::run_by_columns(L, M, P, yp, [&](int64_t p, bool next, const fetch_policy::Lines* spans, int ns, int64_t lines) {
    // the panel as lowp_panel_linear's work item p computes it (one chunk of rows)
    const lowp::Panel t{wp + p * panel_bytes, K, sp ? sp + p * lowp::kNR : nullptr, bp ? bp + p * lowp::kNR : nullptr,
                        std::min(lowp::kNR, n - p * lowp::kNR), next ? wp + (p + 1) * panel_bytes : nullptr,
                        next ? panel_bytes : 0};
    thread_local std::vector<float> scratch;
    float* yt = yp + p * lowp::kNR;
    if (ns == 0) {  // no adapter row runs after this panel
      if (bf16) lowp_fma::panel_rows<true>(M, xp, ldx, t, yt, n, scratch);
      else lowp_fma::panel_rows<false>(M, xp, ldx, t, yt, n, scratch);
      return;
    }
    fetch_policy::Spans pf = fetch_policy::Spans::over(spans, ns, lines, steps);
    if (bf16) lowp_fma::panel_rows<true>(M, xp, ldx, t, yt, n, scratch, pf);
    else lowp_fma::panel_rows<false>(M, xp, ldx, t, yt, n, scratch, pf);
  });
  return y;
#else
  TORCH_CHECK(false, "unreachable: lowp_lora_fuses is false without SIMD");
#endif
}
