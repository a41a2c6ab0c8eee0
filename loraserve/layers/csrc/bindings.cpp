// Python bindings of the native CPU kernels (built by loraserve/layers/native_cpu.py).
#include <torch/csrc/utils/pybind.h>

#include "aten_min.h"

#include <optional>
#include <string>
#include <vector>

#include "panel_entries.h"
#include "row_prefetch.h"
#include "simd.h"

void write_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& slots);

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& ctx_lens, double scale);

at::Tensor rope_decode_attention(const at::Tensor& qkv, int64_t hq, int64_t hkv, const at::Tensor& cos,
                                 const at::Tensor& sin, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& slots,
                                 const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale);

void prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::vector<std::pair<int64_t, int64_t>>& spans, double scale, const at::Tensor& out);

at::Tensor panel_embedding(const at::Tensor& w, const at::Tensor& ids, int64_t k,
                           const std::optional<at::Tensor>& scale);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps);

at::Tensor silu_mul(const at::Tensor& gu);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

std::tuple<at::Tensor, at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& x);
at::Tensor draw_rows(const at::Tensor& x, const at::Tensor& u);

bool panel_gemm_available();
at::Tensor panel_linear_lora_rows(const at::Tensor& x, const at::Tensor& w, int64_t n,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& rows,
                                  const at::Tensor& slots, const at::Tensor& a,
                                  const std::vector<at::Tensor>& bs,
                                  const std::optional<at::Tensor>& slot_rank);

// bf16 / int8 weight panels (csrc/gemm_lowp_cpu.cpp)
std::string lowp_gemm_isa();

// a model's decoder layers in one call per decode step (csrc/decode_stack_cpu.cpp)
void bind_decode_stack(pybind11::module_& m);
void bind_decode_head(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_decode_stack(m);
  bind_decode_head(m);
  m.def("lowp_gemm_isa", &lowp_gemm_isa, "vector code of the low-precision GEMM: avx512, avx2 or scalar");
  m.def("lowp_panel_linear", &lowp_panel_linear, "x @ W.T (* scale) + b over bf16 or int8 weight panels",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("n"), pybind11::arg("scale") = pybind11::none(),
        pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("bf16_activations") = false, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lowp_lora_fuses", &lowp_lora_fuses,
        "whether M rows of K on bf16 / int8 panels take lowp_panel_lora_linear in this build on this CPU",
        pybind11::arg("m"), pybind11::arg("k"), pybind11::arg("bf16"), pybind11::arg("bf16_activations"));
  m.def("lowp_panel_lora_linear", &lowp_panel_lora_linear,
        "lowp_panel_linear plus every row's LoRA delta, the adapters streamed while the panels compute",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("n"), pybind11::arg("scale"), pybind11::arg("bias"),
        pybind11::arg("bf16_activations"), pybind11::arg("rows"), pybind11::arg("slots"), pybind11::arg("a"),
        pybind11::arg("bs"), pybind11::arg("slot_rank") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  // the step thread keeps the GIL free while a kernel runs, so the event loop is never stalled
  m.def("lora_rows", &lora_rows, "multi-LoRA shrink + expand into strided outputs", pybind11::arg("x"),
        pybind11::arg("rows"), pybind11::arg("slots"), pybind11::arg("a"), pybind11::arg("bs"), pybind11::arg("ys"),
        pybind11::arg("slot_rank") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rope_decode_attention", &rope_decode_attention,
        "a decode step's attention of one layer: rotary, cache write and decode attention over a fused q|k|v",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("prefill_attention", &prefill_attention,
        "causal attention of fresh prefills over their own keys, into out's rows of each span",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("spans"), pybind11::arg("scale"),
        pybind11::arg("out"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("panel_embedding", &panel_embedding, "rows of a tied embedding out of the packed lm_head (fp32, bf16, int8)",
        pybind11::arg("w"), pybind11::arg("ids"), pybind11::arg("k"), pybind11::arg("scale") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta, then RMSNorm",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2I] gate|up output",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rotary", &rotary, "rotary embedding, HF half-split layout",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("write_kv", &write_kv, "new keys and values into their cache slots (fp32 or bf16 cache)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("argmax_logsumexp", &argmax_logsumexp, "per row: first argmax, logsumexp, all finite",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("draw_rows", &draw_rows, "per row: the token at its uniform by the inverse CDF of softmax(x)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("panel_gemm_available", &panel_gemm_available, "whether panel_linear is compiled in (AVX-512 or AVX2)");
  m.def("set_row_prefetch", [](int mode) {
    TORCH_CHECK(mode >= 0 && mode <= 2, "row prefetch mode: 0 off, 1 T0, 2 T1");
    row_prefetch::g_mode = mode;
  }, "the one-row weight streams' prefetch hint (row_prefetch.h): 0 off, 1 T0, 2 T1");
  m.def("row_prefetch", [] { return row_prefetch::g_mode; }, "the one-row weight streams' prefetch hint");
  m.def("simd_bits", [] { return LORASERVE_SIMD; }, "vector width the kernels were compiled for: 512, 256 or 0");
  m.def("panel_linear", &panel_linear, "x @ W.T + b over 32-column weight panels", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("panel_lora_linear", &panel_lora_linear,
        "panel_linear plus every row's LoRA delta, the adapters streamed while the panels compute (decode sizes)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("n"), pybind11::arg("bias"), pybind11::arg("rows"),
        pybind11::arg("slots"), pybind11::arg("a"), pybind11::arg("bs"), pybind11::arg("slot_rank") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("panel_linear_lora_rows", &panel_linear_lora_rows,
        "panel_linear plus every row's LoRA delta, added on each work item while it is in cache (prefill sizes)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("n"), pybind11::arg("bias"), pybind11::arg("rows"),
        pybind11::arg("slots"), pybind11::arg("a"), pybind11::arg("bs"), pybind11::arg("slot_rank") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
