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

#include "aten_min.h"

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

using slot_table::kMaxMembers;

// One projection group's adapter side in one layer, for this step's rows: what every thread of
// the region reads, built once before it
struct Split {
  slot_table::Table t;
  slot_table::Rows e;                   // the rows with an adapter, and their slots
  int64_t start[kMaxMembers] = {};      // each member's first output column
  bool deltas = false;  // each row's delta apart, then added (lora_deltas); else onto y (row kernel)
  bool on = false;      // whether this projection splits at all (else one thread, as before)
};

// a thread's buffers, kept across the projections of a step: one row's h, one member's deltas
struct Scratch {
  std::vector<float> h, d;
};

// The split of a projection, or off where it would not be bit for bit the per-kernel path's:
// lora_rows runs consecutive rows of one slot as a block (other sums), so those stay on one thread.
// `a`, `bs`: the group's table views; `bounds`: each member's output columns; M rows of K inputs;
// `deltas`: whether the per-kernel path takes the fused pass for these rows. Anything the table's
// checks refuse is off too: the per-kernel call then runs, and raises saying why.
inline Split make_split(const at::Tensor& rows, const at::Tensor& slots,
                        const std::optional<at::Tensor>& slot_rank, const at::Tensor& a,
                        const std::vector<at::Tensor>& bs, const std::vector<std::pair<int64_t, int64_t>>& bounds,
                        int64_t M, int64_t K, bool deltas) {
  using slot_table::OnBad;
  Split s;
  if (!LORASERVE_SIMD) return s;  // the portable build: one thread, lora_rows' scalar loops
  const std::optional<slot_table::Table> t = slot_table::table(a, bs, slot_rank, K, OnBad::decline);
  if (!t || static_cast<int64_t>(bounds.size()) != t->G) return s;
  const std::optional<slot_table::Rows> e = slot_table::rows(rows, slots, M, t->S, OnBad::decline);
  if (!e) return s;
  for (int64_t i = 1; i < e->N && !deltas; ++i) {
    if (e->slots[i] == e->slots[i - 1]) return s;
  }
  for (int64_t j = 0; j < t->G; ++j) {
    if (bounds[j].second - bounds[j].first != t->out[j]) return s;
    s.start[j] = bounds[j].first;
  }
  s.t = *t, s.e = *e, s.deltas = deltas, s.on = true;
  return s;
}

#if LORASERVE_SIMD
template <typename T, int Part>
void shrink_part_t(const Split& s, const float* x, int64_t ldx, float* hp) {
  const slot_table::Table& t = s.t;
  for (int64_t e = 0; e < s.e.N; ++e) {
    const int64_t slot = s.e.slots[e], rs = t.rank(slot);
    if (rs > 0)
      lora_row::shrink_members<T, Part>(t.a_of<T>(slot), t.K, t.R, t.G, rs, x + s.e.rows[e] * ldx, hp + e * t.gr());
  }
}

// Chain `part` (0 or 1) of every row's shrink into hp [N, G*R]: two threads run one each
inline void shrink_part(const Split& s, const float* x, int64_t ldx, int part, float* hp) {
  if (s.t.bf16) {
    part == 0 ? shrink_part_t<widen::bf16_t, 0>(s, x, ldx, hp) : shrink_part_t<widen::bf16_t, 1>(s, x, ldx, hp);
  } else {
    part == 0 ? shrink_part_t<float, 0>(s, x, ldx, hp) : shrink_part_t<float, 1>(s, x, ldx, hp);
  }
}

template <typename T>
void add_cols_t(const Split& s, const float* h0, const float* h1, float* y, int64_t n,
                const std::pair<int64_t, int64_t>* ranges, int nranges, Scratch& sc) {
  const slot_table::Table& t = s.t;
  const int64_t GR = t.gr();
  std::vector<float>& h = sc.h;
  h.resize(static_cast<size_t>(GR));
  for (int64_t e = 0; e < s.e.N; ++e) {
    const int64_t slot = s.e.slots[e], rs = t.rank(slot);
    if (rs == 0) continue;  // a zero delta: nothing changes
    lora_row::add_member_chains(t.R, t.G, rs, h0 + e * GR, h1 + e * GR, h.data());
    float* yr = y + s.e.rows[e] * n;
    for (int64_t j = 0; j < t.G; ++j) {
      const T* B = t.b_of<T>(j, slot);
      for (int q = 0; q < nranges; ++q) {
        const int64_t lo = std::max(ranges[q].first, s.start[j]) - s.start[j];
        const int64_t hi = std::min(ranges[q].second, s.start[j] + t.out[j]) - s.start[j];
        if (lo >= hi) continue;
        float* ye = yr + s.start[j] + lo;
        if (s.deltas) {
          sc.d.resize(static_cast<size_t>(hi - lo));
          lora_row::expand<false>(B + lo, t.out[j], hi - lo, rs, h.data() + j * t.R, sc.d.data());
          const float* d = sc.d.data();
#pragma omp simd
          for (int64_t c = 0; c < hi - lo; ++c) ye[c] += d[c];
        } else {
          lora_row::expand<true>(B + lo, t.out[j], hi - lo, rs, h.data() + j * t.R, ye);
        }
      }
    }
  }
}

// Every row's delta onto y [M, n]'s output columns in `ranges` (this thread's), from both chains'
// sums (h0, h1: shrink_part 0 and 1)
inline void add_cols(const Split& s, const float* h0, const float* h1, float* y, int64_t n,
                     const std::pair<int64_t, int64_t>* ranges, int nranges, Scratch& sc) {
  if (s.t.bf16) {
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
