// The adapter side of the fused decode passes: each row's own LoRA run between the panels of the
// base GEMM, what it reads fetched by the panel before (fetch_policy.h Spans). Two drivers, each
// handed the kernel that computes one panel while stepping the spans: `run` (fp32 panels,
// gemm_lora_cpu.cpp panel_lora_linear) runs each row's whole LoRA between two panels, its A and B
// fetched ahead, into a buffer added once every panel is stored, the arithmetic the decode stack's
// one-region step shares (lora_deltas); `run_by_columns` (bf16 / int8 panels,
// gemm_lowp_lora_cpu.cpp) runs the shrinks between the panels, their A fetched ahead, and adds
// the deltas onto y's columns after them (run_by_columns_as says why).
//
// Why: at decode sizes (up to 96 rows) the base GEMM is bound by its FMAs while each row's LoRA
// is a stream of its adapter's A and B (313 MB a step in bf16, 625 MB in fp32, with 32 distinct
// rank-16 adapters on the 135M shape: more than the int8 base weights); run between the panels,
// with the panels fetching what the rows read ahead, that stream overlaps the FMAs instead of
// following them.
#pragma once

#include "aten_min.h"
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "fetch_policy.h"
#include "lora_row.h"
#include "simd.h"
#include "slot_table.h"
#include "widen.h"

namespace fused_lora {

#if LORASERVE_SIMD
using fetch_policy::Lines;

// fewest rows whose fused decode pass also fetches its adapter rows' A and B: fewer rows leave
// the FMAs too little time to hide the extra stream (fp32 panels, 8 and 16 rows measured level,
// within 1 ms either way on both builds; 24 / 32 / 64 rows 5 / 6 / 9 ms faster)
constexpr int64_t kLoraPfMinRows = 20;
constexpr int kLoraPfSpans = 16;  // adapter spans one panel fetches at most (the rest stay on demand)
constexpr int64_t kPanelCols = 32;  // output columns of a panel (fp32 and low-precision panels alike)

// a fused pass's adapter side: the rows of x, the table, its entries, and y's width
struct LoraRows {
  const float* x;
  int64_t ldx;
  slot_table::Table t;
  slot_table::Rows e;
  int64_t n;
};

// entry e of an fp32 table into d [N, n] (the entries' deltas, added to y once every panel is
// stored): d[e] = the delta of its row under its slot's adapter, every member side by side
inline void lora_unit(const LoraRows& L, float* d, int64_t e, float* h) {
  const slot_table::Table& t = L.t;
  const int64_t s = L.e.slots[e], rs = t.rank(s);
  float* de = d + e * L.n;
  if (rs == 0) {
    std::fill(de, de + L.n, 0.f);
    return;
  }
  const float* x = L.x + L.e.rows[e] * L.ldx;
  lora_row::shrink_members(t.a_of<float>(s), t.K, t.R, t.G, rs, x, h);
  for (int64_t j = 0; j < t.G; ++j) {
    lora_row::expand<false>(t.b_of<float>(j, s), t.out[j], t.out[j], rs, h + j * t.R, de + t.off[j]);
  }
}

// the lines [p, p + bytes) touches, or `rows` such runs `stride` bytes apart
inline Lines lines_of(const void* p, int64_t bytes, int64_t rows = 1, int64_t stride = 0) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t a1 = reinterpret_cast<uintptr_t>(p) + bytes;
  return Lines{reinterpret_cast<const char*>(a0), static_cast<int64_t>((a1 - a0 + 63) / 64), rows, stride};
}

// The adapter rows of a fused pass, checked: x [M, K] rows, a [S, K, G*R] (fp32, or bf16 where
// `bf16_ok`), each member's B [S, R, out_j] side by side over n output columns
inline LoraRows rows_args(const at::Tensor& x, int64_t n, const at::Tensor& rows, const at::Tensor& slots,
                          const at::Tensor& a, const std::vector<at::Tensor>& bs,
                          const std::optional<at::Tensor>& slot_rank, bool bf16_ok) {
  using slot_table::OnBad;
  TORCH_CHECK(a.scalar_type() == at::kFloat || bf16_ok, "a must be float32 (bf16 tables take lora_rows)");
  const slot_table::Table t = *slot_table::table(a, bs, slot_rank, x.size(1), OnBad::raise);
  const slot_table::Rows e = *slot_table::rows(rows, slots, x.size(0), t.S, OnBad::raise);
  slot_table::check_covers(t, n);
  return LoraRows{x.data_ptr<float>(), x.stride(0), t, e, n};
}

