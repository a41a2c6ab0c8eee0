// A decode step's whole stack of Llama-family decoder layers in one call from Python.
//
// Why: at batch 1 on a small model a layer is eight short native calls (q|k|v, attention, o,
// residual + norm, gate|up, SwiGLU, down, residual + norm) of 3-40 us each, and every call from
// Python pays its own toll: the interpreter between calls, pybind11's argument conversion, the
// `Ops` method's checks, an output tensor: 240 calls a token on SmolLM2-135M (30 layers; figures in
// layers/decode_stack.py). Here the same kernels run in the same order with the same
// arguments, so the result is bitwise what the Python loop computes (tests/layers/
// test_decode_stack.py); only the trips through Python are gone. The stack is built once per
// model from the layers' packed weights and KV caches, which never move after start-up.
//
// Scope (the Python side checks it, layers/decode_stack.py): single-token decode rows only, and
// layers without per-head q/k norms, sliding windows or soft-capping. Rows with adapters take each
// projection's LoRA as `LoraLinear` does (the fused base + LoRA pass where it applies, else the
// base and then the row kernel into the members' column slices), from per-layer views of the slot
// table that the Python side hands over again whenever the table is re-allocated.
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
torch::Tensor panel_lora_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                                const std::optional<torch::Tensor>& bias, const torch::Tensor& rows,
                                const torch::Tensor& slots, const torch::Tensor& a, const std::vector<torch::Tensor>& bs,
                                const std::optional<torch::Tensor>& slot_rank);
void lora_rows(const torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& slots,
               const torch::Tensor& a, const std::vector<torch::Tensor>& bs,
               const std::vector<torch::Tensor>& ys, const std::optional<torch::Tensor>& slot_rank);

// This step's adapter rows (LoraBatch.rows / row_slots) and the table's per-slot ranks
struct LoraRows {
  torch::Tensor rows, slots;
  std::optional<torch::Tensor> slot_rank;
};

// One packed projection: fp32 panels (gemm_cpu.cpp) or bf16 / int8 panels (gemm_lowp_cpu.cpp).
struct NativeLinear {
  torch::Tensor w;
  int64_t n;
  std::optional<torch::Tensor> scale, bias;
  bool lowp;

  // adapters of this projection group in one layer: A [S, in, members * R] and each member's B
  // [S, R, out] (views of the slot table), and each member's output columns [start, end)
  torch::Tensor lora_a;
  std::vector<torch::Tensor> lora_bs;
  std::vector<std::pair<int64_t, int64_t>> bounds;

  torch::Tensor operator()(const torch::Tensor& x, bool bf16_activations) const {
    if (lowp) return lowp_panel_linear(x, w, n, scale, bias, bf16_activations);
    return panel_linear(x, w, n, bias);
  }

