// int8 weight panels times fp32 activations with integer dot products (AVX512-VNNI `vpdpbusd`,
// with AVX512-VBMI's byte permute): AMD Zen 4 and later, Intel Ice Lake and later.
//
// Why: the in-register path of lowp_kernels.h converts every int8 weight to fp32 before its
// FMA (`vpmovsxbd` + `vcvtdq2ps` + `vfmadd` per 16 weights), so a 1-row decode GEMV tops out near
// 94 GB/s of int8 on a Zen 5 core pair with its weights in L3 — barely above DRAM, so in a real
// step the conversion and the line fills serialise. `vpdpbusd` multiplies 64 int8 weights by 64
// 8-bit activations and adds them into 16 int32 sums in one instruction, with no conversion.
//
// The activations keep (nearly) fp32 precision: each row is scaled to signed 24-bit integers,
// x ≈ s·xi with s = max|x| / kQMax (error ≤ s/2 = 2^-24 of the row's largest value), and xi is
// split into three balanced base-256 digits, xi = d0 + 256·d1 + 65536·d2, each in [-128, 127].
// vpdpbusd wants one unsigned operand, so the weights enter as w + 128 (a sign-bit flip) and each
// digit's sum loses 128·Σd exactly, in int32: Σ(w + 128)·d − 128·Σd = Σ w·d. A column's result is
// s·scale·(acc0 + 256·acc1 + 65536·acc2) + bias. Three instructions per 64 weights, against ~14
// µops before; int32 sums cannot overflow for K ≤ kMaxK (255·128·K < 2^31).
//
// The int8 panels stay as they are ([P, K, 32]: a k-step's 32 columns side by side); one
// `vpermt2b` per 64 weights turns four k-steps of 16 columns into the 4-byte groups vpdpbusd
// multiplies (column c's k, k+1, k+2, k+3 in lane c), so every other path (AMX, the AVX2 build,
// the tied embedding's row gather) keeps reading one layout.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "over_rows.h"
#include "row_prefetch.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LORASERVE_INT8DP 1
#endif

// the longest K whose int32 digit sums cannot overflow
constexpr int64_t kInt8DpMaxK = 65536;

#if defined(LORASERVE_INT8DP)
namespace {

constexpr int64_t kNR = 32;  // columns per panel: two registers of 16 int32 sums
constexpr int64_t kMC = 96;  // rows per work item
constexpr int kMR = 4;       // rows of a register block: 4 rows x 3 digits x 2 halves = 24 sums
constexpr int kDigits = 3;
// |xi| <= kQMax keeps the top balanced digit within [-128, 127] (the three digits reach 8,355,711)
constexpr float kQMax = 8323072.f;  // 2^23 - 2^16
// the 1-row stream prefetches this far ahead, as lowp_kernels.h's int8 row does (with the hint
// row_prefetch.h picks for the CPU); blocks of several rows fetch the next panel instead, two
// lines per k-quad:
// 30 layers of the SmolLM projections from DRAM, 2-core Xeon with AMX: 1 row 6.4 -> 4.8-5.1 ms
constexpr int64_t kPrefetch = 4096;

// One row's activations as digits: `digits` bytes [3][kpad] (k-steps past K are zero), the
// per-digit corrections 128·Σd, and the row's scale s.
struct RowDigits {
  const int8_t* d;
  int32_t corr[kDigits];
  float s;
};

// x[0, K) -> digits[j * kpad + k]; kpad is a multiple of 16 and >= K
void to_digits(const float* x, int64_t K, int64_t kpad, int8_t* digits, int32_t* corr, float* s) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k)));
  }
  const float amax = _mm512_reduce_max_ps(mx);
  // amax 0: every digit 0 (the result is the bias); not finite: s is NaN, so every result is too
  const float inv = amax > 0.f && std::isfinite(amax) ? kQMax / amax : 0.f;
  *s = std::isfinite(amax) ? amax / kQMax : std::nanf("");
  const __m512 vinv = _mm512_set1_ps(inv);
  __m512i sum[kDigits] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int64_t k = 0; k < kpad; k += 16) {
    const __mmask16 m =
        K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : K > k ? static_cast<__mmask16>((1u << (K - k)) - 1) : 0;
    // round to nearest even (the default rounding mode), then the balanced digits: the low byte
    // read as signed is d0, and xi - d0 is a multiple of 256
    const __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv));
    const __m512i d0 = _mm512_srai_epi32(_mm512_slli_epi32(xi, 24), 24);
    const __m512i x1 = _mm512_srai_epi32(_mm512_sub_epi32(xi, d0), 8);
    const __m512i d1 = _mm512_srai_epi32(_mm512_slli_epi32(x1, 24), 24);
    const __m512i d2 = _mm512_srai_epi32(_mm512_sub_epi32(x1, d1), 8);
    const __m512i d[kDigits] = {d0, d1, d2};
