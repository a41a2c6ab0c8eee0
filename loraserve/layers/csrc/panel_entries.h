// The projection kernels that more than one file calls by name: whole products over fp32 panels
// (csrc/gemm_cpu.cpp, gemm_lora_cpu.cpp) and bf16 / int8 panels (csrc/gemm_lowp_cpu.cpp,
// gemm_lowp_lora_cpu.cpp), and the row kernel of adapter deltas (csrc/lora_cpu.cpp).
#pragma once

#include "aten_min.h"

#include <cstdint>
#include <optional>
#include <vector>

// y = x @ W.T (+ bias) over fp32 panels; with every adapter row's LoRA between the panels
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                        const std::optional<at::Tensor>& bias);
at::Tensor panel_lora_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                             const std::optional<at::Tensor>& bias, const at::Tensor& rows,
                             const at::Tensor& slots, const at::Tensor& a, const std::vector<at::Tensor>& bs,
                             const std::optional<at::Tensor>& slot_rank);
// the same over bf16 / int8 panels (scale: int8's per-column scales)
at::Tensor lowp_panel_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                             bool bf16_activations);
bool lowp_lora_fuses(int64_t M, int64_t K, bool bf16, bool bf16_activations);
at::Tensor lowp_panel_lora_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                                  bool bf16_activations, const at::Tensor& rows, const at::Tensor& slots,
                                  const at::Tensor& a, const std::vector<at::Tensor>& bs,
                                  const std::optional<at::Tensor>& slot_rank);
// each adapter row's delta into its members' output slices ys
void lora_rows(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& slots,
               const at::Tensor& a, const std::vector<at::Tensor>& bs,
               const std::vector<at::Tensor>& ys, const std::optional<at::Tensor>& slot_rank);
