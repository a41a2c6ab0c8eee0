// One packed projection of the decode stack (decode_stack_cpu.cpp): its weights, its adapters'
// slot-table views, and the calls that run it whole, with its adapter rows, or a range of its
// panels inside the stack's one parallel region.
#pragma once

#include "aten_min.h"

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "panel_entries.h"
#include "region_sync.h"

void lora_deltas(const at::Tensor& x, const at::Tensor& y, const at::Tensor& rows, const at::Tensor& slots,
                 const at::Tensor& a, const std::vector<at::Tensor>& bs,
                 const std::optional<at::Tensor>& slot_rank);

void panel_linear_range(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t n,
                        const float* bias, int64_t p0, int64_t p1, float* y);
void lowp_panel_range(const float* x, int64_t ldx, int64_t M, int64_t K, const char* w, bool bf16, int64_t n,
                      const float* scale, const float* bias, int64_t p0, int64_t p1, float* y,
                      std::vector<int8_t>& digits, std::vector<float>& scratch);

// a thread's buffers for the panel-range kernels, kept across the layers of a step
struct RangeScratch {
  std::vector<int8_t> digits;
  std::vector<float> f32;
};

// This step's adapter rows (LoraBatch.rows / row_slots) and the table's per-slot ranks
struct LoraRows {
  at::Tensor rows, slots;
  std::optional<at::Tensor> slot_rank;
};

// One packed projection: fp32 panels (gemm_cpu.cpp) or bf16 / int8 panels (gemm_lowp_cpu.cpp).
struct NativeLinear {
  at::Tensor w;
  int64_t n;
  std::optional<at::Tensor> scale, bias;
  bool lowp;  // bf16 / int8 panels

  // w, scale and bias as raw pointers, and w's panel count and panel bytes, taken once here.
  // Why: the region reads them for every projection of every layer of a step, on every thread,
  // and by then the weight stream has evicted the tensors' headers from the caches: through the
  // tensors (`data_ptr`, `size`: a call and a check each, on a cold line) they took ~4 % of a
  // batch-1 int8 step in a profile (2-core Zen 4). The weights never move after start-up.
  const char* wp;
  const float* sp;
  const float* bp;
  bool bf16;
  int64_t P, pb;

  NativeLinear(at::Tensor w_, int64_t n_, std::optional<at::Tensor> scale_, std::optional<at::Tensor> bias_)
      : w(std::move(w_)),
        n(n_),
        scale(std::move(scale_)),
        bias(std::move(bias_)),
        lowp(w.scalar_type() != at::kFloat),
        wp(static_cast<const char*>(w.data_ptr())),
        sp(scale ? scale->data_ptr<float>() : nullptr),
        bp(bias ? bias->data_ptr<float>() : nullptr),
        bf16(w.scalar_type() == at::kBFloat16),
        P(w.size(0)),
        pb(P ? w.numel() * w.element_size() / P : 0) {}

  // adapters of this projection group in one layer: A [S, in, members * R] and each member's B
  // [S, R, out] (views of the slot table), and each member's output columns [start, end)
  at::Tensor lora_a;
  std::vector<at::Tensor> lora_bs;
  std::vector<std::pair<int64_t, int64_t>> bounds;

  // panels [p0, p1) for M rows of x (K columns, rows ldx apart) into y [M, n]: what operator()
  // computes for those columns, bit for bit
  void panels(const float* x, int64_t ldx, int64_t M, int64_t K, float* y, int64_t p0, int64_t p1,
              RangeScratch& s) const {
    if (lowp) {
      lowp_panel_range(x, ldx, M, K, wp, bf16, n, sp, bp, p0, p1, y, s.digits, s.f32);
    } else {
      panel_linear_range(x, ldx, M, K, reinterpret_cast<const float*>(wp), n, bp, p0, p1, y);
    }
  }

  // thread t of T's share of the panels
  void range(const float* x, int64_t ldx, int64_t M, int64_t K, float* y, int t, int T, RangeScratch& s) const {
    const auto [p0, p1] = share(P, t, T);
    panels(x, ldx, M, K, y, p0, p1, s);
  }

  // where panels [p0, p1) start, and their bytes
  std::pair<const char*, int64_t> panel_bytes(int64_t p0, int64_t p1) const { return {wp + p0 * pb, (p1 - p0) * pb}; }

  at::Tensor operator()(const at::Tensor& x, bool bf16_activations) const {
    if (lowp) return lowp_panel_linear(x, w, n, scale, bias, bf16_activations);
    return panel_linear(x, w, n, bias);
  }

  // with every adapter row's delta, as LoraLinear.__call__ computes it: the fused base + LoRA pass
  // for up to `fused_rows` rows (0: never) and a table with up to `fused_members` members, as
  // CpuNativeOps.linear_lora (fp32 panels) and LowpCpuOps.linear_lora decide (their limits,
  // handed over by the Python side)
  at::Tensor operator()(const at::Tensor& x, bool bf16_activations, const LoraRows* lr, int64_t fused_rows,
                        int64_t fused_members) const {
    if (lr == nullptr) return (*this)(x, bf16_activations);
    if (fused(x.size(0), x.size(1), bf16_activations, fused_rows, fused_members)) {
      if (lowp)
        return lowp_panel_lora_linear(x, w, n, scale, bias, bf16_activations, lr->rows, lr->slots, lora_a, lora_bs,
                                      lr->slot_rank);
      return panel_lora_linear(x, w, n, bias, lr->rows, lr->slots, lora_a, lora_bs, lr->slot_rank);
    }
    at::Tensor y = (*this)(x, bf16_activations);
    add_lora(x, y, *lr, bf16_activations, fused_rows, fused_members);
    return y;
  }

  // whether M rows of K take the fused base + LoRA pass: fp32 panels with an fp32 table; bf16 /
  // int8 panels with an fp32 or bf16 table where the build runs them panel by panel
  // (lowp_lora_fuses)
  bool fused(int64_t M, int64_t K, bool bf16_activations, int64_t fused_rows, int64_t fused_members) const {
    const int64_t members = static_cast<int64_t>(lora_bs.size());
    if (M > fused_rows || members == 0 || members > fused_members) return false;
    if (!lowp) return lora_a.scalar_type() == at::kFloat;
    return lowp_lora_fuses(M, K, bf16, bf16_activations);
  }

  // the adapter rows' deltas onto y, this projection's base output for x: as the fp32 fused pass
  // adds them (each row's delta apart, then added) where it applies, else as the row kernel does.
  // (The one-region step calls this for up to 4 rows; bf16 / int8 panels fuse from 20.)
  void add_lora(const at::Tensor& x, const at::Tensor& y, const LoraRows& lr, bool bf16_activations,
                int64_t fused_rows, int64_t fused_members) const {
    if (fused(x.size(0), x.size(1), bf16_activations, fused_rows, fused_members)) {
      lora_deltas(x, y, lr.rows, lr.slots, lora_a, lora_bs, lr.slot_rank);
      return;
    }
    std::vector<at::Tensor> ys;
    for (const auto& [s, e] : bounds) ys.push_back(s == 0 && e == y.size(1) ? y : y.narrow(1, s, e - s));
    lora_rows(x, lr.rows, lr.slots, lora_a, lora_bs, ys, lr.slot_rank);
  }
};