// every panel is stored: add the deltas (in L2 by now; each thread adding those of its own
// panels' columns measured the same: 30 layers, 32 rows, AVX2 int8)
inline void add_deltas(const LoraRows& L, const float* d, float* yp) {
  const int64_t n = L.n;
  for (int64_t e = 0; e < L.e.N; ++e) {
    float* __restrict__ ye = yp + L.e.rows[e] * n;
    const float* __restrict__ de = d + e * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) ye[c] += de[c];
  }
}

// The fused pass over P panels of M rows into y [M, L.n] (an fp32 table), each entry's delta
// into d ([L.e.N, L.n] floats) and added at the end.
// Each thread takes its panels in order and, after each, its share of the entries (in proportion
// to its panels, spread evenly between them). `panel(p, next, spans, ns, lines)` computes panel p
// (next: this thread takes p + 1 after it), fetching meanwhile the ns spans (`lines` lines in
// all) that the entries run right after it read: each one's A and its members' B, from
// kLoraPfMinRows rows (none below).
template <typename PanelFn>
void run(const LoraRows& L, float* d, int64_t M, int64_t P, float* y, const PanelFn& panel) {
  const int64_t N = L.e.N, GR = L.t.gr();
  at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
    const int64_t e_lo = N * lo / P, e_hi = N * hi / P;
    std::vector<float> h(GR);
    int64_t e = e_lo;
    Lines spans[kLoraPfSpans];
    int64_t fetched = -1;  // the slot whose spans this thread fetched last
    const bool fetch = M >= kLoraPfMinRows;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t target = e_lo + (e_hi - e_lo) * (p - lo + 1) / (hi - lo);
      int ns = 0;
      int64_t lines = 0;
      auto span = [&](const float* b, int64_t floats) {
        if (ns == kLoraPfSpans || floats <= 0) return;
        spans[ns++] = lines_of(b, floats * 4);
        lines += spans[ns - 1].n;
      };
      for (int64_t u = e; u < target && fetch; ++u) {
        const int64_t s = L.e.slots[u], rs = L.t.rank(s);
        if (rs == 0 || s == fetched) continue;  // nothing to read, or this thread just fetched it
        fetched = s;
        span(L.t.a_of<float>(s), L.t.K * GR);
        for (int64_t j = 0; j < L.t.G; ++j) span(L.t.b_of<float>(j, s), rs * L.t.out[j]);
      }
      panel(p, p + 1 < hi, spans, ns, lines);
      for (; e < target; ++e) lora_unit(L, d, e, h.data());
    }
  });
  add_deltas(L, d, y);
}

