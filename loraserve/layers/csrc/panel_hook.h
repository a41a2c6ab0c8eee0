// The seam between the fp32 panel GEMM (gemm_cpu.cpp) and what runs on each of its work items
// right after the item is stored (lora_cpu.cpp's prefill LoRA expand), while the item's rows and
// columns of the output are still in the cache of the thread that wrote them.
#pragma once

#include "aten_min.h"

#include <cstdint>
#include <functional>
#include <optional>

// rows [r0, r0 + rows) x columns [c0, c1) of the output
using PanelItemHook = std::function<void(int64_t r0, int64_t rows, int64_t c0, int64_t c1)>;

// x @ W.T + b over 32-column panels into y [M, n] (contiguous), `after` (if any) on each work item
void panel_linear_out(const at::Tensor& x, const at::Tensor& w, int64_t n,
                      const std::optional<at::Tensor>& bias, const at::Tensor& y, const PanelItemHook* after);

// Whether panel_linear_out's walk of M rows x P panels of K takes each thread's items chunk by
// chunk (every panel of a chunk of rows, then the next chunk), so a thread's items rarely change
// rows; else panel by panel (weights too big for L3), each item another chunk of rows.
bool panel_walk_chunk_major(int64_t M, int64_t K, int64_t P);
