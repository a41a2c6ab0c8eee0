// Several decode steps in one call from Python: each step's token (its argmax, or its draw for a
// row sampled at a temperature) is the next step's input.
//
// Why: between two batch-1 steps the engine's Python (scheduling, the step's small tensors,
// sampling, emitting the token) cost ~0.9 ms on SmolLM2-135M int8 (2-core AMD EPYC Zen 3, AVX2,
// 20-25 GB/s: ~10 % of a step), because the interpreter's and the dispatcher's paths run cold
// after the weights streamed through every cache. Where no logits processor acts on a row and its token is the
// argmax, or a draw at the row's temperature with no truncation (engine/logits_pipeline.py
// `plain_rows`), nothing but that token links two steps, so a burst of them runs here back to back
// and Python pays once a burst, as vLLM's multi-step scheduling does for its GPU steps. Each step
// calls what the one-step path calls (the embedding, the first norm, the layer stack, the lm_head,
// argmax_logsumexp; a sampled row's scores / temperature, their argmax_logsumexp and draw_rows' per-row pick at
// the uniform its generator gave for that step; the chosen token's logprob as sampling.py takes
// it), with the same arguments, so the tokens and logprobs are bitwise the one-step path's
// (tests/engine/test_decode_bursts.py).
#include <torch/csrc/utils/pybind.h>

#include "decode_steps.h"

#include <memory>
#include <tuple>
#include <vector>

at::Tensor panel_embedding(const at::Tensor& w, const at::Tensor& ids, int64_t k, const std::optional<at::Tensor>& scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& bias);
at::Tensor lowp_panel_linear(const at::Tensor& x, const at::Tensor& w, int64_t n,
                             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                             bool bf16_activations);
std::tuple<at::Tensor, at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& x);
int64_t draw_row(const float* x, int64_t n, float u, std::vector<float>& e, std::vector<double>& sums);