// The fused pass with each row's delta added straight onto y's columns instead of into a buffer
// added at the end: the shrinks (x @ A, all rows' h) run between the first half of each thread's
// panels, their A fetched by the panel before; after a barrier (every h is then computed) each
// thread computes the second half of its panels and then adds every row's delta onto its own
// columns, entry by entry (h @ B[:, those columns], each B row read as one run of the thread's
// columns). Why the buffer went: its add was a second pass over every row's outputs, on one
// thread, from the other core's cache (30 layers, 32 rows on 32 distinct rank-16 bf16 adapters,
// int8 panels, AVX2, 2-core Zen 4, tables in L3: 42.9 ms, 38.7 without the add).
// Why the expands follow the panels rather than run between them: between them they went panel by
// panel, 128 bytes of each of a row's 16 B rows at a time, fetched by the panel before; with the
// tables in DRAM (as they are when serving: 625 MB a step in fp32) those scattered 128-byte reads
// cost more than the overlap won, and the fetches slowed the panels' FMAs. SmolLM2-135M, 32 rows
// on 32 distinct adapters, AVX2, 2-core Zen 3, modes alternated on one engine, a decode step:
// int8 (fp32 table) 154 -> 131 ms and 165 -> 138 ms, int8-bf16 (bf16 table) 144 -> 123 ms
// (base model 92 ms); the shrinks' fetches between the panels measured level with none there.
// Each row's delta is the row kernel's arithmetic (lora_rows on one row: shrink_members, then
// expand onto y), column for column.
// (the body for tables of E: float or widen::bf16_t)
template <typename E, typename PanelFn>
void run_by_columns_as(const LoraRows& L, int64_t M, int64_t P, float* y, const PanelFn& panel) {
  const slot_table::Table& t = L.t;
  const int64_t N = L.e.N, GR = t.gr(), n = L.n;
  constexpr int64_t esize = sizeof(E);
  std::vector<float> hs(static_cast<size_t>(std::max<int64_t>(N * GR, 1)));
  const bool fetch = M >= kLoraPfMinRows;
  // entry e's h = x[row] @ A (all members), the row kernel's shrink
  auto shrink = [&](int64_t e) {
    const int64_t s = L.e.slots[e], rs = t.rank(s);
    if (rs == 0) return;
    const float* x = L.x + L.e.rows[e] * L.ldx;
    lora_row::shrink_members(t.a_of<E>(s), t.K, t.R, t.G, rs, x, hs.data() + e * GR);
  };
  // entry e's delta onto y's columns of panels [q0, q1): each member's part of them, its B rows
  // read as runs of those columns
  auto expand_cols = [&](int64_t e, int64_t q0, int64_t q1) {
    const int64_t s = L.e.slots[e], rs = t.rank(s);
    if (rs == 0 || q0 >= q1) return;
    float* yr = y + L.e.rows[e] * n;
    const float* h = hs.data() + e * GR;
    const int64_t c0 = q0 * kPanelCols, c1 = std::min(n, q1 * kPanelCols);
    for (int64_t j = 0; j < t.G; ++j) {
      const auto [lo, hi] = t.member_cols(j, c0, c1);
      if (lo < hi) lora_row::expand<true>(t.b_of<E>(j, s) + lo, t.out[j], hi - lo, rs, h + j * t.R, yr + t.off[j] + lo);
    }
  };
  const int threads = static_cast<int>(at::get_num_threads());
#pragma omp parallel num_threads(threads)
  {
    const int th = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = P * th / T, hi = P * (th + 1) / T, mid = lo + (hi - lo + 1) / 2;
    const int64_t e_lo = N * th / T, e_hi = N * (th + 1) / T;
    std::vector<Lines> spans;
    int64_t e = e_lo;
    // the first half: this thread's shrinks, spread evenly between its panels
    for (int64_t p = lo; p < mid; ++p) {
      const int64_t target = e_lo + (e_hi - e_lo) * (p - lo + 1) / (mid - lo);
      spans.clear();
      int64_t lines = 0;
      for (int64_t u = e; u < target && fetch; ++u) {
        const int64_t s = L.e.slots[u];
        if (t.rank(s) == 0) continue;
        spans.push_back(lines_of(t.a_of<E>(s), t.K * GR * esize));
        lines += spans.back().lines();
      }
      panel(p, p + 1 < hi, spans.data(), static_cast<int>(spans.size()), lines);
      for (; e < target; ++e) shrink(e);
    }
    for (; e < e_hi; ++e) shrink(e);  // a thread without panels still shrinks its rows
#pragma omp barrier
    // the second half of this thread's panels, then every row's delta onto its columns
    for (int64_t p = mid; p < hi; ++p) panel(p, p + 1 < hi, nullptr, 0, 0);
    for (int64_t f = 0; f < N; ++f) expand_cols(f, lo, hi);
  }
}

template <typename PanelFn>
void run_by_columns(const LoraRows& L, int64_t M, int64_t P, float* y, const PanelFn& panel) {
  if (L.t.bf16) run_by_columns_as<widen::bf16_t>(L, M, P, y, panel);
  else run_by_columns_as<float>(L, M, P, y, panel);
}
#endif

}  // namespace fused_lora
