// RMSNorm (optionally fused with the residual add before it) for float32 CPU steps.
//
// Why a kernel: `F.rms_norm` on CPU runs as ~7 ATen ops (pow, mean, add, rsqrt, mul, ...),
// about 35 us per call at one row where the arithmetic is 576 floats; 61 calls per token
// made it ~7% of a batch-1 decode step. Fusing the residual add (`x += delta`, then
// normalise) also saves one pass over the hidden states per norm. Math as HF Llama:
// y = x / sqrt(mean(x^2) + eps) * w, accumulated in float32.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <cmath>

#include "over_rows.h"

// One row: xr += dr (when dr is given), then yr = rms_norm(xr) * w. Out of line so that the decode
// stack's threads (decode_stack_cpu.cpp), which each keep their own copy of the residual stream,
// run the very instructions norm_rows runs: the same sums in the same order.
__attribute__((noinline)) void norm_row(float* xr, const float* dr, const float* wp, int64_t H, float e, float* yr) {
  float ss = 0.f;
  if (dr) {
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) {
      xr[i] += dr[i];
      ss += xr[i] * xr[i];
    }
  } else {
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + e);
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) yr[i] = xr[i] * r * wp[i];
}

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(),
              name, " must be a contiguous CPU float32 [T, H] tensor");
}

at::Tensor norm_rows(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor* delta) {
  check_rows(x, "x");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == H, "weight must be [H] float32");
  if (delta) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->size(0) == T && delta->size(1) == H, "delta must match x");
  }
  auto y = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  const float* dp = delta ? delta->data_ptr<float>() : nullptr;
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) norm_row(xp + t * H, dp ? dp + t * H : nullptr, wp, H, e, yp + t * H);
  };
  over_rows(T, H, 65536, body);
  return y;
}

}  // namespace

// y = rms_norm(x) * w
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return norm_rows(x, w, eps, nullptr);
}

// x += delta (in place, the residual stream), then y = rms_norm(x) * w
at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps) {
  return norm_rows(x, w, eps, &delta);
}