#pragma GCC unroll 3
    for (int j = 0; j < kDigits; ++j) {
      sum[j] = _mm512_add_epi32(sum[j], d[j]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(digits + j * kpad + k), _mm512_cvtepi32_epi8(d[j]));
    }
  }
  for (int j = 0; j < kDigits; ++j) corr[j] = 128 * _mm512_reduce_add_epi32(sum[j]);
}

// vpermt2b indices: byte 4c + i of half h is weight (k + i, 16h + c), found at byte 32i + 16h + c
// of the two loaded registers (k, k+1 | k+2, k+3)
struct Perm {
  __m512i idx[2];
  Perm() {
    alignas(64) uint8_t t[2][64];
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 16; ++c)
        for (int i = 0; i < 4; ++i) t[h][4 * c + i] = static_cast<uint8_t>(32 * i + 16 * h + c);
    idx[0] = _mm512_load_si512(t[0]);
    idx[1] = _mm512_load_si512(t[1]);
  }
};

// Four k-steps of a panel's 32 columns as two registers of unsigned (w + 128) 4-byte groups. With
// `rem` < 4 k-steps left, only those are read (the digits past K are zero, so the rest count 0).
__attribute__((always_inline)) inline void quad(const int8_t* w, const Perm& p, int64_t rem, __m512i& w0,
                                                __m512i& w1) {
  __m512i a, b;
  if (rem >= 4) {
    a = _mm512_loadu_si512(w);
    b = _mm512_loadu_si512(w + 64);
  } else {
    const auto bytes = [](int64_t steps) -> __mmask64 {
      return steps <= 0 ? 0 : steps >= 2 ? ~0ULL : (1ULL << (32 * steps)) - 1;
    };
    a = _mm512_maskz_loadu_epi8(bytes(rem), w);
    b = _mm512_maskz_loadu_epi8(bytes(rem - 2), w + 64);
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  w0 = _mm512_xor_si512(_mm512_permutex2var_epi8(a, p.idx[0], b), flip);
  w1 = _mm512_xor_si512(_mm512_permutex2var_epi8(a, p.idx[1], b), flip);
}

// MR rows x one panel; U independent sets of sums over alternate k-quads (U = 2 for one row, so
// twelve dot-product chains hide vpdpbusd's latency). Loops fully unrolled: sums stay in registers.
template <int MR, int U>
void dp_block(const RowDigits* rows, int64_t kpad, const int8_t* __restrict__ w, int64_t K, const Perm& p,
              float* __restrict__ y, int64_t ldy, const float* scale, const float* bias, int64_t cols,
              const char* next) {
  __m512i acc[U][MR][kDigits][2];
#pragma GCC unroll 2
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
      for (int j = 0; j < kDigits; ++j) acc[u][m][j][0] = acc[u][m][j][1] = _mm512_setzero_si512();
  const int8_t* d[MR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) d[m] = rows[m].d;
  const int64_t quads = (K + 3) / 4;
  int64_t q = 0;
  const auto step = [&](int u, int64_t qq, int64_t rem) __attribute__((always_inline)) {
    __m512i w0, w1;
    quad(w + qq * 4 * kNR, p, rem, w0, w1);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
      for (int j = 0; j < kDigits; ++j) {
        const __m512i xb = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(d[m] + j * kpad + 4 * qq));
        acc[u][m][j][0] = _mm512_dpbusd_epi32(acc[u][m][j][0], w0, xb);
        acc[u][m][j][1] = _mm512_dpbusd_epi32(acc[u][m][j][1], w1, xb);
      }
  };
  const int64_t full = K / 4;
  int64_t ahead = 0;  // bytes of the next panel (K * 32, k-quads of 128) fetched so far
  const row_prefetch::Hint pf = row_prefetch::hint();
  for (; q + U <= full; q += U) {
    if (MR > 1 && next && ahead < K * kNR) {
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) {
        _mm_prefetch(next + ahead, _MM_HINT_T1);
        _mm_prefetch(next + ahead + 64, _MM_HINT_T1);
        ahead += 128;
      }
    }
    if (MR == 1 && kPrefetch) {
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) {
        const char* at = reinterpret_cast<const char*>(w + (q + u) * 4 * kNR) + kPrefetch;
        pf.line(at);
        pf.line(at + 64);
      }
    }
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) step(u, q + u, 4);
  }
  for (; q < quads; ++q) step(0, q, K - 4 * q);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __mmask16 mk =
          cols - 16 * h >= 16 ? static_cast<__mmask16>(0xFFFF)
                              : cols > 16 * h ? static_cast<__mmask16>((1u << (cols - 16 * h)) - 1) : 0;
      if (!mk) continue;
      __m512 v[kDigits];
