// The fused decode pass: the fp32 panel GEMM plus every row's own LoRA in one call
// (panel_lora_linear), and the same deltas alone for the decode stack's one-region step
// (lora_deltas).
//
// Why fused: at decode sizes (up to 96 rows) the base GEMM is bound by its FMAs while each row's
// LoRA is a stream of its adapter's A and B (~625 MB a step with 32 distinct rank-16 adapters on
// the 135M shape, more than the base weights); run between the panels, with the panels fetching
// the rows' A and B ahead (LoraPf), that stream overlaps the FMAs instead of following them. The
// base product is panel_linear's bit for bit: the same register kernels (panel_kernels.h) over
// the same panels.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "lora_row.h"
#include "panel_kernels.h"
#include "simd.h"
#include "slot_table.h"

using namespace fp32_panel;

namespace {

#if LORASERVE_SIMD
// fewest rows whose fused decode pass also fetches its adapter rows' A and B (LoraPf): fewer rows
// leave the FMAs too little time to hide the extra stream (8 and 16 rows measured level, within
// 1 ms either way on both builds; 24 / 32 / 64 rows 5 / 6 / 9 ms faster, panel_lora_linear)
constexpr int64_t kLoraPfMinRows = 20;

// A span of memory to fetch, in 64-byte lines
struct Lines {
  const char* base;
  int64_t n;
};
constexpr int kLoraPfSpans = 16;  // adapter spans one panel fetches at most (the rest stay on demand)

// SpanPf's next panel, plus the spans the adapter rows that run right after this panel read (each
// row's A and its members' B, walked in order), at `rate` / 256 lines per k-step (at most two)
struct LoraPf {
  static constexpr bool kOn = true;
  SpanPf panel;
  const char* base = nullptr;  // the span being fetched
  int64_t pos = 0, end = 0;
  const Lines* next = nullptr;  // the spans after it
  const Lines* last = nullptr;
  int64_t rate = 0, credit = 0;
  __attribute__((always_inline)) void one() {
    if (pos < end) {
      _mm_prefetch(base + 64 * pos++, _MM_HINT_T1);
    } else if (next < last) {
      base = next->base, end = next->n, pos = 0;
      ++next;
      _mm_prefetch(base + 64 * pos++, _MM_HINT_T1);
    }
  }
  __attribute__((always_inline)) void step() {
    panel.step();
    credit += rate;
    if (credit >= 256) {
      credit -= 256;
      one();
      if (credit >= 256) {
        credit -= 256;
        one();
      }
    }
  }
};

// a fused pass's adapter side: the table, its entries, and where each entry's delta goes
struct LoraRows {
  const float* x;
  int64_t ldx;
  slot_table::Table t;  // fp32
  slot_table::Rows e;
  float* d;  // [N, n]: each entry's delta, added to y once every panel is stored
  int64_t n;
};

// entry e: d[e] = the delta of its row under its slot's adapter, every member side by side
void lora_unit(const LoraRows& L, int64_t e, float* h) {
  const slot_table::Table& t = L.t;
  const int64_t s = L.e.slots[e], rs = t.rank(s);
  float* de = L.d + e * L.n;
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

// decode_panel for the fused pass: also fetches the adapter rows' spans (`lines` lines in all),
// spread evenly over the panel's k-steps; the caller gives spans only from kLoraPfMinRows rows
void decode_panel_lora(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t n,
                       const float* bias, int64_t p, bool next, const Lines* spans, int nspans,
                       int64_t lines, float* y) {
  if (nspans == 0) return decode_panel(x, ldx, M, K, w, n, bias, p, next, y);
  const Tile t = Tile::of(w, K, bias, n, p);
  LoraPf pf;
  if (next) pf.panel = SpanPf::panel(w + (p + 1) * K * kNR, K);
  pf.next = spans;
  pf.last = spans + nspans;
  const int64_t steps = panel_k_steps(M, K);
  pf.rate = std::min<int64_t>(512, (lines * 256 + steps - 1) / steps);
  panel_rows(x, ldx, &t, 1, M, y + p * kNR, n, pf);
}

// The adapter rows of a fused pass, checked: x [M, K] rows, a [S, K, G*R] fp32, each member's B
// [S, R, out_j] side by side over n output columns
LoraRows lora_rows_args(const torch::Tensor& x, int64_t n, const torch::Tensor& rows, const torch::Tensor& slots,
                        const torch::Tensor& a, const std::vector<torch::Tensor>& bs,
                        const std::optional<torch::Tensor>& slot_rank) {
  using slot_table::OnBad;
  TORCH_CHECK(a.scalar_type() == torch::kFloat32, "a must be float32 (bf16 tables take lora_rows)");
  const slot_table::Table t = *slot_table::table(a, bs, slot_rank, x.size(1), OnBad::raise);
  const slot_table::Rows e = *slot_table::rows(rows, slots, x.size(0), t.S, OnBad::raise);
  slot_table::check_covers(t, n);
  return LoraRows{x.data_ptr<float>(), x.stride(0), t, e, nullptr, n};
}

// every panel is stored: add the deltas (in L2 by now)
void add_deltas(const LoraRows& L, int64_t N, float* yp) {
  const int64_t n = L.n;
  for (int64_t e = 0; e < N; ++e) {
    float* __restrict__ ye = yp + L.e.rows[e] * n;
    const float* __restrict__ de = L.d + e * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) ye[c] += de[c];
  }
}
#endif

}  // namespace

