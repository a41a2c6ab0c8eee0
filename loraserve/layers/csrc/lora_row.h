// One decode row's LoRA: h = x @ A (shrink), then y (+)= h @ B (expand), for an fp32 or a bf16
// slot table (bf16 widened in registers, widen.h), shared by `lora_rows` (lora_cpu.cpp) and the
// fused decode pass `panel_lora_linear` (gemm_lora_cpu.cpp).
//
// Why register accumulators: a row reads each value of A and B once, so the row should be a
// plain memory stream. Accumulating the shrink in memory (h[c] += x[i] * A[i, c], i outer), as the
// row kernel of lora_rows did, chains every k-step through a store and a reload of h, a wait per
// row of A whatever its width. Here the columns stay in registers, with two k-steps in flight
// where there are few of them, so 6-8 FMA chains hide the FMA latency. Measured on a 2-core Zen 5
// (30 layers x 4 projection groups, 32 rows on 32 distinct rank-16 adapters, interleaved A/B):
// a bf16 table (313 MB a step) 17.2 -> 15.1 ms with the AVX2 build, 16.1 -> 15.0 ms with the
// AVX-512 one; an fp32 table (625 MB) unchanged at ~22-25 ms, where the DRAM stream is the limit
// (~25-29 GB/s for these short per-row streams; prefetching 1-8 KB ahead of them did not help).
//
// Why two streams per row: one core following one sequential stream at a time does not reach the
// memory bandwidth; two at once do. The shrink runs the first and the second half of A's rows side
// by side (two accumulator sets), the expand rows k and k + rs/2 of B. Same pass, standalone
// (lora_row.h alone, 2 threads), 2-core Xeon with AMX: fp32 table 24.7 -> 22.4 ms (AVX-512 build),
// 27.3 -> 22.5 ms (AVX2); bf16 16.4 -> 14.0 / 18.7 -> 15.5 ms. A plain read of the same blocks
// measured 25.5 GB/s with one stream per thread, 26.9-28.6 with two to four (AVX2 loads: 26.4 ->
// 30.2); four streams in the expand measured the same as two.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"
#include "widen.h"