#pragma GCC unroll 3
      for (int j = 0; j < kDigits; ++j) {
        __m512i a = acc[0][m][j][h];
#pragma GCC unroll 2
        for (int u = 1; u < U; ++u) a = _mm512_add_epi32(a, acc[u][m][j][h]);
        v[j] = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, _mm512_set1_epi32(rows[m].corr[j])));
      }
      __m512 r = _mm512_fmadd_ps(v[2], _mm512_set1_ps(65536.f), _mm512_fmadd_ps(v[1], _mm512_set1_ps(256.f), v[0]));
      r = _mm512_mul_ps(r, _mm512_mul_ps(_mm512_set1_ps(rows[m].s), _mm512_maskz_loadu_ps(mk, scale + 16 * h)));
      if (bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mk, bias + 16 * h));
      _mm512_mask_storeu_ps(y + m * ldy + 16 * h, mk, r);
    }
}

// next: the panel to fetch into L2 meanwhile (null: none; one row streams its own ahead)
template <int MR>
void dp_rows(int mr, const RowDigits* rows, int64_t kpad, const int8_t* w, int64_t K, const Perm& p, float* y,
             int64_t ldy, const float* scale, const float* bias, int64_t cols, const char* next) {
  if constexpr (MR > 1) {
    if (mr < MR) return dp_rows<MR - 1>(mr, rows, kpad, w, K, p, y, ldy, scale, bias, cols, next);
    dp_block<MR, 1>(rows, kpad, w, K, p, y, ldy, scale, bias, cols, next);
  } else {
    dp_block<1, 2>(rows, kpad, w, K, p, y, ldy, scale, bias, cols, nullptr);
  }
}

}  // namespace

int64_t int8dp_max_k() { return kInt8DpMaxK; }

