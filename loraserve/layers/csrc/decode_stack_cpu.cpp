// A decode step's whole stack of Llama-family decoder layers in one call from Python.
//
// Why: at batch 1 on a small model a layer is eight short native calls (q|k|v, attention, o,
// residual + norm, gate|up, SwiGLU, down, residual + norm) of 3-40 us each, and every call from
// Python pays its own toll: the interpreter between calls, pybind11's argument conversion, the
// `Ops` method's checks, an output tensor: 240 calls a token on SmolLM2-135M (30 layers). Batch-1
// decode in-process, alternated with the Python loop (2-core Zen 5, AVX-512 build, a slow phase of
// the host at a 28 GB/s probe): int8 185.9 vs 169.1 tok/s, bf16 85.8 vs 79.3, fp32 47.0 vs 45.0.
// Here the same kernels run in the same order with the same
// arguments, so the result is bitwise what the Python loop computes (tests/layers/
// test_decode_stack.py); only the trips through Python are gone. The stack is built once per
// model from the layers' packed weights and KV caches, which never move after start-up.
//
// Scope (the Python side checks it, layers/decode_stack.py): single-token decode rows only, no
// adapter rows (their tables are re-allocated as ranks grow; those steps take the Python path),
// and layers without per-head q/k norms, sliding windows or soft-capping.
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <vector>

torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                           const std::optional<torch::Tensor>& bias);
torch::Tensor lowp_panel_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                                const std::optional<torch::Tensor>& scale, const std::optional<torch::Tensor>& bias,
                                bool bf16_activations);
torch::Tensor rope_decode_attention(const torch::Tensor& qkv, int64_t hq, int64_t hkv, const torch::Tensor& cos,
                                    const torch::Tensor& sin, const torch::Tensor& k_cache,
                                    const torch::Tensor& v_cache, const torch::Tensor& slots,
                                    const torch::Tensor& block_tables, const torch::Tensor& ctx_lens, double scale);
torch::Tensor add_rms_norm_(const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& gu);

// One packed projection: fp32 panels (gemm_cpu.cpp) or bf16 / int8 panels (gemm_lowp_cpu.cpp).
struct NativeLinear {
  torch::Tensor w;
  int64_t n;
  std::optional<torch::Tensor> scale, bias;
  bool lowp;

  torch::Tensor operator()(const torch::Tensor& x, bool bf16_activations) const {
    if (lowp) return lowp_panel_linear(x, w, n, scale, bias, bf16_activations);
    return panel_linear(x, w, n, bias);
  }
};

struct DecodeLayer {
  NativeLinear qkv, o, gate_up, down;
  torch::Tensor post_norm, next_norm;  // next_norm: the next layer's input norm, or the final one
  torch::Tensor k_cache, v_cache;
  int64_t hq, hkv;
  double scale;
};

class DecodeStack {
 public:
  DecodeStack(double eps, bool bf16_activations) : eps_(eps), bf16_act_(bf16_activations) {}

  void add_layer(const torch::Tensor& qkv_w, int64_t qkv_n, const std::optional<torch::Tensor>& qkv_scale,
                 const std::optional<torch::Tensor>& qkv_bias, const torch::Tensor& o_w, int64_t o_n,
                 const std::optional<torch::Tensor>& o_scale, const std::optional<torch::Tensor>& o_bias,
                 const torch::Tensor& gu_w, int64_t gu_n, const std::optional<torch::Tensor>& gu_scale,
                 const std::optional<torch::Tensor>& gu_bias, const torch::Tensor& down_w, int64_t down_n,
                 const std::optional<torch::Tensor>& down_scale, const std::optional<torch::Tensor>& down_bias,
                 const torch::Tensor& post_norm, const torch::Tensor& next_norm, const torch::Tensor& k_cache,
                 const torch::Tensor& v_cache, int64_t hq, int64_t hkv, double scale) {
    auto lin = [](const torch::Tensor& w, int64_t n, const std::optional<torch::Tensor>& s,
                  const std::optional<torch::Tensor>& b) {
      return NativeLinear{w, n, s, b, w.scalar_type() != torch::kFloat32};
    };
    layers_.push_back(DecodeLayer{lin(qkv_w, qkv_n, qkv_scale, qkv_bias), lin(o_w, o_n, o_scale, o_bias),
                                  lin(gu_w, gu_n, gu_scale, gu_bias), lin(down_w, down_n, down_scale, down_bias),
                                  post_norm, next_norm, k_cache, v_cache, hq, hkv, scale});
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // x: the residual stream [B, hidden] (updated in place); h: the first layer's normed input.
  // Returns the final norm of the residual stream, as the model's forward does.
  torch::Tensor run(const torch::Tensor& x, torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                    const torch::Tensor& slots, const torch::Tensor& block_tables,
                    const torch::Tensor& ctx_lens) const {
    for (const DecodeLayer& l : layers_) {
      const torch::Tensor qkv = l.qkv(h, bf16_act_);
      const torch::Tensor attn = rope_decode_attention(qkv, l.hq, l.hkv, cos, sin, l.k_cache, l.v_cache, slots,
                                                       block_tables, ctx_lens, l.scale);
      h = add_rms_norm_(x, l.o(attn, bf16_act_), l.post_norm, eps_);
      const torch::Tensor act = silu_mul(l.gate_up(h, bf16_act_));
      h = add_rms_norm_(x, l.down(act, bf16_act_), l.next_norm, eps_);
    }
    return h;
  }

 private:
  std::vector<DecodeLayer> layers_;
  double eps_;
  bool bf16_act_;
};

// module_local: the AVX2 and the host's build load side by side in one process (the tests do), and
// pybind11 registers a class type once per process otherwise
void bind_decode_stack(pybind11::module_& m) {
  pybind11::class_<DecodeStack, std::shared_ptr<DecodeStack>>(
      m, "DecodeStack", "a model's decoder layers run by one native call per decode step", pybind11::module_local())
      .def(pybind11::init<double, bool>(), pybind11::arg("eps"), pybind11::arg("bf16_activations"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("__len__", &DecodeStack::size)
      .def("run", &DecodeStack::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