std::vector<at::Tensor> burst_steps(const DecodeHead& head, const at::Tensor& ids, const at::Tensor& positions,
                                     int64_t steps, const at::Tensor& block_tables, int64_t block_size,
                                     const StackStep& layers, const std::optional<at::Tensor>& temperature,
                                     const std::optional<at::Tensor>& uniforms) {
  TORCH_CHECK(steps >= 1, "steps must be at least 1");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && positions.sizes() == ids.sizes() &&
                  positions.scalar_type() == at::kLong,
              "ids and positions must be int64 [M]");
  const int64_t M = ids.size(0);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == M && block_tables.scalar_type() == at::kLong &&
                  block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [M, blocks]");
  const at::Tensor first = positions.contiguous();
  const int64_t* p0 = first.data_ptr<int64_t>();
  const int64_t nblk = block_tables.size(1);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t last = p0[m] + steps - 1;
    TORCH_CHECK(p0[m] >= 0 && last < head.cos.size(0), "position ", last, " is beyond the rotary table");
    TORCH_CHECK(last / block_size < nblk, "block tables hold ", nblk * block_size, " positions, the steps reach ",
                last + 1);
  }
  TORCH_CHECK(temperature.has_value() == uniforms.has_value(), "sampled rows need their uniforms");
  const float* temp = nullptr;
  const float* unif = nullptr;
  at::Tensor temp_c, unif_c;
  if (temperature) {
    TORCH_CHECK(temperature->scalar_type() == at::kFloat && temperature->dim() == 1 && temperature->size(0) == M,
                "temperature must be float32 [M]");
    TORCH_CHECK(uniforms->scalar_type() == at::kFloat && uniforms->dim() == 2 && uniforms->size(0) == steps &&
                    uniforms->size(1) == M,
                "uniforms must be float32 [steps, M]");
    temp_c = temperature->contiguous(), unif_c = uniforms->contiguous();
    temp = temp_c.data_ptr<float>(), unif = unif_c.data_ptr<float>();
  }
  std::vector<float> draw_e;  // a sampled row's draw buffers, reused row after row and step after step
  std::vector<double> draw_sums;
  auto tokens = at::empty({steps, M}, ids.options());
  auto logprobs = at::empty({steps, M}, ids.options().dtype(at::kFloat));
  auto finite = at::empty({steps, M}, ids.options().dtype(at::kBool));
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  at::Tensor cur = ids.contiguous();
  for (int64_t s = 0; s < steps; ++s) {
    // the step's positions, cache slots and context lengths, as engine/batch_builder.py lays
    // them out
    at::Tensor pos = at::empty({M}, ids.options()), slots = at::empty({M}, ids.options()),
               ctx = at::empty({M}, ids.options());
    for (int64_t m = 0; m < M; ++m) {
      const int64_t p = p0[m] + s;
      pos.data_ptr<int64_t>()[m] = p;
      slots.data_ptr<int64_t>()[m] = bt[m * nblk + p / block_size] * block_size + p % block_size;
      ctx.data_ptr<int64_t>()[m] = p + 1;
    }
    // ModelRunner.execute's calls: embed_tokens, the first norm, the layers, logits (.float())
    at::Tensor x = head.packed ? panel_embedding(head.embed, cur, head.hidden, head.embed_scale)
                               : head.embed.index_select(0, cur).to(head.act);  // F.embedding's copy
    const at::Tensor h = rms_norm(x, head.in_norm, head.eps);
    const at::Tensor out = layers(x, h, head.cos.index_select(0, pos), head.sin.index_select(0, pos), slots, ctx);
    const at::Tensor logits = (head.lowp ? lowp_panel_linear(out, head.head_w, head.head_n, head.head_scale,
                                                             head.head_bias, head.bf16_activations)
                                         : panel_linear(out, head.head_w, head.head_n, head.head_bias))
                                  .to(at::kFloat);
    // then Engine.step's stats and sampling.py's pick: a greedy row's argmax; a sampled row's
    // scores = logits / T (T = 1 leaves them, and their stats, as they are) and the token drawn
    // from them; each token's logprob against its scores' logsumexp
    const auto [arg, lse, fin] = argmax_logsumexp(logits);
    finite[s].copy_(fin);
    int64_t* tok = arg.data_ptr<int64_t>();
    float* lp = logprobs[s].data_ptr<float>();
    const float* lsep = lse.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float* scores = logits.data_ptr<float>() + m * logits.stride(0);
      float row_lse = lsep[m];
      at::Tensor scaled;  // a sampled row's scores / T; alive while `scores` points into them
      if (temp != nullptr && temp[m] > 0.f) {
        if (temp[m] != 1.f) {  // logits_processors.apply_temperature: scores / a [rows, 1] tensor
          at::Tensor t = at::empty({1, 1}, logits.options());
          t.data_ptr<float>()[0] = temp[m];
          scaled = logits[m].unsqueeze(0).div(t);
          scores = scaled.data_ptr<float>();
          row_lse = std::get<1>(argmax_logsumexp(scaled)).data_ptr<float>()[0];
        }
        tok[m] = draw_row(scores, logits.size(1), unif[s * M + m], draw_e, draw_sums);
      }
      lp[m] = scores[tok[m]] - row_lse;
    }
    tokens[s].copy_(arg);
    cur = arg;
  }
  return {tokens, logprobs, finite};
}

void bind_decode_head(pybind11::module_& m) {
  pybind11::class_<DecodeHead, std::shared_ptr<DecodeHead>>(
      m, "DecodeHead", "the embedding, first norm, rotary tables and lm_head around a decode stack's layers",
      pybind11::module_local())
      .def(pybind11::init([](const at::Tensor& embed, const std::optional<at::Tensor>& embed_scale, bool packed,
                             int64_t hidden, at::ScalarType act, const at::Tensor& in_norm, double eps,
                             const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& head_w, int64_t head_n,
                             const std::optional<at::Tensor>& head_scale,
                             const std::optional<at::Tensor>& head_bias, bool lowp, bool bf16_activations) {
             return std::make_shared<DecodeHead>(DecodeHead{embed, embed_scale, packed, hidden, act, in_norm, eps, cos,
                                                            sin, head_w, head_n, head_scale, head_bias, lowp,
                                                            bf16_activations});
           }),
           pybind11::arg("embed"), pybind11::arg("embed_scale"), pybind11::arg("packed"), pybind11::arg("hidden"),
           pybind11::arg("act"), pybind11::arg("in_norm"), pybind11::arg("eps"), pybind11::arg("cos"),
           pybind11::arg("sin"), pybind11::arg("head_w"), pybind11::arg("head_n"), pybind11::arg("head_scale"),
           pybind11::arg("head_bias"), pybind11::arg("lowp"), pybind11::arg("bf16_activations"));
}
