// A projection's adapter rows split over the threads of the decode stack's one-region step
// (decode_stack_cpu.cpp `run_region`, up to 4 rows), bit for bit what one thread computes there.
//
// Why: the region used to add each projection's deltas on one thread while the others waited at
// the next barrier. At batch 1 with one rank-8 adapter on all seven projections of SmolLM2-135M
// (int8 weights, 2-core Zen 4) that was ~1 ms of a 5.7 ms step: 209.5 tok/s without the adapter,
// 175.2 with it. The split needs no new arithmetic: a row's shrink already sums the two halves of
// A's rows as two chains added at the end (lora_row.h: two streams), so two threads each run one
// chain, before the projection's base panels (its input is ready then), and each adds the two;
// the expand's output columns are independent, so each thread takes the columns whose base it
// computed (still in its cache) and adds their deltas as the per-kernel path adds them: each row's
// delta apart and then added where that path takes the fused pass (lora_deltas), else straight
// onto the output (lora_rows' row kernel).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "lora_row.h"
#include "simd.h"
#include "slot_table.h"
#include "widen.h"

namespace region_lora {

constexpr int kMaxMembers = 4;

// One projection group's adapter side in one layer, for this step's rows: what every thread of
// the region reads, built once before it
struct Split {
  const int64_t* rows = nullptr;   // [N] the rows with an adapter
  const int64_t* slots = nullptr;  // [N] their slots
  int64_t N = 0;
  const int64_t* slot_rank = nullptr;  // [S] or null: all R
  const void* a = nullptr;             // [S, K, G*R] fp32 or bf16
  int64_t a_slot = 0, K = 0, R = 0, G = 0;
  bool bf16 = false;
  const void* b[kMaxMembers] = {};  // each member's B [S, R, out]
  int64_t b_slot[kMaxMembers] = {}, out[kMaxMembers] = {}, start[kMaxMembers] = {};
  bool deltas = false;  // each row's delta apart, then added (lora_deltas); else onto y (row kernel)
  bool on = false;      // whether this projection splits at all (else one thread, as before)

