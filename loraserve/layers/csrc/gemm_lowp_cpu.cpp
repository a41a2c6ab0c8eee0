// Dense projections y = x @ W.T (* scale) + b over low-precision weight panels: bf16, or int8
// with one fp32 scale per output column, dequantised in registers; x, y and every sum are fp32.
//
// Why in registers and not oneDNN: a decode step reads every weight once for a few rows, so the
// bytes of the weights are the time. Converting a bf16 or int8 panel to fp32 costs one or two
// register operations per 16 values loaded, far below the load's own cost, so the GEMM reads half
// (bf16) or a quarter (int8) of the fp32 bytes at the same instruction budget per column, with
// fp32 activations and fp32 accumulation (no rounding of the activations at all). Measured on
// the 135M shape (bench/lowp.py, bench/results/lowp-*.txt) against oneDNN's bf16 GEMM through
// torch, which rounds the activations to bf16 and runs vdpbf16ps: see loraserve/layers/quantized_linear.py.
//
// Layouts (packed by loraserve/layers/quantized_linear.py), P = ceil(N / 32) panels, zero-padded:
// - bf16: [P, ceil(K / 2), 32, 2]: for each pair of k-steps the 32 columns' two values side by
//   side, so one 32-bit lane holds (k even, k odd) of one column: `v << 16` is the even k in
//   fp32, `v & 0xffff0000` the odd one (vdpbf16ps' own operand layout, should it be used).
// - int8: [P, K, 32] plus scale [P * 32] (fp32): a column's sum is scaled once, at the end.
//
// AVX-512 (16 columns a register, 12 rows a block), AVX2 (8 columns, 3 rows) and a scalar loop,
// chosen at compile time (-march, LORASERVE_NATIVE_MARCH). Where the compiler targets AMX and the
// kernel grants it, bf16 panels with 8 or more rows (prompt processing, big batches) run AMX
// tile multiplies instead, with the activations rounded to bf16: compute-bound there, the FMA
// kernel would be several times slower than oneDNN's AMX GEMM.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define LORASERVE_AMX 1
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

