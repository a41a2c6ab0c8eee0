// Elementwise steps of a decoder layer that PyTorch runs as several ops each: SwiGLU's
// silu(gate) * up (slice, slice, silu, mul) and rotary embedding of the fused q|k heads
// (two slices, four muls, a sub, an add and a cat). At one row per step each op costs
// more to dispatch than to compute, so each becomes one call, one pass over the data. SiLU is
// written with simd.h (AVX-512 or AVX2 by the build); rotary's loop vectorises as it stands.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "fast_exp.h"
#include "over_rows.h"
#include "rotary.h"
#include "simd.h"

// o[0, n) = silu(g) * u. Out of line so that the decode stack's threads (decode_stack_cpu.cpp),
// which each take a range of columns, run the very instructions silu_mul runs; a range that
// starts on a multiple of the vector width gives every column the path the whole row gives it.
__attribute__((noinline)) void silu_mul_cols(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
#if LORASERVE_SIMD  // the scalar loop below does not vectorise (its select and exp bit tricks)
  for (; i + simd::W <= n; i += simd::W) {
    const simd::V x = simd::load(g + i);
    const simd::V e = simd::exp_nonpositive(simd::sub(simd::zero(), simd::abs(x)));
    const simd::V num = simd::select_nonneg(x, x, simd::mul(x, e));
    simd::store(o + i, simd::mul(simd::div(num, simd::add(simd::set1(1.f), e)), simd::load(u + i)));
  }
#endif
  for (; i < n; ++i) {  // silu(x) = x / (1 + e^-x), from e = e^-|x| <= 1
    const float x = g[i], e = exp_nonpositive(-std::fabs(x));
    o[i] = (x >= 0.f ? x : x * e) / (1.f + e) * u[i];
  }
}

// gu: [T, 2*I] (gate | up, rows contiguous) -> [T, I] = silu(gate) * up
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.device().is_cpu() && gu.scalar_type() == at::kFloat && gu.dim() == 2 && gu.stride(1) == 1 &&
                  gu.size(1) % 2 == 0,
              "gu must be a CPU float32 [T, 2*I] tensor with contiguous rows");
  const int64_t T = gu.size(0), I = gu.size(1) / 2, ld = gu.stride(0);
  auto out = at::empty({T, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  over_rows(T, I, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      silu_mul_cols(gp + t * ld, gp + t * ld + I, op + t * I, I);
    }
  });
  return out;
}

// x: [T, H, D] (heads contiguous, rows may be strided), cos/sin: [T, D/2]; HF's half-split
// layout: out[..., :D/2] = x1*cos - x2*sin, out[..., D/2:] = x2*cos + x1*sin
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1 &&
                  x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "x must be a CPU float32 [T, H, D] tensor with contiguous heads");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == T * half && sin.numel() == T * half,
              "cos/sin must be contiguous float32 [T, D/2]");
  auto out = at::empty({T, H, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ld = x.stride(0);
  over_rows(T, H * D, 65536, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * half;
      const float* s = sp + t * half;
      for (int64_t h = 0; h < H; ++h) rotate_head(xp + t * ld + h * D, c, s, op + (t * H + h) * D, half);
    }
  });
  return out;
}