  int64_t rank(int64_t s) const { return slot_rank ? std::clamp<int64_t>(slot_rank[s], 0, R) : R; }
  int64_t gr() const { return G * R; }
};

// a thread's buffers, kept across the projections of a step: one row's h, one member's deltas
struct Scratch {
  std::vector<float> h, d;
};

// The split of a projection, or off where it would not be bit for bit the per-kernel path's:
// lora_rows runs consecutive rows of one slot as a block (other sums), so those stay on one thread.
// `a`, `bs`: the group's table views; `bounds`: each member's output columns; M rows of K inputs;
// `deltas`: whether the per-kernel path takes the fused pass for these rows.
inline Split make_split(const torch::Tensor& rows, const torch::Tensor& slots,
                        const std::optional<torch::Tensor>& slot_rank, const torch::Tensor& a,
                        const std::vector<torch::Tensor>& bs, const std::vector<std::pair<int64_t, int64_t>>& bounds,
                        int64_t M, int64_t K, bool deltas) {
  Split s;
  if (!LORASERVE_SIMD) return s;  // the portable build: one thread, lora_rows' scalar loops
  const int64_t G = static_cast<int64_t>(bs.size()), N = rows.numel();
  const bool table = (a.scalar_type() == torch::kFloat32 || a.scalar_type() == torch::kBFloat16) && slot_matrices(a);
  if (G == 0 || G > kMaxMembers || !table || a.size(1) != K || a.size(2) % G != 0 ||
      rows.scalar_type() != torch::kInt64 || slots.scalar_type() != torch::kInt64 || !rows.is_contiguous() ||
      !slots.is_contiguous() || slots.numel() != N || static_cast<int64_t>(bounds.size()) != G)
    return s;  // anything unusual: the per-kernel call, which checks and says why
  s.rows = rows.data_ptr<int64_t>(), s.slots = slots.data_ptr<int64_t>(), s.N = N;
  const int64_t S = a.size(0);
  for (int64_t e = 0; e < N; ++e) {
    if (s.rows[e] < 0 || s.rows[e] >= M || s.slots[e] < 0 || s.slots[e] >= S) return Split{};
    if (!deltas && e > 0 && s.slots[e] == s.slots[e - 1]) return Split{};
  }
  if (slot_rank) {
    if (slot_rank->scalar_type() != torch::kInt64 || !slot_rank->is_contiguous() || slot_rank->numel() != S)
      return Split{};
    s.slot_rank = slot_rank->data_ptr<int64_t>();
  }
  s.a = a.data_ptr(), s.a_slot = a.stride(0), s.K = a.size(1), s.G = G, s.R = a.size(2) / G;
  s.bf16 = a.scalar_type() == torch::kBFloat16;
  for (int64_t j = 0; j < G; ++j) {
    const torch::Tensor& b = bs[j];
    if (!slot_matrices(b) || b.scalar_type() != a.scalar_type() || b.size(0) != S || b.size(1) != s.R ||
        bounds[j].second - bounds[j].first != b.size(2))
      return Split{};
    s.b[j] = b.data_ptr(), s.b_slot[j] = b.stride(0), s.out[j] = b.size(2), s.start[j] = bounds[j].first;
  }
  s.deltas = deltas;
  s.on = true;
  return s;
}

#if LORASERVE_SIMD
template <typename T, int Part>
void shrink_part_t(const Split& s, const float* x, int64_t ldx, float* hp) {
  const T* a = static_cast<const T*>(s.a);
  for (int64_t e = 0; e < s.N; ++e) {
    const int64_t slot = s.slots[e], rs = s.rank(slot);
    if (rs > 0)
      lora_row::shrink_members<T, Part>(a + slot * s.a_slot, s.K, s.R, s.G, rs, x + s.rows[e] * ldx, hp + e * s.gr());
  }
}

// Chain `part` (0 or 1) of every row's shrink into hp [N, G*R]: two threads run one each
inline void shrink_part(const Split& s, const float* x, int64_t ldx, int part, float* hp) {
  if (s.bf16) {
    part == 0 ? shrink_part_t<widen::bf16_t, 0>(s, x, ldx, hp) : shrink_part_t<widen::bf16_t, 1>(s, x, ldx, hp);
  } else {
    part == 0 ? shrink_part_t<float, 0>(s, x, ldx, hp) : shrink_part_t<float, 1>(s, x, ldx, hp);
  }
}

template <typename T>
void add_cols_t(const Split& s, const float* h0, const float* h1, float* y, int64_t n,
                const std::pair<int64_t, int64_t>* ranges, int nranges, Scratch& sc) {
  const int64_t GR = s.gr();
  std::vector<float>& h = sc.h;
  h.resize(static_cast<size_t>(GR));
  for (int64_t e = 0; e < s.N; ++e) {
    const int64_t slot = s.slots[e], rs = s.rank(slot);
    if (rs == 0) continue;  // a zero delta: nothing changes
    lora_row::add_member_chains(s.R, s.G, rs, h0 + e * GR, h1 + e * GR, h.data());
    float* yr = y + s.rows[e] * n;
    for (int64_t j = 0; j < s.G; ++j) {
      const T* B = static_cast<const T*>(s.b[j]) + slot * s.b_slot[j];
      for (int q = 0; q < nranges; ++q) {
        const int64_t lo = std::max(ranges[q].first, s.start[j]) - s.start[j];
        const int64_t hi = std::min(ranges[q].second, s.start[j] + s.out[j]) - s.start[j];
        if (lo >= hi) continue;
        float* ye = yr + s.start[j] + lo;
        if (s.deltas) {
          sc.d.resize(static_cast<size_t>(hi - lo));
          lora_row::expand<false>(B + lo, s.out[j], hi - lo, rs, h.data() + j * s.R, sc.d.data());
          const float* d = sc.d.data();
#pragma omp simd
          for (int64_t c = 0; c < hi - lo; ++c) ye[c] += d[c];
        } else {
          lora_row::expand<true>(B + lo, s.out[j], hi - lo, rs, h.data() + j * s.R, ye);
        }
      }
    }
  }
}

// Every row's delta onto y [M, n]'s output columns in `ranges` (this thread's), from both chains'
// sums (h0, h1: shrink_part 0 and 1)
inline void add_cols(const Split& s, const float* h0, const float* h1, float* y, int64_t n,
                     const std::pair<int64_t, int64_t>* ranges, int nranges, Scratch& sc) {
  if (s.bf16) {
    add_cols_t<widen::bf16_t>(s, h0, h1, y, n, ranges, nranges, sc);
  } else {
    add_cols_t<float>(s, h0, h1, y, n, ranges, nranges, sc);
  }
}

#else
// never called: make_split keeps every projection on one thread
inline void shrink_part(const Split&, const float*, int64_t, int, float*) {}
inline void add_cols(const Split&, const float*, const float*, float*, int64_t, const std::pair<int64_t, int64_t>*, int,
                     Scratch&) {}
#endif

}  // namespace region_lora
