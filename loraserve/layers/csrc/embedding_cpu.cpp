// Rows of a tied input embedding read out of the packed lm_head: column c of panel p is
// vocabulary row 32p + c, one value per k-step 32 columns apart (fp32 [P, K, 32], int8 [P, K, 32]
// with its column scales, bf16 [P, ceil(K/2), 32, 2]).
//
// Why a kernel: PyTorch's gather of those strided values (index arithmetic, advanced indexing,
// the int8 scale) cost 66-70 us a decode step on the 135M model, cold in cache after the step
// before streamed the weights; a plain loop whose lines are prefetched a few k-steps ahead
// keeps many misses in flight and returns the same values (exact widening; int8 q * scale in
// fp32, one rounding, as `panel_rows_lowp` does).
#include "aten_min.h"

#include <cstdint>
#include <optional>

#include "over_rows.h"
#include "widen.h"

namespace {

constexpr int64_t kNR = 32;      // columns per panel
constexpr int64_t kAhead = 16;   // k-steps prefetched ahead of the one read

void gather_row(const float* panel, int64_t K, int64_t c, float* out) {
  for (int64_t k = 0; k < K; ++k) {
    if (k + kAhead < K) __builtin_prefetch(panel + (k + kAhead) * kNR + c);
    out[k] = panel[k * kNR + c];
  }
}

void gather_row_int8(const int8_t* panel, int64_t K, int64_t c, float scale, float* out) {
  for (int64_t k = 0; k < K; ++k) {
    if (k + kAhead < K) __builtin_prefetch(panel + (k + kAhead) * kNR + c);
    out[k] = static_cast<float>(panel[k * kNR + c]) * scale;
  }
}

}  // namespace

// w: fp32 or int8 [P, K, 32] or bf16 [P, ceil(K/2), 32, 2]; ids [T] int64 in [0, P * 32);
// scale [P * 32] for int8 (none otherwise); k: K (bf16 panels pad odd K). Returns [T, K] fp32.
at::Tensor panel_embedding(const at::Tensor& w, const at::Tensor& ids, int64_t k,
                           const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), "w must be a contiguous CPU panel tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), "ids must be int64 [T]");
  const auto dt = w.scalar_type();
  const bool bf16 = dt == at::kBFloat16, int8 = dt == at::kChar;
  TORCH_CHECK(dt == at::kFloat || bf16 || int8, "w must be float32, bfloat16 or int8 panels");
  const int64_t P = w.size(0);
  if (bf16) {
    TORCH_CHECK(w.dim() == 4 && w.size(1) == (k + 1) / 2 && w.size(2) == kNR && w.size(3) == 2,
                "bf16 panels must be [P, ceil(K/2), 32, 2]");
  } else {
    TORCH_CHECK(w.dim() == 3 && w.size(1) == k && w.size(2) == kNR, "panels must be [P, K, 32]");
  }
  TORCH_CHECK(int8 == scale.has_value(), "int8 panels take their scale, other panels none");
  if (int8) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == P * kNR,
                "scale must be a contiguous float32 [P * 32]");
  }
  const int64_t T = ids.size(0);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ip[t] >= 0 && ip[t] < P * kNR, "token id out of range");
  auto out = at::empty({T, k}, w.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const int64_t panel = bf16 ? (k + 1) / 2 * kNR * 2 : k * kNR;  // elements per panel
  over_rows(T, k, 1 << 14, [&](int64_t r0, int64_t r1) {
    for (int64_t t = r0; t < r1; ++t) {
      const int64_t p = ip[t] / kNR, c = ip[t] % kNR;
      float* o = op + t * k;
      if (int8) {
        gather_row_int8(static_cast<const int8_t*>(w.data_ptr()) + p * panel, k, c, scale->data_ptr<float>()[ip[t]],
                        o);
      } else if (bf16) {  // k-pairs side by side: value (k, c) at (k / 2) * 64 + 2c + (k & 1)
        const widen::bf16_t* b = static_cast<const widen::bf16_t*>(w.data_ptr()) + p * panel + 2 * c;
        const int64_t pairs = (k + 1) / 2;
        for (int64_t j = 0; j < pairs; ++j) {
          if (j + kAhead < pairs) __builtin_prefetch(b + (j + kAhead) * 2 * kNR);
          o[2 * j] = widen::to_f(b[j * 2 * kNR]);
          if (2 * j + 1 < k) o[2 * j + 1] = widen::to_f(b[j * 2 * kNR + 1]);
        }
      } else {
        gather_row(static_cast<const float*>(w.data_ptr()) + p * panel, k, c, o);
      }
    }
  });
  return out;
}
