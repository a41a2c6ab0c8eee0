// What the low-precision panel kernels share: a panel's description and the store of a finished
// register of sums (scale, bias, partial last panel). lowp_kernels.h (FMA kernels) and
// gemm_amx_cpu.cpp (AMX tiles), both run by gemm_lowp_cpu.cpp, store the same panels the same way,
// so a projection's output cannot depend on which of them ran beyond the products' own rounding.
#pragma once

#include <cstdint>

#include "simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__)
#define LORASERVE_AMX 1
#endif

namespace lowp {

constexpr int64_t kNR = 32;  // columns per panel (as the fp32 panels of gemm_cpu.cpp)

// the kernel lowp_panel_linear runs for a product (gemm_lowp_cpu.cpp lowp_path): AMX tiles, bf16
// or int8 dot products over all panels at once, or the FMA kernels panel by panel (lowp_kernels.h)
enum class LowpPath { amx, bf16dp, int8dp, panels };

struct Panel {
  const void* w;       // this panel
  int64_t k;           // K
  const float* scale;  // int8: this panel's 32 scales; bf16: null
  const float* bias;   // this panel's 32 bias entries, or null
  int64_t cols;        // columns that exist (the last panel may be partial)
  // the panel this thread computes next, fetched into L2 while this one computes (null: none);
  // see lowp_kernels.h prefetch_next
  const char* next = nullptr;
  int64_t next_bytes = 0;
};

#if LORASERVE_SIMD
// y[0, valid) = v (* scale) (+ bias), valid <= simd::W lanes of one register
LS_INLINE void put(float* y, simd::V v, const float* scale, const float* bias, int64_t valid) {
  if (valid >= simd::W) {
    if (scale) v = simd::mul(v, simd::load(scale));
    if (bias) v = simd::add(v, simd::load(bias));
    simd::store(y, v);
  } else if (valid > 0) {
    const simd::M m = simd::mask(valid);
    if (scale) v = simd::mul(v, simd::load(scale, m));
    if (bias) v = simd::add(v, simd::load(bias, m));
    simd::store(y, v, m);
  }
}

// the register of a panel row holding columns [c, c + simd::W)
LS_INLINE void put_reg(float* y, const Panel& t, int64_t c, simd::V v) {
  put(y + c, v, t.scale ? t.scale + c : nullptr, t.bias ? t.bias + c : nullptr, t.cols - c);
}
#endif

#if defined(LORASERVE_AMX)
// From this many rows on, panels go through AMX (gemm_amx_cpu.cpp); below, the FMA kernels are
// memory-bound. bf16: the activations are rounded to bf16 from here. int8: from here the panel's
// conversion to bf16 (overlapped with the tile multiplies) costs less than the in-register
// kernel's FMAs (gate_up: 118 us at 4 rows, 210 at 8 by FMA; ~165 by AMX).
constexpr int64_t kAmxMinRows = 8;
constexpr int64_t kAmxMinRowsInt8 = 6;

// whether this thread may use AMX (Linux hands out the tile state only on request)
bool amx_enabled();

// lowp_panel_linear's product by tile multiplies. bf16_act: the activations as one bf16 part
// (always for bf16 panels); else int8 panels keep (nearly) fp32 activations as two parts.
void amx_linear(bool bf16, bool bf16_act, const float* xp, int64_t ldx, int64_t M, int64_t K, const char* wp,
                int64_t panel_bytes, int64_t P, int64_t n, const float* sp, const float* bp, float* yp);
#endif

}  // namespace lowp
