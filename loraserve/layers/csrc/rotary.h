// HF's half-split rotary embedding of one head: the one loop that rotary() (activation_cpu.cpp)
// and rope_decode_attention() (attention_entry_cpu.cpp) both run, so the two give the same values.
#pragma once

#include <cstdint>

// x, o: one head of 2 * half floats; c, s: cos/sin of its position [half].
// o[:half] = x1 * c - x2 * s, o[half:] = x2 * c + x1 * s, with x1 = x[:half], x2 = x[half:].
inline void rotate_head(const float* x, const float* c, const float* s, float* o, int64_t half) {
  const float* x2 = x + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    o[i] = x[i] * c[i] - x2[i] * s[i];
    o[half + i] = x2[i] * c[i] + x[i] * s[i];
  }
}
