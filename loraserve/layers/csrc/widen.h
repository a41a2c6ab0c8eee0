// bf16 values read as fp32: the slot tables of the LoRA kernel and the KV cache of the decode
// attention kernel may hold bf16, widened to fp32 in registers as they stream (a 16-bit shift,
// exact), so a bf16 tensor costs half the bytes of an fp32 one and every sum stays fp32.
// `wload` is overloaded on the element type, so a kernel templated on float / bf16_t reads both.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace widen {

using bf16_t = uint16_t;  // bf16 bits (at::BFloat16's storage)

inline float to_f(float v) { return v; }
// fp32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN): what PyTorch's .to(bfloat16) does
inline bf16_t to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<bf16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
inline float to_f(bf16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if LORASERVE_SIMD
// W values from p as fp32 (masked: the lanes of m, the rest 0)
inline simd::V wload(const float* p) { return simd::load(p); }
inline simd::V wload(const float* p, simd::M m) { return simd::load(p, m); }
#if LORASERVE_SIMD == 512
inline simd::V widen(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
inline simd::V wload(const bf16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
inline simd::V wload(const bf16_t* p, simd::M m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
#else
inline simd::V wload(const bf16_t* p, simd::M m) {
  alignas(32) bf16_t tmp[16] = {};
  for (int i = 0; i < 16; ++i)
    if ((m >> i) & 1) tmp[i] = p[i];
  return widen(_mm256_load_si256(reinterpret_cast<const __m256i*>(tmp)));
}
#endif
#else
inline simd::V widen(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }
inline simd::V wload(const bf16_t* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline simd::V wload(const bf16_t* p, simd::M m) {  // AVX2 has no 16-bit masked load: copy the lanes
  alignas(16) bf16_t tmp[8] = {};
  const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(m));
  for (int i = 0; i < 8; ++i)
    if ((bits >> i) & 1) tmp[i] = p[i];
  return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}
#endif
#endif

#if LORASERVE_SIMD == 512
// k-pairs [pair0, pair0 + npairs) of an int8 weight panel [K, 32] as bf16 pairs [npairs, 32, 2]
// (the bf16 panel layout: each 32-bit lane holds one column's even k low, odd k high), zero past K.
// Exact: the fp32 of an integer in -127..127 has 16 zero low bits, so its high half is its bf16.
// Lets int8 panels feed bf16 dot products (AMX tiles, vdpbf16ps), a column's scale applied after.
inline void int8_pairs_bf16(const int8_t* w, int64_t K, int64_t pair0, int64_t npairs, uint16_t* out) {
  for (int64_t i = 0; i < npairs; ++i) {
    const int64_t k0 = 2 * (pair0 + i), k1 = k0 + 1;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512i e = k0 < K ? _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k0 * 32 + 16 * h)))))
                               : _mm512_setzero_si512();
      const __m512i o = k1 < K ? _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k1 * 32 + 16 * h)))))
                               : _mm512_setzero_si512();
      _mm512_storeu_si512(out + i * 64 + 32 * h, _mm512_or_si512(_mm512_srli_epi32(e, 16), o));
    }
  }
}
#endif

}  // namespace widen
