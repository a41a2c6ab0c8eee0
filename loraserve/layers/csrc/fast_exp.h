// A vectorisable exp for x <= 0 (softmax after subtracting the max, SiLU of |x|), shared by
// the native CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// exp for softmax inputs (x <= 0 after subtracting the max), written so the compiler can
// vectorize the loop around it: std::exp is a scalar libm call, and 30 layers x heads x
// context of them dominated a decode step. Cephes' expf: x = n ln2 + r, 2^n from the
// exponent bits, e^r from a degree-6 polynomial; relative error under 2e-7.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // below this exp underflows float32 anyway
  const float n = std::floor(x * 1.44269504f + 0.5f);
  float r = x - n * 0.693359375f;  // Cody-Waite: ln 2 in two parts keeps r exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;  // Cephes expf on [-ln2/2, ln2/2]
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