  // with every adapter row's delta, as LoraLinear.__call__ computes it: the fused base + LoRA pass
  // for up to `fused_rows` rows (0: never) of fp32 panels and table with up to `fused_members`
  // members, as CpuNativeOps.linear_lora decides (its limits, handed over by the Python side)
  torch::Tensor operator()(const torch::Tensor& x, bool bf16_activations, const LoraRows* lr, int64_t fused_rows,
                           int64_t fused_members) const {
    if (lr == nullptr) return (*this)(x, bf16_activations);
    const int64_t members = static_cast<int64_t>(lora_bs.size());
    if (!lowp && lora_a.scalar_type() == torch::kFloat32 && x.size(0) <= fused_rows && members > 0 &&
        members <= fused_members)
      return panel_lora_linear(x, w, n, bias, lr->rows, lr->slots, lora_a, lora_bs, lr->slot_rank);
    torch::Tensor y = (*this)(x, bf16_activations);
    std::vector<torch::Tensor> ys;
    for (const auto& [s, e] : bounds) ys.push_back(s == 0 && e == y.size(1) ? y : y.narrow(1, s, e - s));
    lora_rows(x, lr->rows, lr->slots, lora_a, lora_bs, ys, lr->slot_rank);
    return y;
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
  DecodeStack(double eps, bool bf16_activations, int64_t fused_lora_rows, int64_t fused_lora_members)
      : eps_(eps), bf16_act_(bf16_activations), fused_rows_(fused_lora_rows), fused_members_(fused_lora_members) {}

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

  // projection group g (0 q|k|v, 1 o, 2 gate|up, 3 down) of `layer`: its members' output widths
  // (once) and its slot-table views (again after every re-allocation of the table)
  void set_lora(int64_t layer, int64_t group, const torch::Tensor& a, const std::vector<torch::Tensor>& bs,
                const std::vector<int64_t>& widths) {
    TORCH_CHECK(layer >= 0 && layer < size() && group >= 0 && group < 4, "no projection group ", group,
                " in layer ", layer);
    TORCH_CHECK(bs.size() == widths.size(), "one B per member");
    DecodeLayer& l = layers_[layer];
    NativeLinear* g[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
    g[group]->lora_a = a;
    g[group]->lora_bs = bs;
    g[group]->bounds.clear();
    int64_t start = 0;
    for (int64_t w : widths) {
      g[group]->bounds.emplace_back(start, start + w);
      start += w;
    }
    TORCH_CHECK(start == g[group]->n, "members cover ", start, " of ", g[group]->n, " output columns");
  }

  // x: the residual stream [B, hidden] (updated in place); h: the first layer's normed input.
  // Returns the final norm of the residual stream, as the model's forward does.
  // lora_rows / lora_slots: this step's adapter rows and their slots (none: no row has an adapter)
  torch::Tensor run(const torch::Tensor& x, torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                    const torch::Tensor& slots, const torch::Tensor& block_tables, const torch::Tensor& ctx_lens,
                    const std::optional<torch::Tensor>& lora_rows, const std::optional<torch::Tensor>& lora_slots,
                    const std::optional<torch::Tensor>& slot_rank) const {
    TORCH_CHECK(lora_rows.has_value() == lora_slots.has_value(), "adapter rows need their slots");
    std::optional<LoraRows> lr;
    if (lora_rows) {
      for (const DecodeLayer& l : layers_)
        for (const NativeLinear* g : {&l.qkv, &l.o, &l.gate_up, &l.down})
          TORCH_CHECK(g->lora_a.defined(), "adapter rows but no slot table (set_lora)");
      lr = LoraRows{*lora_rows, *lora_slots, slot_rank};
    }
    const LoraRows* lp = lr ? &*lr : nullptr;
    for (const DecodeLayer& l : layers_) {
      const torch::Tensor qkv = l.qkv(h, bf16_act_, lp, fused_rows_, fused_members_);
      const torch::Tensor attn = rope_decode_attention(qkv, l.hq, l.hkv, cos, sin, l.k_cache, l.v_cache, slots,
                                                       block_tables, ctx_lens, l.scale);
      h = add_rms_norm_(x, l.o(attn, bf16_act_, lp, fused_rows_, fused_members_), l.post_norm, eps_);
      const torch::Tensor act = silu_mul(l.gate_up(h, bf16_act_, lp, fused_rows_, fused_members_));
      h = add_rms_norm_(x, l.down(act, bf16_act_, lp, fused_rows_, fused_members_), l.next_norm, eps_);
    }
    return h;
  }

 private:
  std::vector<DecodeLayer> layers_;
  double eps_;
  bool bf16_act_;
  int64_t fused_rows_, fused_members_;
};

// module_local: the AVX2 and the host's build load side by side in one process (the tests do), and
// pybind11 registers a class type once per process otherwise
void bind_decode_stack(pybind11::module_& m) {
  pybind11::class_<DecodeStack, std::shared_ptr<DecodeStack>>(
      m, "DecodeStack", "a model's decoder layers run by one native call per decode step", pybind11::module_local())
      .def(pybind11::init<double, bool, int64_t, int64_t>(), pybind11::arg("eps"),
           pybind11::arg("bf16_activations"), pybind11::arg("fused_lora_rows"), pybind11::arg("fused_lora_members"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_lora", &DecodeStack::set_lora)
      .def("__len__", &DecodeStack::size)
      .def("run", &DecodeStack::run, pybind11::arg("x"), pybind11::arg("h"), pybind11::arg("cos"),
           pybind11::arg("sin"), pybind11::arg("slots"), pybind11::arg("block_tables"), pybind11::arg("ctx_lens"),
           pybind11::arg("lora_rows") = pybind11::none(), pybind11::arg("lora_slots") = pybind11::none(),
           pybind11::arg("slot_rank") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>());
}
