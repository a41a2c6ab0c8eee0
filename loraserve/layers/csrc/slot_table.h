// The slot table's operands as the LoRA kernels take them: `t` [S, rows, cols] with each slot's
// matrix contiguous and slots any distance apart (stride(0)), because the table keeps every
// slot's tensors in a block of its own (layers/lora.py: a slot's memory is taken when its
// adapter loads, without moving the others).
#pragma once

#include <torch/extension.h>

inline bool slot_matrices(const torch::Tensor& t) {
  return t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2) && t.stride(0) >= t.size(1) * t.size(2);
}