// y = x @ W.T + b, plus for every n: y[rows[n]] += (x[rows[n]] @ a[slots[n]]) @ [bs[0] | bs[1] | ...][slots[n]]
// (the members' outputs side by side, as in lora_rows). Decode sizes only (at most 96 rows): each
// row's LoRA runs between two panels, into a delta buffer added once every panel is stored.
// Each panel also fetches, spread evenly over its k-steps (LoraPf), the A and B of the rows that
// run right after it, so they read L2 instead of DRAM and their stream overlaps the GEMM's FMAs.
// 30 layers of the SmolLM projections, 32 rows, 32 distinct rank-16 adapters, 2-core Zen 4 EPYC
// (AVX-512, ~31 GB/s), alternated in one process: 56.2 -> 49.4-51.0 ms (base GEMM alone 36.3);
// 16 rows 36.4 -> 31.0-33.8 ms. The fetch alone (no rows run) costs the GEMM 8 ms there: the
// two streams share ~23 GB/s. Earlier, on a 2-core Xeon with AMX (~14 GB/s a core), a list of
// the next rows' lines, one prefetch per k-step, lost to fetching nothing (70.5 vs 66.6 ms), as
// did every 2nd / 4th line, the first line of each 4 KB page, demand loads and two lines per
// k-step (72-86 ms); that list cost a load per line and came in bursts, where this walks a few
// spans at the rate the rows need.
torch::Tensor panel_lora_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                                const std::optional<torch::Tensor>& bias, const torch::Tensor& rows,
                                const torch::Tensor& slots, const torch::Tensor& a, const std::vector<torch::Tensor>& bs,
                                const std::optional<torch::Tensor>& slot_rank) {
  check_panel_args(x, w, n, bias);
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  TORCH_CHECK(M <= kMC, "panel_lora_linear takes at most ", kMC, " rows, got ", M);
  auto y = torch::empty({M, n}, x.options());
#if LORASERVE_SIMD
  LoraRows L = lora_rows_args(x, n, rows, slots, a, bs, slot_rank);
  const int64_t N = L.e.N, GR = L.t.gr();
  if (M == 0) return y;
  auto d = torch::empty({N, n}, x.options());
  L.d = d.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
    // this thread's share of the LoRA entries, in proportion to its panels, spread evenly between them
    const int64_t e_lo = N * lo / P, e_hi = N * hi / P;
    std::vector<float> h(GR);
    int64_t e = e_lo;
    Lines spans[kLoraPfSpans];
    int64_t fetched = -1;  // the slot whose spans this thread fetched last
    const bool fetch = M >= kLoraPfMinRows;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t target = e_lo + (e_hi - e_lo) * (p - lo + 1) / (hi - lo);
      // what the entries run after this panel read: each one's A and its members' B
      int ns = 0;
      int64_t lines = 0;
      auto span = [&](const float* b, int64_t floats) {
        if (ns == kLoraPfSpans || floats <= 0) return;
        const uintptr_t a0 = reinterpret_cast<uintptr_t>(b) & ~uintptr_t{63};
        const uintptr_t a1 = reinterpret_cast<uintptr_t>(b + floats);
        spans[ns++] = Lines{reinterpret_cast<const char*>(a0), static_cast<int64_t>((a1 - a0 + 63) / 64)};
        lines += spans[ns - 1].n;
      };
      for (int64_t u = e; u < target && fetch; ++u) {
        const int64_t s = L.e.slots[u], rs = L.t.rank(s);
        if (rs == 0 || s == fetched) continue;  // nothing to read, or this thread just fetched it
        fetched = s;
        span(L.t.a_of<float>(s), L.t.K * GR);
        for (int64_t j = 0; j < L.t.G; ++j) span(L.t.b_of<float>(j, s), rs * L.t.out[j]);
      }
      decode_panel_lora(xp, ldx, M, K, wp, n, bp, p, p + 1 < hi, spans, ns, lines, yp);
      for (; e < target; ++e) lora_unit(L, e, h.data());
    }
  });
  add_deltas(L, N, yp);
  return y;
#else
  TORCH_CHECK(false, "panel_lora_linear needs an AVX-512 or AVX2+FMA build");
#endif
}

// y [M, n] (contiguous) += what panel_lora_linear adds to its base product: each adapter row's
// delta computed apart, then added. The decode stack's one-region step (decode_stack_cpu.cpp)
// computes the base by panel ranges and then this, so its result is the fused pass's bit for bit.
void lora_deltas(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& rows, const torch::Tensor& slots,
                 const torch::Tensor& a, const std::vector<torch::Tensor>& bs,
                 const std::optional<torch::Tensor>& slot_rank) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [M, K] tensor with contiguous rows");
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0),
              "y must be a contiguous float32 [M, n] tensor");
#if LORASERVE_SIMD
  LoraRows L = lora_rows_args(x, y.size(1), rows, slots, a, bs, slot_rank);
  const int64_t N = L.e.N;
  auto d = torch::empty({N, y.size(1)}, x.options());
  L.d = d.data_ptr<float>();
  std::vector<float> h(L.t.gr());
  for (int64_t e = 0; e < N; ++e) lora_unit(L, e, h.data());
  add_deltas(L, N, y.data_ptr<float>());
#else
  TORCH_CHECK(false, "lora_deltas needs an AVX-512 or AVX2+FMA build");
#endif
}
