// The FMA register kernels over low-precision weight panels that gemm_lowp_cpu.cpp dispatches to
// (that file says why they exist and how the panels are laid out): a panel converted in registers
// as it streams (one row, or one register block of rows), or converted once into an fp32 scratch
// copy that a register-blocked fp32 kernel reads for every block of rows; panel_rows picks
// between them by the rows. The portable build keeps a scalar loop of the same sums.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fetch_policy.h"
#include "lowp_panel.h"
#include "over_rows.h"
#include "row_prefetch.h"
#include "simd.h"
#include "widen.h"

#define LS_LAMBDA_INLINE __attribute__((always_inline))  // on a lambda: after its parameters

namespace lowp_fma {

using fetch_policy::no_pf;
using fetch_policy::NoPf;
using lowp::kNR;
using lowp::Panel;

// One row streams the weights from DRAM: prefetching this many bytes ahead keeps more line fills
// in flight than the hardware prefetcher alone (135M shape, 1 thread, all layers' weights per
// token: int8 14.2 -> 9.3-10.4 ms, bf16 23.7 -> 21.1 ms; 2 KB and 8 KB ahead measured slower).
constexpr int64_t kPrefetch = 4096;
#if LORASERVE_SIMD
// (the hint is the vendor's: row_prefetch.h)

// Several rows: the first register block of each panel also fetches the next panel into L2,
// one line per k-step (two per bf16 k-pair), as panel_kernels.h's SpanPf: without it each panel's
// first block waited on DRAM. Same 30 layers, AVX2 build: int8 2 / 4 / 8 rows 13-15 / 13.3 / 20.0
// -> 6.5 / 10.1 / 17.1 ms; bf16 11.4 / 15.0 / 21.8 -> 10.4 / 13.6 / 20.2 ms; AVX-512 bf16 2 / 4
// rows 11.5 / 13.4 -> 9.8 / 10.7 ms.
LS_INLINE void prefetch_next(const char* next, int64_t bytes, int64_t& at) {
  if (at < bytes) {
    _mm_prefetch(next + at, _MM_HINT_T1);
    at += 64;
  }
}

// t for the register blocks after a panel's first: the next panel is already on its way
inline Panel without_next(Panel t) {
  t.next = nullptr;
  t.next_bytes = 0;
  return t;
}

using simd::V;
constexpr int kL = simd::W;         // fp32 lanes
constexpr int kJ = kNR / kL;        // registers per panel row
#if LORASERVE_SIMD == 512
constexpr int kMR = 12;  // rows of an in-register block: 2 x 12 accumulators + weights fit 32 registers
constexpr int64_t kInRegRowsBf16 = kMR, kInRegRowsInt8 = kMR;  // one block; more: scratch (or AMX)
constexpr int kMRBf16 = kMR;
constexpr int kFR = 12;  // rows x registers of the fp32-scratch block (whole panel: 2 registers)
constexpr int kFV = 2;
LS_INLINE void bf16_pair(const uint16_t* p, V& even, V& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
LS_INLINE V int8_cols(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
constexpr int kMR = 3;  // 3 x 4 accumulators, one weight register at a time (fma_block)
// up to this many rows the in-register blocks beat converting the panel once into the fp32
// scratch; 135M gate_up, us, in registers vs scratch: bf16 8 rows 405 vs 523, 16 rows 764 vs
// ~790. int8 always: its blocks of up to 6 rows over half a panel (part_rows) beat the scratch
// at every row count of a work item (576 x 1536 in L2, one Zen 4 thread, GMAC/s: 8 rows 50.5 vs
// 38.2, 32 rows 55.0 vs 51.1, 96 rows 56.3 vs 55.1), where blocks of 3 rows over the whole panel
// lost from 16 rows (805 vs ~690 us).
constexpr int64_t kInRegRowsBf16 = 16, kInRegRowsInt8 = INT64_MAX;
// bf16 blocks of 2 rows, not 3: 2 x 4 accumulators beside a pair's two weight registers (8 MB of
// panels in L3, 2 Zen 5 cores: 3 rows 166 us, 2 rows 90 us; 16 rows 977 -> 720 us)
constexpr int kMRBf16 = 2;
constexpr int kFR = 6;  // 6 rows x half a panel (2 registers): 12 accumulators, 2 weights, 1 broadcast
constexpr int kFV = 2;
LS_INLINE void bf16_pair(const uint16_t* p, V& even, V& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
LS_INLINE V int8_cols(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// Independent sums a one-row stream keeps per panel register, so the FMA latency never throttles
// the loads: four with AVX-512 (a panel row is 2 registers: 8 accumulators); two with AVX2, whose
// panel row is 4 of its 16 registers (four sets spilled two accumulators to the stack: a
// store-to-load chain every four k-steps)
constexpr int kRowSets = kJ <= 2 ? 4 : 2;

LS_INLINE V row_sum(const V (&acc)[kRowSets][kJ], int j) {
  if constexpr (kRowSets == 4) return simd::add(simd::add(acc[0][j], acc[1][j]), simd::add(acc[2][j], acc[3][j]));
  return simd::add(acc[0][j], acc[1][j]);
}

using lowp::put_reg;

// k-steps per step of a block's PF: an AVX2 int8 k-step of 6 rows is ~24 uops, and the fused
// decode pass's span walk on every one cost the panels 5-10 % (30 layers, 32 rows, AVX2 int8,
// 2-core Zen 4, fetches but no adapter rows run: 33.9 -> 35.5 ms with the tables in L3, 36.5 ->
// 40.4 from DRAM; 11 % of the block's samples sat on the prefetch instruction)
constexpr int64_t kPfEvery = 4;

// MR rows x NV registers of a panel from column c0, its weights as `load(k, j)` gives them (fp32
// values: int8 converted in registers, or fp32 scratch): the register block int8 and the scratch
// path share. Loops fully unrolled so the accumulators stay in registers. Every kPfEvery k-steps
// also step pf (fetch_policy.h: the fused decode pass's adapter rows), from a local copy.
template <int MR, int NV, typename Load, class PF>
LS_INLINE void fma_block(const float* __restrict__ x, int64_t ldx, const Panel& t, int64_t c0, float* __restrict__ y,
                         int64_t ldy, const Load& load, PF& pf) {
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[m][j] = simd::zero();
  const int64_t K = t.k;
  const char* const nx = t.next;
  const int64_t nb = t.next_bytes;
  int64_t at = 0;
  PF cur = pf;
  if constexpr (MR * NV + NV + 1 > simd::kRegs) {
    // AVX2's 3 int8 rows: 12 accumulators, 4 weight registers and a broadcast are one register
    // more than there are, and GCC spilled in the loop. One weight register at a time (each sum
    // still takes its k-steps in order, so the bits are the same), each row's value broadcast
    // again from L1 for every register. 576 x 1536 in L2, one Zen 4 thread: 25 -> 46 GMAC/s at 3 rows.
#pragma GCC unroll 2
    for (int64_t k = 0; k < K; ++k) {
      prefetch_next(nx, nb, at);
      if constexpr (PF::kOn) {
        if (k % kPfEvery == 0) cur.step();
      }
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        const V wv = load(k, j);
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) acc[m][j] = simd::fma(simd::set1(x[m * ldx + k]), wv, acc[m][j]);
      }
    }
  } else {
#pragma GCC unroll 4  // as panel_kernels.h's block: the loop's own uops were a fifth of it
    for (int64_t k = 0; k < K; ++k) {
      prefetch_next(nx, nb, at);
      if constexpr (PF::kOn) {
        if (k % kPfEvery == 0) cur.step();
      }
      V wv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) wv[j] = load(k, j);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const V xv = simd::set1(x[m * ldx + k]);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[m][j] = simd::fma(xv, wv[j], acc[m][j]);
      }
    }
  }
  if constexpr (PF::kOn) pf = cur;
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) put_reg(y + m * ldy, t, c0 + j * kL, acc[m][j]);
}