namespace {

constexpr int64_t kNR = 32;  // columns per panel (as the fp32 panels of gemm_cpu.cpp)
constexpr int64_t kMC = 96;  // most rows per work item: they stay in L2 while panels pass by

struct Panel {
  const void* w;       // this panel
  int64_t k;           // K
  const float* scale;  // int8: this panel's 32 scales; bf16: null
  const float* bias;   // this panel's 32 bias entries, or null
  int64_t cols;        // columns that exist (the last panel may be partial)
};

inline void finish(float* y, const Panel& t, const float* acc) {
  for (int64_t c = 0; c < t.cols; ++c) {
    float v = acc[c];
    if (t.scale) v *= t.scale[c];
    if (t.bias) v += t.bias[c];
    y[c] = v;
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
constexpr int kL = 16;  // fp32 lanes
constexpr int kMR = 12; // rows per block: 2 x 12 accumulators + weights + broadcasts fit 32 registers
using VF = __m512;
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vset1(float v) { return _mm512_set1_ps(v); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline void bf16_pair(const uint16_t* p, VF& even, VF& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline VF int8_cols(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
constexpr int kL = 8;
constexpr int kMR = 3;  // 4 x 3 accumulators + 2 weights + broadcasts fit 16 registers
using VF = __m256;
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vset1(float v) { return _mm256_set1_ps(v); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline void bf16_pair(const uint16_t* p, VF& even, VF& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline VF int8_cols(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif
constexpr int kJ = kNR / kL;  // registers per panel row

inline void store_rows(int mr, float* y, int64_t ldy, const Panel& t, VF (*acc)[kJ]) {
  alignas(64) float buf[kNR];
  for (int m = 0; m < mr; ++m) {
    for (int j = 0; j < kJ; ++j) vstore(buf + j * kL, acc[m][j]);
    finish(y + m * ldy, t, buf);
  }
}

// MR rows x one bf16 panel: each pair of k-steps loads the panel's 32 columns once for all rows.
template <int MR>
void bf16_block(const float* __restrict__ x, int64_t ldx, const Panel& t, float* __restrict__ y, int64_t ldy) {
  VF acc[MR][kJ];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kJ; ++j) acc[m][j] = vzero();
  const uint16_t* __restrict__ w = static_cast<const uint16_t*>(t.w);
  const int64_t full = t.k / 2;
  for (int64_t kk = 0; kk < full; ++kk) {
    for (int j = 0; j < kJ; ++j) {
      VF e, o;
      bf16_pair(w + kk * 2 * kNR + j * 2 * kL, e, o);
      for (int m = 0; m < MR; ++m) {
        acc[m][j] = vfma(vset1(x[m * ldx + 2 * kk]), e, acc[m][j]);
        acc[m][j] = vfma(vset1(x[m * ldx + 2 * kk + 1]), o, acc[m][j]);
      }
    }
  }
  if (t.k & 1) {  // odd K: the last pair's odd half is padding (x has no such column)
    for (int j = 0; j < kJ; ++j) {
      VF e, o;
      bf16_pair(w + full * 2 * kNR + j * 2 * kL, e, o);
      for (int m = 0; m < MR; ++m) acc[m][j] = vfma(vset1(x[m * ldx + 2 * full]), e, acc[m][j]);
    }
  }
  store_rows(MR, y, ldy, t, acc);
}

// One row: even and odd k-steps in separate accumulators, two pairs in flight, so four FMA
// chains per register keep the loads streaming instead of waiting on FMA latency.
void bf16_row(const float* __restrict__ x, const Panel& t, float* __restrict__ y) {
  VF acc[4][kJ];
  for (int u = 0; u < 4; ++u)
    for (int j = 0; j < kJ; ++j) acc[u][j] = vzero();
  const uint16_t* __restrict__ w = static_cast<const uint16_t*>(t.w);
  const int64_t full = t.k / 2;
  int64_t kk = 0;
  for (; kk + 2 <= full; kk += 2) {
    for (int h = 0; h < 2; ++h) {
      const VF xe = vset1(x[2 * (kk + h)]), xo = vset1(x[2 * (kk + h) + 1]);
      for (int j = 0; j < kJ; ++j) {
        VF e, o;
        bf16_pair(w + (kk + h) * 2 * kNR + j * 2 * kL, e, o);
        acc[2 * h][j] = vfma(xe, e, acc[2 * h][j]);
        acc[2 * h + 1][j] = vfma(xo, o, acc[2 * h + 1][j]);
      }
    }
  }
  for (; kk < full; ++kk) {
    const VF xe = vset1(x[2 * kk]), xo = vset1(x[2 * kk + 1]);
    for (int j = 0; j < kJ; ++j) {
      VF e, o;
      bf16_pair(w + kk * 2 * kNR + j * 2 * kL, e, o);
      acc[0][j] = vfma(xe, e, acc[0][j]);
      acc[1][j] = vfma(xo, o, acc[1][j]);
    }
  }
  if (t.k & 1) {
    const VF xe = vset1(x[2 * full]);
    for (int j = 0; j < kJ; ++j) {
      VF e, o;
      bf16_pair(w + full * 2 * kNR + j * 2 * kL, e, o);
      acc[0][j] = vfma(xe, e, acc[0][j]);
    }
  }
  VF sum[1][kJ];
  for (int j = 0; j < kJ; ++j) sum[0][j] = vadd(vadd(acc[0][j], acc[1][j]), vadd(acc[2][j], acc[3][j]));
  store_rows(1, y, 0, t, sum);
}

// MR rows x one int8 panel; the column scales are applied once, when the sums are stored.
template <int MR>
void int8_block(const float* __restrict__ x, int64_t ldx, const Panel& t, float* __restrict__ y, int64_t ldy) {
  VF acc[MR][kJ];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kJ; ++j) acc[m][j] = vzero();
  const int8_t* __restrict__ w = static_cast<const int8_t*>(t.w);
  for (int64_t k = 0; k < t.k; ++k) {
    for (int j = 0; j < kJ; ++j) {
      const VF wv = int8_cols(w + k * kNR + j * kL);
      for (int m = 0; m < MR; ++m) acc[m][j] = vfma(vset1(x[m * ldx + k]), wv, acc[m][j]);
    }
  }
  store_rows(MR, y, ldy, t, acc);
}

void int8_row(const float* __restrict__ x, const Panel& t, float* __restrict__ y) {
  VF acc[4][kJ];
  for (int u = 0; u < 4; ++u)
    for (int j = 0; j < kJ; ++j) acc[u][j] = vzero();
  const int8_t* __restrict__ w = static_cast<const int8_t*>(t.w);
  int64_t k = 0;
  for (; k + 4 <= t.k; k += 4) {
    for (int u = 0; u < 4; ++u) {
      const VF xv = vset1(x[k + u]);
      for (int j = 0; j < kJ; ++j) acc[u][j] = vfma(xv, int8_cols(w + (k + u) * kNR + j * kL), acc[u][j]);
    }
  }
  for (; k < t.k; ++k) {
    const VF xv = vset1(x[k]);
    for (int j = 0; j < kJ; ++j) acc[0][j] = vfma(xv, int8_cols(w + k * kNR + j * kL), acc[0][j]);
  }
  VF sum[1][kJ];
  for (int j = 0; j < kJ; ++j) sum[0][j] = vadd(vadd(acc[0][j], acc[1][j]), vadd(acc[2][j], acc[3][j]));
  store_rows(1, y, 0, t, sum);
}

template <bool BF16, int MR>
void rows_block(int mr, const float* x, int64_t ldx, const Panel& t, float* y, int64_t ldy) {
  if constexpr (MR > 1) {
    if (mr < MR) return rows_block<BF16, MR - 1>(mr, x, ldx, t, y, ldy);
    if constexpr (BF16) bf16_block<MR>(x, ldx, t, y, ldy);
    else int8_block<MR>(x, ldx, t, y, ldy);
  } else {
    if constexpr (BF16) bf16_row(x, t, y);
    else int8_row(x, t, y);
  }
}

template <bool BF16>
void panel_rows(int64_t rows, const float* x, int64_t ldx, const Panel& t, float* y, int64_t ldy) {
  // rows spread evenly over register blocks (7 rows on AVX2: 3 + 2 + 2, not 3 + 3 + 1)
  const int64_t nb = (rows + kMR - 1) / kMR;
  for (int64_t b = 0, r = 0; b < nb; ++b) {
    const int mr = static_cast<int>((rows * (b + 1)) / nb - (rows * b) / nb);
    rows_block<BF16, kMR>(mr, x + r * ldx, ldx, t, y + r * ldy, ldy);
    r += mr;
  }
}
#else
// Portable build: one column at a time, the same sums in the same fp32 arithmetic.
inline float bf16_at(const uint16_t* w, int64_t k, int64_t c) {
  const uint32_t bits = static_cast<uint32_t>(w[(k / 2) * 2 * kNR + c * 2 + (k & 1)]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <bool BF16>
void panel_rows(int64_t rows, const float* x, int64_t ldx, const Panel& t, float* y, int64_t ldy) {
  float acc[kNR];
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t c = 0; c < t.cols; ++c) {
      float s = 0.f;
      for (int64_t k = 0; k < t.k; ++k) {
        const float wv = BF16 ? bf16_at(static_cast<const uint16_t*>(t.w), k, c)
                              : static_cast<float>(static_cast<const int8_t*>(t.w)[k * kNR + c]);
        s += x[m * ldx + k] * wv;
      }
      acc[c] = s;
    }
    finish(y + m * ldy, t, acc);
  }
}
#endif

#if defined(LORASERVE_AMX)
// AMX (tdpbf16ps) for bf16 panels at prefill sizes: 16 rows x 32 columns per pair of tile
// multiplies, 16 k-pairs deep. The bf16 panel layout is already AMX's B operand (rows of k-pairs,
// each column's pair side by side): a B tile is 16 k-pairs x 16 columns, read with a 128-byte
// stride out of the 32-column panel. The activations are rounded to bf16 for it (as oneDNN does).
constexpr int64_t kAmxRows = 16;  // rows of an A / C tile
constexpr int64_t kAmxPairs = 16;  // k-pairs of a tile (64 bytes of bf16 per row)
// from this many rows on, bf16 panels go through AMX (below, the FMA kernels are memory-bound
// anyway and keep the activations in fp32)
constexpr int64_t kAmxMinRows = 8;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_enabled() {
  // Linux hands out AMX's tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// tiles 0/1: C (two 16-column halves), 2: A, 3/4: B halves; 5/6/7: A and B for the last,
// partial, group of k-pairs
TileConfig tile_config(int64_t rem_pairs) {
  TileConfig c;
  for (int t = 0; t < 5; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  if (rem_pairs) {
    c.rows[5] = 16;
    c.colsb[5] = static_cast<uint16_t>(4 * rem_pairs);
    c.rows[6] = c.rows[7] = static_cast<uint8_t>(rem_pairs);
    c.colsb[6] = c.colsb[7] = 64;
  }
  return c;
}

// 16 rows (xb: bf16, row stride ldb elements, zero-padded) x one panel -> y rows [0, rows)
void amx_block(const uint16_t* xb, int64_t ldb, const Panel& t, int64_t rows, float* y, int64_t ldy) {
  const uint16_t* w = static_cast<const uint16_t*>(t.w);
  const int64_t pairs = (t.k + 1) / 2, full = pairs / kAmxPairs, rem = pairs % kAmxPairs;
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t g = 0; g < full; ++g) {
    const int64_t kk = g * kAmxPairs;
    _tile_loadd(2, xb + 2 * kk, ldb * 2);
    _tile_loadd(3, w + kk * 2 * kNR, 2 * kNR * 2);
    _tile_loadd(4, w + kk * 2 * kNR + 32, 2 * kNR * 2);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  if (rem) {
    const int64_t kk = full * kAmxPairs;
    _tile_loadd(5, xb + 2 * kk, ldb * 2);
    _tile_loadd(6, w + kk * 2 * kNR, 2 * kNR * 2);
    _tile_loadd(7, w + kk * 2 * kNR + 32, 2 * kNR * 2);
    _tile_dpbf16ps(0, 5, 6);
    _tile_dpbf16ps(1, 5, 7);
  }
  alignas(64) float c[2][kAmxRows][16];
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  alignas(64) float row[kNR];
  for (int64_t m = 0; m < rows; ++m) {
    std::memcpy(row, c[0][m], sizeof(float) * 16);
    std::memcpy(row + 16, c[1][m], sizeof(float) * 16);
    finish(y + m * ldy, t, row);
  }
}
#endif

}  // namespace

std::string lowp_gemm_isa() {
#if defined(LORASERVE_AMX)
  return amx_enabled() ? "avx512+amx" : "avx512";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

// x [M, K] fp32 (contiguous rows, any row stride); w: bf16 [P, ceil(K/2), 32, 2] or int8 [P, K, 32]
// with scale [P * 32]; bias [n] -> y [M, n] fp32
torch::Tensor lowp_panel_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                                const std::optional<torch::Tensor>& scale,
                                const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [M, K] tensor with contiguous rows");
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  if (bf16) {
    TORCH_CHECK(w.dim() == 4 && w.size(1) == (K + 1) / 2 && w.size(2) == kNR && w.size(3) == 2,
                "a bf16 weight must be [P, ceil(K/2), 32, 2] panels for K = ", K);
    TORCH_CHECK(!scale, "bf16 panels take no scale");
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 3 && w.size(1) == K && w.size(2) == kNR,
                "an int8 weight must be [P, K, 32] panels for K = ", K);
    TORCH_CHECK(scale && scale->scalar_type() == torch::kFloat32 && scale->is_contiguous() &&
                    scale->numel() == P * kNR,
                "int8 panels need a contiguous float32 scale of P * 32 entries");
  }
  TORCH_CHECK(n > (P - 1) * kNR && n <= P * kNR, "n = ", n, " does not match ", P, " panels");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == n,
                "bias must be a contiguous float32 [n] tensor");
  }
  auto y = torch::empty({M, n}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const char* wp = static_cast<const char*>(w.data_ptr());
  const int64_t panel_bytes = bf16 ? (K + 1) / 2 * 2 * kNR * 2 : K * kNR;
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
#if defined(LORASERVE_AMX)
  if (bf16 && M >= kAmxMinRows && amx_enabled()) {
    // x in bf16, rows padded to whole tiles and K to whole pairs (zeros: they add nothing)
    const int64_t pairs = (K + 1) / 2, mpad = (M + kAmxRows - 1) / kAmxRows * kAmxRows;
    auto xb = torch::zeros({mpad, 2 * pairs}, x.options().dtype(torch::kBFloat16));
    xb.narrow(0, 0, M).narrow(1, 0, K).copy_(x);
    const uint16_t* xbp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
    const int64_t blocks = mpad / kAmxRows, ldb = 2 * pairs;
    const TileConfig cfg = tile_config(pairs % kAmxPairs);
    at::parallel_for(0, P * blocks, 1, [&](int64_t lo, int64_t hi) {
      _tile_loadconfig(&cfg);  // tile state is per thread
      for (int64_t it = lo; it < hi; ++it) {
        const int64_t p = it / blocks, b = it % blocks;
        const Panel t{wp + p * panel_bytes, K, nullptr, bp ? bp + p * kNR : nullptr, std::min(kNR, n - p * kNR)};
        const int64_t r0 = b * kAmxRows;
        amx_block(xbp + r0 * ldb, ldb, t, std::min(kAmxRows, M - r0), yp + r0 * n + p * kNR, n);
      }
      _tile_release();
    });
    return y;
  }
#endif
  const int64_t ldx = x.stride(0), chunks = (M + kMC - 1) / kMC;
  // one work item: a chunk of rows x one panel; panel-major, so a panel is read once per chunk
  at::parallel_for(0, P * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t p = it / chunks, c = it % chunks;
      const int64_t r0 = M * c / chunks, rows = M * (c + 1) / chunks - r0;
      const Panel t{wp + p * panel_bytes, K, sp ? sp + p * kNR : nullptr, bp ? bp + p * kNR : nullptr,
                    std::min(kNR, n - p * kNR)};
      if (bf16) panel_rows<true>(rows, xp + r0 * ldx, ldx, t, yp + r0 * n + p * kNR, n);
      else panel_rows<false>(rows, xp + r0 * ldx, ldx, t, yp + r0 * n + p * kNR, n);
    }
  });
  return y;
}
