// Several decode steps (greedy or sampled at a temperature) in one native call
// (decode_steps_cpu.cpp); the decode stack
// (decode_stack_cpu.cpp) runs each step's layers.
#pragma once

#include "aten_min.h"

#include <functional>
#include <optional>
#include <vector>

// What a step needs around the layers: the embedding, the first layer's input norm, the rotary
// tables and the lm_head, as the model's Python forward and `logits` use them. Built once per
// model; none of these tensors move after start-up.
struct DecodeHead {
  at::Tensor embed;  // the packed lm_head's panels (`packed`) or a plain [V, H] table
  std::optional<at::Tensor> embed_scale;
  bool packed;
  int64_t hidden;
  at::ScalarType act;  // the embedding's output dtype (a plain table is converted to it)
  at::Tensor in_norm;
  double eps;
  at::Tensor cos, sin;  // [positions, D/2] each
  at::Tensor head_w;    // the lm_head: fp32 panels or bf16 / int8 panels (`lowp`)
  int64_t head_n;
  std::optional<at::Tensor> head_scale, head_bias;
  bool lowp, bf16_activations;
};

// The layers of one step: (x, h, cos, sin, slots, ctx_lens) -> the final norm of the residual
// stream, x updated in place (DecodeStack::run with the step's block tables and adapter rows)
using StackStep = std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&)>;

// `steps` steps from each row's last token `ids` [M] at `positions` [M]; returns [steps, M] each:
// the tokens, their logprobs and whether each step's logits were all finite. temperature [M]
// (0: a greedy row) and uniforms [steps, M] (a sampled row's draw at each step), or neither: every
// row greedy.
std::vector<at::Tensor> burst_steps(const DecodeHead& head, const at::Tensor& ids, const at::Tensor& positions,
                                     int64_t steps, const at::Tensor& block_tables, int64_t block_size,
                                     const StackStep& layers, const std::optional<at::Tensor>& temperature,
                                     const std::optional<at::Tensor>& uniforms);