// MR rows x one bf16 panel, converted in registers: each pair of k-steps loads the panel's 32
// columns once for all rows. Loops fully unrolled so the accumulators stay in registers.
template <int MR>
void bf16_block(const float* __restrict__ x, int64_t ldx, const Panel& t, float* __restrict__ y, int64_t ldy) {
  V acc[MR][kJ];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < kJ; ++j) acc[m][j] = simd::zero();
  const uint16_t* __restrict__ w = static_cast<const uint16_t*>(t.w);
  const int64_t full = t.k / 2;
  const char* const nx = t.next;
  const int64_t nb = t.next_bytes;
  int64_t at = 0;
  for (int64_t kk = 0; kk < full; ++kk) {
    prefetch_next(nx, nb, at);
    prefetch_next(nx, nb, at);
    if constexpr (kJ <= 2) {
      // the whole k-pair's weights first, then one row at a time: two broadcasts live, not 2 * MR
      V e[kJ], o[kJ];
#pragma GCC unroll 4
      for (int j = 0; j < kJ; ++j) bf16_pair(w + kk * 2 * kNR + j * 2 * kL, e[j], o[j]);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const V xe = simd::set1(x[m * ldx + 2 * kk]), xo = simd::set1(x[m * ldx + 2 * kk + 1]);
#pragma GCC unroll 4
        for (int j = 0; j < kJ; ++j) acc[m][j] = simd::fma(xo, o[j], simd::fma(xe, e[j], acc[m][j]));
      }
    } else {
      // AVX2: a k-pair's weights are 8 of the 16 registers, which beside 12 accumulators spilled;
      // one register's pair at a time, the rows' broadcasts re-read from L1 for each
#pragma GCC unroll 4
      for (int j = 0; j < kJ; ++j) {
        V e, o;
        bf16_pair(w + kk * 2 * kNR + j * 2 * kL, e, o);
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m)
          acc[m][j] = simd::fma(simd::set1(x[m * ldx + 2 * kk + 1]), o,
                                simd::fma(simd::set1(x[m * ldx + 2 * kk]), e, acc[m][j]));
      }
    }
  }
  if (t.k & 1) {  // odd K: the last pair's odd half is padding (x has no such column)
#pragma GCC unroll 4
    for (int j = 0; j < kJ; ++j) {
      V e, o;
      bf16_pair(w + full * 2 * kNR + j * 2 * kL, e, o);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) acc[m][j] = simd::fma(simd::set1(x[m * ldx + 2 * full]), e, acc[m][j]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < kJ; ++j) put_reg(y + m * ldy, t, j * kL, acc[m][j]);
}