#if LORASERVE_SIMD
namespace lora_row {

using widen::wload;

// Column vectors a row's shrink splits its k-steps for (two accumulator sets of NV vectors, plus
// a broadcast each, fit the register file: 16 AVX2 registers, 32 AVX-512 ones)
constexpr int kSplitMaxNV = simd::W == 16 ? 8 : 6;

// whether a block of nv column vectors sums its k-steps as two chains (two halves of K): the one
// rule shrink_cols runs by and add_chains adds by
constexpr bool two_chains(int64_t nv) { return nv <= kSplitMaxNV; }

// h[0:w] = x[0:K] @ A[:, 0:w] (rows ld apart), NV vectors of columns in registers; the two halves
// of K run side by side (two streams of A, see the top of this file), as two chains of sums that
// are added at the end. Part 0 or 1 stores one chain's sums alone (chain 0: the first half and an
// odd last row; a block of one chain has all of them in chain 0 and stores nothing as part 1), so
// two threads can each run one and add_chains() gives the whole shrink's h bit for bit.
template <int NV, bool Full, int Part, typename T>
__attribute__((always_inline)) inline void shrink_cols(const T* __restrict__ A, int64_t ld, int64_t K, int64_t w,
                                                       const float* __restrict__ x, float* __restrict__ h) {
  constexpr int U = two_chains(NV) ? 2 : 1;
  if constexpr (Part == 1 && U == 1) return;
  simd::M m[NV];
  simd::V acc[U][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    m[v] = simd::mask(w - v * simd::W);
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) acc[u][v] = simd::zero();
  }
  const int64_t half = U == 2 ? K / 2 : 0;
  const T* A1 = A + half * ld;
  const float* x1 = x + half;
  for (int64_t i = 0; i < half; ++i) {
    const simd::V xv0 = simd::set1(x[i]);
    const simd::V xv1 = simd::set1(x1[i]);
    const T* Ai0 = A + i * ld;
    const T* Ai1 = A1 + i * ld;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if constexpr (Part != 1)
        acc[0][v] = simd::fma(xv0, Full ? wload(Ai0 + v * simd::W) : wload(Ai0 + v * simd::W, m[v]), acc[0][v]);
      if constexpr (Part != 0)
        acc[U - 1][v] =
            simd::fma(xv1, Full ? wload(Ai1 + v * simd::W) : wload(Ai1 + v * simd::W, m[v]), acc[U - 1][v]);
    }
  }
  for (int64_t i = 2 * half; i < K && Part != 1; ++i) {
    const simd::V xv = simd::set1(x[i]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[0][v] = simd::fma(xv, Full ? wload(A + i * ld + v * simd::W) : wload(A + i * ld + v * simd::W, m[v]),
                            acc[0][v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    simd::V t = acc[Part == 1 ? U - 1 : 0][v];
    if constexpr (U == 2 && Part < 0) t = simd::add(t, acc[1][v]);
    if (Full) {
      simd::store(h + v * simd::W, t);
    } else {
      simd::store(h + v * simd::W, t, m[v]);
    }
  }
}

template <int NV, int Part, typename T>
void shrink_any(const T* A, int64_t ld, int64_t K, int64_t w, const float* x, float* h) {
  if constexpr (NV > 1) {
    if (w <= (NV - 1) * simd::W) return shrink_any<NV - 1, Part>(A, ld, K, w, x, h);
  }
  if (w == NV * simd::W) {
    shrink_cols<NV, true, Part>(A, ld, K, w, x, h);
  } else {
    shrink_cols<NV, false, Part>(A, ld, K, w, x, h);
  }
}

constexpr int64_t kShrinkCols = 8 * simd::W;  // columns a shrink block holds in registers at most

// h[0:w] = x @ A[:, 0:w] for any w, 8 vectors of columns at a time (Part: shrink_cols)
template <typename T, int Part = -1>
void shrink(const T* A, int64_t ld, int64_t K, int64_t w, const float* x, float* h) {
  for (int64_t c0 = 0; c0 < w; c0 += kShrinkCols)
    shrink_any<8, Part>(A + c0, ld, K, std::min(kShrinkCols, w - c0), x, h + c0);
}

// h[0:w] = the whole shrink from its two chains' sums (shrink<T, 0> into h0, shrink<T, 1> into
// h1), added as shrink_cols adds them: a block of one chain is h0's alone
inline void add_chains(int64_t w, const float* h0, const float* h1, float* h) {
  for (int64_t c0 = 0; c0 < w; c0 += kShrinkCols) {
    const int64_t cw = std::min(kShrinkCols, w - c0), nv = (cw + simd::W - 1) / simd::W;
    for (int64_t c = c0; c < c0 + cw; ++c) h[c] = two_chains(nv) ? h0[c] + h1[c] : h0[c];
  }
}

// f(c0, width) for each run of columns of a [K, G*R] block of G members' A that holds a slot's
// loaded rank rs: full rank is one run of G*R columns; a lower rank, each member's first rs.
template <typename F>
void member_runs(int64_t R, int64_t G, int64_t rs, const F& f) {
  if (rs == R) {
    f(int64_t{0}, G * R);
  } else {
    for (int64_t j = 0; j < G; ++j) f(j * R, rs);
  }
}

// h[j*R : j*R + rs] = x @ A[:, j*R : j*R + rs] for each of the G members (member_runs); Part 0 / 1:
// one chain's sums (shrink_cols), which add_member_chains adds
template <typename T, int Part = -1>
void shrink_members(const T* A, int64_t K, int64_t R, int64_t G, int64_t rs, const float* x, float* h) {
  member_runs(R, G, rs, [&](int64_t c0, int64_t w) { shrink<T, Part>(A + c0, G * R, K, w, x, h + c0); });
}

// shrink_members' h from its two parts' sums
inline void add_member_chains(int64_t R, int64_t G, int64_t rs, const float* h0, const float* h1, float* h) {
  member_runs(R, G, rs, [&](int64_t c0, int64_t w) { add_chains(w, h0 + c0, h1 + c0, h + c0); });
}

// d[0:O] (+)= h[0:rs] @ B[0:rs, 0:O] (Add: onto d's values; else d is overwritten). Rows k and
// k + half of B are read together, two sequential streams (the top of this file says why), d stays
// in L1 and is loaded and stored once per pair of rows; the O / W output vectors of a row are
// independent, so no chain waits on another.
// B's rows are ld apart (ld >= O: a caller may take a range of B's columns).
template <bool Add, typename T>
void expand(const T* __restrict__ B, int64_t ld, int64_t O, int64_t rs, const float* __restrict__ h,
            float* __restrict__ d) {
  const int64_t full = O / simd::W * simd::W;
  const simd::M tail = simd::mask(O - full);
  int64_t k = 0;
  if constexpr (!Add) {
    if (rs <= 0) {
      std::fill(d, d + O, 0.f);
      return;
    }
    const simd::V hv = simd::set1(h[0]);
    for (int64_t o = 0; o < full; o += simd::W) simd::store(d + o, simd::mul(hv, wload(B + o)));
    if (full < O) simd::store(d + full, simd::mul(hv, wload(B + full, tail)), tail);
    k = 1;
  }
  const int64_t half = (rs - k) / 2;
  const T* __restrict__ B1 = B + half * ld;
  for (int64_t e = k + half; k < e; ++k) {  // rows k and k + half: two sequential streams
    const simd::V hv0 = simd::set1(h[k]), hv1 = simd::set1(h[k + half]);
    const T* __restrict__ Bk0 = B + k * ld;
    const T* __restrict__ Bk1 = B1 + k * ld;
    for (int64_t o = 0; o < full; o += simd::W)
      simd::store(d + o, simd::fma(hv1, wload(Bk1 + o), simd::fma(hv0, wload(Bk0 + o), simd::load(d + o))));
    if (full < O) {
      const simd::V d0 = simd::fma(hv0, wload(Bk0 + full, tail), simd::load(d + full, tail));
      simd::store(d + full, simd::fma(hv1, wload(Bk1 + full, tail), d0), tail);
    }
  }
  for (k += half; k < rs; ++k) {
    const simd::V hv = simd::set1(h[k]);
    const T* __restrict__ Bk = B + k * ld;
    for (int64_t o = 0; o < full; o += simd::W) simd::store(d + o, simd::fma(hv, wload(Bk + o), simd::load(d + o)));
    if (full < O) {
      simd::store(d + full, simd::fma(hv, wload(Bk + full, tail), simd::load(d + full, tail)), tail);
    }
  }
}

}  // namespace lora_row
#endif
