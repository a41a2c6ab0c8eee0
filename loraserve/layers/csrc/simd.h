// One vector type for the AVX-512 and the AVX2+FMA builds of the native CPU kernels.
//
// Why: the kernels were written against AVX-512 intrinsics, so an AVX2 machine (AMD Zen 2/3,
// Xeons before Skylake-SP: FMA, 16 registers of 8 floats, no mask registers) got their portable
// scalar/auto-vectorised paths. The loops that matter have the same shape at both widths, so they
// are written once against `simd::V` (W floats) and the build's -march picks the width: 16 with
// AVX-512, 8 with AVX2+FMA. LORASERVE_SIMD is 0 in a build with neither, where callers keep
// their portable loops.
#pragma once

#include <cstdint>

// on a function the kernels need inlined for their accumulators to stay in registers
#define LS_INLINE __attribute__((always_inline)) inline

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LORASERVE_SIMD 512
namespace simd {
constexpr int W = 16;
constexpr int kRegs = 32;  // vector registers
using V = __m512;
using M = __mmask16;  // lanes that exist (a row's tail)
inline M mask(int64_t n) {
  return n <= 0 ? 0 : n >= W ? static_cast<M>(0xFFFF) : static_cast<M>((1u << n) - 1);
}
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float v) { return _mm512_set1_ps(v); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }  // masked-off lanes: 0
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V max(V a, V b) { return _mm512_max_ps(a, b); }
inline V abs(V a) { return _mm512_abs_ps(a); }
inline V floor(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline V select_nonneg(V x, V if_nonneg, V otherwise) {  // per lane: x >= 0 ? if_nonneg : otherwise
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero(), _CMP_GE_OQ), otherwise, if_nonneg);
}
inline V pow2i(V n) {  // 2^n for integral n in [-127, 127], from the exponent bits
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_castsi512_ps(e);
}
inline float sum(V v) { return _mm512_reduce_add_ps(v); }
}  // namespace simd

#elif defined(__AVX2__) && defined(__FMA__)
#define LORASERVE_SIMD 256
namespace simd {
constexpr int W = 8;
constexpr int kRegs = 16;
using V = __m256;
using M = __m256i;  // AVX2 has no mask registers: all-ones lanes in a vector
inline M mask(int64_t n) {
  const int c = n <= 0 ? 0 : n >= W ? W : static_cast<int>(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float v) { return _mm256_set1_ps(v); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const float* p, M m) { return _mm256_maskload_ps(p, m); }  // masked-off lanes: 0, never read
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void store(float* p, V v, M m) { _mm256_maskstore_ps(p, m, v); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V max(V a, V b) { return _mm256_max_ps(a, b); }
inline V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline V floor(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline V select_nonneg(V x, V if_nonneg, V otherwise) {
  return _mm256_blendv_ps(otherwise, if_nonneg, _mm256_cmp_ps(x, zero(), _CMP_GE_OQ));
}
inline V pow2i(V n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_castsi256_ps(e);
}
inline float sum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
}  // namespace simd

#else
#define LORASERVE_SIMD 0
#endif

#if LORASERVE_SIMD
namespace simd {
// exp_nonpositive (fast_exp.h) on W lanes: the same Cephes steps, so both agree to the last bit
// but for the fused multiply-adds.
inline V exp_nonpositive(V x) {
  x = max(x, set1(-87.f));
  const V n = floor(fma(x, set1(1.44269504f), set1(0.5f)));
  V r = sub(x, mul(n, set1(0.693359375f)));
  r = sub(r, mul(n, set1(-2.12194440e-4f)));
  V p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  p = add(fma(mul(p, r), r, r), set1(1.f));
  return mul(p, pow2i(n));
}
}  // namespace simd
#endif