// One row: even and odd k-steps in separate accumulators, two pairs in flight (AVX-512; one with
// AVX2, kRowSets), so four FMA chains per register keep the loads streaming instead of waiting on
// FMA latency.
inline void bf16_row(const float* __restrict__ x, const Panel& t, float* __restrict__ y) {
  V acc[kRowSets][kJ];
#pragma GCC unroll 4
  for (int u = 0; u < kRowSets; ++u)
#pragma GCC unroll 4
    for (int j = 0; j < kJ; ++j) acc[u][j] = simd::zero();
  const uint16_t* __restrict__ w = static_cast<const uint16_t*>(t.w);
  const int64_t full = t.k / 2;
  const row_prefetch::Hint pf = row_prefetch::hint();
  int64_t kk = 0;
  for (; kk + 2 <= full; kk += 2) {
    if (kPrefetch) {  // two pairs of k-steps: 256 bytes, four lines
#pragma GCC unroll 4
      for (int l = 0; l < 4; ++l)
        pf.line(reinterpret_cast<const char*>(w + kk * 2 * kNR) + kPrefetch + 64 * l);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const V xe = simd::set1(x[2 * (kk + h)]), xo = simd::set1(x[2 * (kk + h) + 1]);
      const int s = 2 * (h % (kRowSets / 2));
#pragma GCC unroll 4
      for (int j = 0; j < kJ; ++j) {
        V e, o;
        bf16_pair(w + (kk + h) * 2 * kNR + j * 2 * kL, e, o);
        acc[s][j] = simd::fma(xe, e, acc[s][j]);
        acc[s + 1][j] = simd::fma(xo, o, acc[s + 1][j]);
      }
    }
  }
  for (; kk < full; ++kk) {
    const V xe = simd::set1(x[2 * kk]), xo = simd::set1(x[2 * kk + 1]);
#pragma GCC unroll 4
    for (int j = 0; j < kJ; ++j) {
      V e, o;
      bf16_pair(w + kk * 2 * kNR + j * 2 * kL, e, o);
      acc[0][j] = simd::fma(xe, e, acc[0][j]);
      acc[1][j] = simd::fma(xo, o, acc[1][j]);
    }
  }
  if (t.k & 1) {
    const V xe = simd::set1(x[2 * full]);
#pragma GCC unroll 4
    for (int j = 0; j < kJ; ++j) {
      V e, o;
      bf16_pair(w + full * 2 * kNR + j * 2 * kL, e, o);
      acc[0][j] = simd::fma(xe, e, acc[0][j]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < kJ; ++j) put_reg(y, t, j * kL, row_sum(acc, j));
}

// MR rows x NV registers of an int8 panel from column c0 (all of it by default), converted in
// registers; the column scales are applied at the store.
template <int MR, int NV = kJ, class PF = NoPf>
void int8_block(const float* __restrict__ x, int64_t ldx, const Panel& t, float* __restrict__ y, int64_t ldy,
                int64_t c0 = 0, PF& pf = no_pf) {
  const int8_t* __restrict__ w = static_cast<const int8_t*>(t.w) + c0;
  fma_block<MR, NV>(
      x, ldx, t, c0, y, ldy, [w](int64_t k, int j) LS_LAMBDA_INLINE { return int8_cols(w + k * kNR + j * kL); }, pf);
}

// The accumulator sets of an int8 one-row kernel, per panel: AVX-512's two registers of a row take
// four FMA chains each to keep the loads streaming; AVX2's four take one set, so that two
// panels' sums (int8_rows<2>) fit its 16 registers beside the broadcast and a converted weight
// register. A set's chain is then a fifth of the stream's pace from DRAM.
constexpr int kInt8Sets = kJ <= 2 ? 4 : 1;

template <int S>
LS_INLINE V sets_sum(const V (&acc)[S][kJ], int j) {
  if constexpr (S == 4) return simd::add(simd::add(acc[0][j], acc[1][j]), simd::add(acc[2][j], acc[3][j]));
  else if constexpr (S == 2) return simd::add(acc[0][j], acc[1][j]);
  else return acc[0][j];
}

// One row over NP panels at once, each panel's sums exactly a lone panel's (NP = 1), each panel
// streaming its weights with its own prefetches kPrefetch bytes ahead.
template <int NP>
LS_INLINE void int8_rows(const float* __restrict__ x, const Panel* t, float* const* y) {
  V acc[NP][kInt8Sets][kJ];
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 4
    for (int u = 0; u < kInt8Sets; ++u)
#pragma GCC unroll 4
      for (int j = 0; j < kJ; ++j) acc[q][u][j] = simd::zero();
  const int8_t* w[NP];
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) w[q] = static_cast<const int8_t*>(t[q].w);
  const int64_t K = t[0].k;
  const row_prefetch::Hint pf = row_prefetch::hint();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    if (kPrefetch) {
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) {
        pf.line(reinterpret_cast<const char*>(w[q] + k * kNR) + kPrefetch);
        pf.line(reinterpret_cast<const char*>(w[q] + k * kNR) + kPrefetch + 64);
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const V xv = simd::set1(x[k + u]);
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q)
#pragma GCC unroll 4
        for (int j = 0; j < kJ; ++j)
          acc[q][u % kInt8Sets][j] = simd::fma(xv, int8_cols(w[q] + (k + u) * kNR + j * kL), acc[q][u % kInt8Sets][j]);
    }
  }
  for (; k < K; ++k) {
    const V xv = simd::set1(x[k]);
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q)
#pragma GCC unroll 4
      for (int j = 0; j < kJ; ++j) acc[q][0][j] = simd::fma(xv, int8_cols(w[q] + k * kNR + j * kL), acc[q][0][j]);
  }
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 4
    for (int j = 0; j < kJ; ++j) put_reg(y[q], t[q], j * kL, sets_sum<kInt8Sets>(acc[q], j));
}

