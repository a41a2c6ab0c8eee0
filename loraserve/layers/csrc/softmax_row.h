// One softmax row's two passes (the max, then exp(x - max) and its sum), vectorised: shared by
// the decode attention (attention_cpu.cpp) and the prefill attention (prefill_attention_cpu.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "fast_exp.h"
#include "simd.h"

inline float max_of(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
#if LORASERVE_SIMD
  if (n >= simd::W) {
    simd::V mv = simd::load(s);
    for (t = simd::W; t + simd::W <= n; t += simd::W) mv = simd::max(mv, simd::load(s + t));
    alignas(64) float lanes[simd::W];
    simd::store(lanes, mv);
    for (float v : lanes) m = std::max(m, v);
  }
#endif
  for (; t < n; ++t) m = std::max(m, s[t]);
  return m;
}

// s[t] = exp(s[t] - m), returns their sum
inline float exp_shifted(float* s, int64_t n, float m) {
  float sum = 0.f;
  int64_t t = 0;
#if LORASERVE_SIMD
  simd::V acc = simd::zero();
  const simd::V mv = simd::set1(m);
  for (; t + simd::W <= n; t += simd::W) {
    const simd::V e = simd::exp_nonpositive(simd::sub(simd::load(s + t), mv));
    simd::store(s + t, e);
    acc = simd::add(acc, e);
  }
  sum = simd::sum(acc);
#endif
  for (; t < n; ++t) {
    s[t] = exp_nonpositive(s[t] - m);
    sum += s[t];
  }
  return sum;
}