// y [M, n] = x [M, K] @ W.T * scale (+ bias) over int8 panels [P, K, 32] with scale [P * 32]
void int8dp_linear(const float* x, int64_t ldx, int64_t M, int64_t K, const char* w, int64_t panel_bytes, int64_t P,
                   int64_t n, const float* scale, const float* bias, float* y) {
  TORCH_CHECK(K <= kInt8DpMaxK, "int8dp_linear: K = ", K, " is over ", kInt8DpMaxK);
  const int64_t kpad = (K + 15) / 16 * 16;
  std::vector<int8_t> digits(static_cast<size_t>(M * kDigits * kpad));
  std::vector<RowDigits> rows(static_cast<size_t>(M));
  over_rows(M, K, 1 << 14, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      int8_t* dm = digits.data() + m * kDigits * kpad;
      rows[m].d = dm;
      to_digits(x + m * ldx, K, kpad, dm, rows[m].corr, &rows[m].s);
    }
  });
  const Perm perm;
  const int64_t chunks = (M + kMC - 1) / kMC;
  const bool major = grid_chunk_major(P * panel_bytes);
  // one work item: a chunk of rows x one panel (over_rows.h: which order)
  at::parallel_for(0, P * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const auto [p, c] = grid_item(it, P, chunks, major);
      const int64_t r0 = M * c / chunks, nrows = M * (c + 1) / chunks - r0;
      const int8_t* wp = reinterpret_cast<const int8_t*>(w + p * panel_bytes);
      const int64_t cols = std::min(kNR, n - p * kNR);
      const float* bp = bias ? bias + p * kNR : nullptr;
      // decode sizes (one chunk: items are panels): the first block fetches this thread's next panel
      const char* next = chunks == 1 && it + 1 < hi ? w + (p + 1) * panel_bytes : nullptr;
      over_blocks(nrows, kMR, [&](int64_t r, int mr) {
        dp_rows<kMR>(mr, rows.data() + r0 + r, kpad, wp, K, perm, y + (r0 + r) * n + p * kNR, n, scale + p * kNR, bp,
                     cols, r == 0 ? next : nullptr);
      });
    }
  });
}
// Panels [p0, p1) of int8dp_linear's product for at most 8 rows, each panel as int8dp_linear
// computes it: the decode stack's threads each take a range inside one parallel region
// (decode_stack_cpu.cpp). Every thread turns the rows into digits itself (a few hundred ns at
// decode sizes), so no barrier waits for one thread to share them.
void int8dp_range(const float* x, int64_t ldx, int64_t M, int64_t K, const char* w, int64_t panel_bytes, int64_t p0,
                  int64_t p1, int64_t n, const float* scale, const float* bias, float* y, std::vector<int8_t>& digits) {
  // the region's row counts (lowp_range_rows(): 4) fit; more would need the whole-matrix path
  constexpr int64_t kMaxRows = 8;
  TORCH_CHECK(M <= kMaxRows, "int8dp_range takes at most ", kMaxRows, " rows, got ", M);
  const int64_t kpad = (K + 15) / 16 * 16;
  digits.resize(static_cast<size_t>(M * kDigits * kpad));
  RowDigits rows[kMaxRows];
  for (int64_t m = 0; m < M; ++m) {
    rows[m].d = digits.data() + m * kDigits * kpad;
    to_digits(x + m * ldx, K, kpad, digits.data() + m * kDigits * kpad, rows[m].corr, &rows[m].s);
  }
  const Perm perm;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* wp = reinterpret_cast<const int8_t*>(w + p * panel_bytes);
    const int64_t cols = std::min(kNR, n - p * kNR);
    const float* bp = bias ? bias + p * kNR : nullptr;
    const char* next = p + 1 < p1 ? w + (p + 1) * panel_bytes : nullptr;
    over_blocks(M, kMR, [&](int64_t r, int mr) {
      dp_rows<kMR>(mr, rows + r, kpad, wp, K, perm, y + r * n + p * kNR, n, scale + p * kNR, bp, cols,
                   r == 0 ? next : nullptr);
    });
  }
}
#else
int64_t int8dp_max_k() { return 0; }
void int8dp_range(const float*, int64_t, int64_t, int64_t, const char*, int64_t, int64_t, int64_t, int64_t,
                  const float*, const float*, float*, std::vector<int8_t>&) {
  TORCH_CHECK(false, "int8dp_range: this build has no AVX512-VNNI and AVX512-VBMI");
}
void int8dp_linear(const float*, int64_t, int64_t, int64_t, const char*, int64_t, int64_t, int64_t, const float*,
                   const float*, float*) {
  TORCH_CHECK(false, "int8dp_linear: this build has no AVX512-VNNI and AVX512-VBMI");
}
#endif