inline void int8_row(const float* __restrict__ x, const Panel& t, float* __restrict__ y) {
  float* const ys[1] = {y};
  int8_rows<1>(x, &t, ys);
}

// One row over int8 panels [p0, p1) (`at(p)`: panel p, its sums into y + p * kNR), two panels at a
// time, one from each half of the range, so a thread streams two runs of weights at once.
// Why: one run, prefetched 4 KB ahead, read ~0.8 x what a plain sum reads on the 2-core Zen 3
// (fma avx2): a standalone stream of 134 MB of panels, 2 threads, ~21-24 GB/s against the sum's
// 25-28, where two runs a thread read 26-29 (1 thread: 13 vs 16, the sum 15-16); three runs
// measured level with two in the engine. Each panel's sums are a lone panel's, so the pairing
// (which depends on the thread's range) changes no bit.
template <class PanelAt>
void int8_row_range(const float* x, int64_t p0, int64_t p1, const PanelAt& at, float* y) {
  const int64_t h = (p1 - p0) / 2;
  for (int64_t i = 0; i < h; ++i) {
    const Panel t[2] = {at(p0 + i), at(p0 + h + i)};
    float* const ys[2] = {y + (p0 + i) * kNR, y + (p0 + h + i) * kNR};
    int8_rows<2>(x, t, ys);
  }
  if ((p1 - p0) % 2) int8_row(x, at(p1 - 1), y + (p1 - 1) * kNR);
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

// The panel as fp32 [K, 32] (the scales stay out: they are applied at the store)
inline void dequant_panel(bool bf16, const Panel& t, float* __restrict__ out) {
  if (bf16) {
    const uint16_t* w = static_cast<const uint16_t*>(t.w);
    const int64_t pairs = (t.k + 1) / 2;
    for (int64_t kk = 0; kk < pairs; ++kk) {
      const bool odd = 2 * kk + 1 < t.k;
#pragma GCC unroll 4
      for (int j = 0; j < kJ; ++j) {
        V e, o;
        bf16_pair(w + kk * 2 * kNR + j * 2 * kL, e, o);
        simd::store(out + 2 * kk * kNR + j * kL, e);
        if (odd) simd::store(out + (2 * kk + 1) * kNR + j * kL, o);
      }
    }
  } else {
    const int8_t* w = static_cast<const int8_t*>(t.w);
    for (int64_t k = 0; k < t.k; ++k)
#pragma GCC unroll 4
      for (int j = 0; j < kJ; ++j) simd::store(out + k * kNR + j * kL, int8_cols(w + k * kNR + j * kL));
  }
}

// MR rows x NV registers of an fp32 panel [K, 32] from column c0 (panel_kernels.h's register block)
template <int MR, int NV, class PF>
void f32_block(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w, const Panel& t, int64_t c0,
               float* __restrict__ y, int64_t ldy, PF& pf) {
  w += c0;
  fma_block<MR, NV>(
      x, ldx, t, c0, y, ldy, [w](int64_t k, int j) LS_LAMBDA_INLINE { return simd::load(w + k * kNR + j * kL); }, pf);
}

// MR rows x the panel in parts of kFV registers, the next panel fetched by the first part only:
// over the fp32 scratch copy of a panel (w), or (w null) over the int8 panel itself, converted
// in registers; every part steps pf
template <int MR, class PF>
void part_rows(int mr, const float* x, int64_t ldx, const float* w, const Panel& t, float* y, int64_t ldy, PF& pf) {
  if constexpr (MR > 1) {
    if (mr < MR) return part_rows<MR - 1>(mr, x, ldx, w, t, y, ldy, pf);
  }
  const Panel rest = without_next(t);
  for (int64_t c0 = 0; c0 < kNR && c0 < t.cols; c0 += kFV * kL) {
    if (w) f32_block<MR, kFV>(x, ldx, w, c0 ? rest : t, c0, y, ldy, pf);
    else int8_block<MR, kFV>(x, ldx, c0 ? rest : t, y, ldy, c0, pf);
  }
}

// AVX2 int8 from this many rows: blocks of up to kFR rows over each half of the panel, not of
// kMR rows over all of it. Each converted weight register (two instructions) then serves up to 6
// FMAs instead of 3, and the block fits the 16 registers: 576 x 1536 in L2, one Zen 4 thread,
// GMAC/s: whole panel 2 / 3 rows 41 / 46, half panels 4 / 6 rows 50 / 57 (2 rows: 30).
constexpr bool kInt8Parts = kJ > kFV;
constexpr int64_t kInt8PartsMinRows = 4;

// Whether panel_rows takes `rows` rows through part_rows (blocks of kFR rows over parts of the
// panel: AVX2 int8 in registers, or the fp32 scratch), the blocks that step a PF
template <bool BF16>
constexpr bool by_parts(int64_t rows) {
  if (rows > (BF16 ? kInRegRowsBf16 : kInRegRowsInt8)) return true;
  return !BF16 && kInt8Parts && rows >= kInt8PartsMinRows;
}

// the PF steps panel_rows' part blocks take over a panel of K for `rows` rows (by_parts)
inline int64_t part_pf_steps(int64_t rows, int64_t K) {
  return (rows + kFR - 1) / kFR * (kNR / (kFV * kL)) * ((K + kPfEvery - 1) / kPfEvery);
}

// rows x one panel; the part blocks (by_parts) step pf, the others fetch only the next panel
template <bool BF16, class PF = NoPf>
void panel_rows(int64_t rows, const float* x, int64_t ldx, const Panel& t, float* y, int64_t ldy,
                std::vector<float>& scratch, PF& pf = no_pf) {
  // only the first register block fetches the next panel (t.next; the one-row kernels ignore it
  // and stream their own panel ahead)
  const Panel rest = without_next(t);
  if (rows <= (BF16 ? kInRegRowsBf16 : kInRegRowsInt8)) {  // converted in registers as the panel streams, once per block of rows
    if (!BF16 && kInt8Parts && rows >= kInt8PartsMinRows) {
      over_blocks(rows, kFR, [&](int64_t r, int mr) {
        part_rows<kFR>(mr, x + r * ldx, ldx, nullptr, r == 0 ? t : rest, y + r * ldy, ldy, pf);
      });
      return;
    }
    constexpr int most = BF16 ? kMRBf16 : kMR;
    over_blocks(rows, most, [&](int64_t r, int mr) {
      rows_block<BF16, most>(mr, x + r * ldx, ldx, r == 0 ? t : rest, y + r * ldy, ldy);
    });
    return;
  }
  scratch.resize(static_cast<size_t>(t.k * kNR));
  dequant_panel(BF16, t, scratch.data());
  over_blocks(rows, kFR, [&](int64_t r, int mr) {
    part_rows<kFR>(mr, x + r * ldx, ldx, scratch.data(), r == 0 ? t : rest, y + r * ldy, ldy, pf);
  });
}
#else
// Portable build: one column at a time, the same sums in the same fp32 arithmetic.
inline void finish(float* y, const Panel& t, const float* acc) {
  for (int64_t c = 0; c < t.cols; ++c) {
    float v = acc[c];
    if (t.scale) v *= t.scale[c];
    if (t.bias) v += t.bias[c];
    y[c] = v;
  }
}

// weight (k, c) of a bf16 panel ([K/2][32][2]: k-pairs side by side), widened exactly
inline float bf16_at(const uint16_t* w, int64_t k, int64_t c) {
  return widen::to_f(w[(k / 2) * 2 * kNR + c * 2 + (k & 1)]);
}

template <bool BF16>
void panel_rows(int64_t rows, const float* x, int64_t ldx, const Panel& t, float* y, int64_t ldy,
                std::vector<float>&) {
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

}  // namespace lowp_fma
