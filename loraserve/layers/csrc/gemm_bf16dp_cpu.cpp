// bf16 weight panels, or int8 ones converted to bf16 pairs (exact), times many activation rows on
// CPUs with AVX512_BF16 but no AMX (AMD Zen 4 and later, Cooper Lake): vdpbf16ps multiplies 16
// columns x one k-pair per instruction, twice the multiply-adds of an fp32 FMA and with no
// conversion of bf16 weights, which the bf16 panel layout already holds as pairs
// (layers/quantized_linear.py). The activations are rounded to bf16 first (round to nearest even,
// as the AMX path, oneDNN and transformers' bf16 matmuls do), so the path takes over from the same
// row count as AMX does (kAmxMinRows): below it, the FMA kernels (lowp_kernels.h) keep fp32
// activations. int8 panels come here only when serving bf16 activations (`--dtype bfloat16
// --quantize int8`): each panel is converted once per chunk of rows into an L2 copy, and a
// column's scale multiplies its fp32 sum at the end.
//
// Why: on a 2-core Zen 5 EPYC the fp32-scratch path (each panel converted to fp32 once per chunk of
// rows, then FMAs) was compute-bound: 32 decode rows of the 135M model took 77 ms of projections
// per step, against 60 ms for int8 and ~38 ms for the FMA peak.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "over_rows.h"
#include "simd.h"
#include "widen.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LORASERVE_BF16DP 1
#endif

#if defined(LORASERVE_BF16DP)
namespace {

constexpr int64_t kNR = 32;  // columns per panel: two registers of 16
constexpr int64_t kMC = 96;  // rows per work item: their bf16 copy and the panel stay in L2
constexpr int kMR = 12;      // rows of a register block: 24 accumulators, 2 weights, 1 broadcast

// rows [0, rows) of x as bf16 pairs (even k in the low half), ld uint16 per row, zero past K
void to_pairs(const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t K, int64_t ld, uint16_t* out) {
  for (int64_t m = r0; m < r1; ++m) {
    const float* xr = x + m * ldx;
    uint16_t* o = out + m * ld;
    for (int64_t k = 0; k < ld; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(simd::mask(K - k), xr + k);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

template <int MR>
void dp_block(const uint32_t* __restrict__ xp, int64_t ldp, const uint16_t* __restrict__ w, int64_t pairs,
              float* __restrict__ y, int64_t ldy, const float* scale, const float* bias, int64_t cols) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < pairs; ++kk) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + kk * 2 * kNR);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + kk * 2 * kNR + kNR);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[m * ldp + kk]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      const simd::M mk = simd::mask(cols - 16 * j);
      if (!mk) continue;
      __m512 v = acc[m][j];
      if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, scale + 16 * j));
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + 16 * j));
      _mm512_mask_storeu_ps(y + m * ldy + 16 * j, mk, v);
    }
}

template <int MR>
void dp_rows(int mr, const uint32_t* xp, int64_t ldp, const uint16_t* w, int64_t pairs, float* y, int64_t ldy,
             const float* scale, const float* bias, int64_t cols) {
  if constexpr (MR > 1) {
    if (mr < MR) return dp_rows<MR - 1>(mr, xp, ldp, w, pairs, y, ldy, scale, bias, cols);
  }
  dp_block<MR>(xp, ldp, w, pairs, y, ldy, scale, bias, cols);
}

}  // namespace

bool bf16dp_available() { return true; }

// y [M, n] = x [M, K] @ W.T (* scale) (+ bias), x rounded to bf16, over bf16 panels
// [P, ceil(K/2), 32, 2] (scale null) or int8 panels [P, K, 32] with scale [P * 32]
void bf16dp_linear(const float* x, int64_t ldx, int64_t M, int64_t K, const char* w, int64_t panel_bytes, int64_t P,
                   int64_t n, const float* scale, const float* bias, float* y) {
  const int64_t pairs = (K + 1) / 2;
  const int64_t ld = (2 * pairs + 15) / 16 * 16;  // uint16 per row of the bf16 copy
  std::vector<uint16_t> xb(static_cast<size_t>(M * ld));
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) { to_pairs(x, ldx, r0, r1, K, ld, xb.data()); });
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xb.data());
  const int64_t ldp = ld / 2;
  const int64_t chunks = (M + kMC - 1) / kMC;
  const bool major = grid_chunk_major(P * panel_bytes);
  // one work item: a chunk of rows x one panel (over_rows.h: which order); panel-major, a thread's
  // consecutive items share (and convert once) a panel
  at::parallel_for(0, P * chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint16_t> conv;  // an int8 panel as bf16 pairs
    int64_t converted = -1;
    for (int64_t it = lo; it < hi; ++it) {
      const auto [p, c] = grid_item(it, P, chunks, major);
      const int64_t r0 = M * c / chunks, rows = M * (c + 1) / chunks - r0;
      const uint16_t* wp = reinterpret_cast<const uint16_t*>(w + p * panel_bytes);
      if (scale) {
        conv.resize(static_cast<size_t>(pairs * 2 * kNR));
        if (converted != p) widen::int8_pairs_bf16(reinterpret_cast<const int8_t*>(wp), K, 0, pairs, conv.data());
        converted = p;
        wp = conv.data();
      }
      const int64_t cols = std::min(kNR, n - p * kNR);
      const float* sp = scale ? scale + p * kNR : nullptr;
      const float* bp = bias ? bias + p * kNR : nullptr;
      over_blocks(rows, kMR, [&](int64_t r, int mr) {
        dp_rows<kMR>(mr, xp + (r0 + r) * ldp, ldp, wp, pairs, y + (r0 + r) * n + p * kNR, n, sp, bp, cols);
      });
    }
  });
}
#else
bool bf16dp_available() { return false; }
void bf16dp_linear(const float*, int64_t, int64_t, int64_t, const char*, int64_t, int64_t, int64_t, const float*,
                   const float*, float*) {
  TORCH_CHECK(false, "bf16dp_linear: this build has no AVX512_BF16");
}
#endif
