// Multi-LoRA for CPU steps: one call per projection group and layer, any mix of adapters.
//
// Why a kernel: a decode step with 32 rows on 32 adapters must stream every row's
// A and B matrices once (625 MB of fp32 per step on a 135M model, more than the
// base weights), and expressed as batched matmuls it costs ~18 small ops per layer
// whose GEMV-shaped batches reach ~24 GB/s. Here each row streams its own A and B
// exactly once, straight from the slot table, and accumulates into the (L1-resident)
// output row: no padding, no gathers, no temporaries, one parallel region. Prefill
// segments go through the same entry point in blocks of tokens (12 with AVX-512, 6 with AVX2)
// that share each pass over A and B, register-blocked like the panel GEMM, which also writes straight into
// the column slices of the fused q/k/v and gate/up outputs where `baddbmm_` on those
// strided views falls back to one small GEMM per slot.
//
// The slot table may hold fp32 or bf16 (`--adapter-dtype bfloat16`, the default when serving
// bf16): bf16 values are widened to fp32 in registers as they stream (a shift), so a bf16 table
// costs half the bytes of an fp32 one and the sums stay fp32; PyTorch's bf16 bmm path, which it
// replaces, ran at ~1/3 of the fp32 kernel's speed on a CPU without AMX.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "lora_row.h"
#include "panel_hook.h"
#include "simd.h"
#include "slot_table.h"
#include "widen.h"

namespace {

using widen::bf16_t;
using widen::to_f;
#if LORASERVE_SIMD
using widen::wload;
#endif

void check_f32_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a CPU float32 tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

template <typename T>  // the table's element: float or bf16_t
struct Group {
  slot_table::Table t;
  std::vector<float*> y;  // member j's outputs, rows y_row[j] floats apart
  std::vector<int64_t> y_row;

  const T* A(int64_t slot) const { return t.a_of<T>(slot); }
  const T* B(int64_t j, int64_t slot) const { return t.b_of<T>(j, slot); }
};

// One row at a time (decodes): stream A and B sequentially, once, the output row stays in L1.
// SIMD builds keep the shrink's columns in registers (lora_row.h says why).
template <typename T>
void row_kernel(const Group<T>& g, const float* xr, int64_t slot, int64_t row, float* __restrict__ h) {
  const T* __restrict__ A = g.A(slot);
  const int64_t R = g.t.R, rs = g.t.rank(slot);
  if (rs == 0) return;
#if LORASERVE_SIMD
  lora_row::shrink_members(A, g.t.K, R, g.t.G, rs, xr, h);
  for (int64_t j = 0; j < g.t.G; ++j) {
    lora_row::expand<true>(g.B(j, slot), g.t.out[j], g.t.out[j], rs, h + j * R,
                           g.y[j] + row * g.y_row[j]);
  }
#else
  const int64_t GR = g.t.gr();
  for (int64_t c = 0; c < GR; ++c) h[c] = 0.f;
  for (int64_t i = 0; i < g.t.K; ++i) {  // the first rs columns of each member
    const float xv = xr[i];
    for (int64_t j = 0; j < g.t.G; ++j) {
      const T* __restrict__ Ai = A + i * GR + j * R;
      float* __restrict__ hj = h + j * R;
#pragma omp simd
      for (int64_t c = 0; c < rs; ++c) hj[c] += xv * to_f(Ai[c]);
    }
  }
  for (int64_t j = 0; j < g.t.G; ++j) {
    const T* __restrict__ B = g.B(j, slot);
    float* __restrict__ y = g.y[j] + row * g.y_row[j];
    const int64_t O = g.t.out[j];
    for (int64_t k = 0; k < rs; ++k) {
      const float hv = h[j * R + k];
      const T* __restrict__ Bk = B + k * O;
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) y[o] += hv * to_f(Bk[o]);
    }
  }
#endif
}

// TB tokens of one slot (prefill segments, drafts): each chunk of NV registers' columns of A
// and B is read once for all TB tokens while their TB x NV partial sums stay in registers, so
// the thin rank-R matmuls run at compute speed instead of one token's memory speed. The block
// is the panel GEMM's (panel_kernels.h): 12 x 2 registers with AVX-512, 6 x 2 with AVX2 (12
// accumulators, 2 weights, 1 broadcast); it replaced 8 tokens x 1 register, which needed a
// broadcast per FMA (32 segments of 128 tokens, one layer's four groups in cache, AVX2 build:
// 82 -> 95-141 GFLOP/s; AVX-512 97 -> 167). A chunk past a member's loaded rank or an output's width is masked. Without
// AVX2 each token runs the row kernel. The loops over tokens and registers are unrolled by pragma:
// GCC 12 left them rolled, so the accumulators lived on the stack (24 stores per k-step of the
// AVX-512 shrink); unrolled they stay in registers. Same pass standalone (30 layers, 32 segments
// of 128 tokens, 2-core Xeon with AMX): AVX-512 268 -> 255 ms, AVX2 348 -> 328 ms.
#if LORASERVE_SIMD
constexpr int64_t kW = simd::W;
constexpr int kNV = 2;  // registers per chunk
#if LORASERVE_SIMD == 512
constexpr int kBlock = 12;
#else
constexpr int kBlock = 6;
#endif
#else
constexpr int kBlock = 8;
#endif

#if LORASERVE_SIMD
// NV registers of columns from p: all full, or the last one masked (`m`)
template <int NV, bool Full, typename T>
LS_INLINE void load_chunk(const T* p, simd::M m, simd::V* v) {
#pragma GCC unroll 16
  for (int r = 0; r < NV; ++r) v[r] = (Full || r < NV - 1) ? wload(p + r * kW) : wload(p + r * kW, m);
}

// NV registers to p, the last one masked
template <int NV>
LS_INLINE void store_chunk(float* p, simd::M m, const simd::V* v) {
#pragma GCC unroll 16
  for (int r = 0; r < NV - 1; ++r) simd::store(p + r * kW, v[r]);
  simd::store(p + (NV - 1) * kW, v[NV - 1], m);
}

// acc[t][r] = sum over i of x_t[i] * A[i, c0 + r W : c0 + (r + 1) W]
template <int TB, int NV, bool Full, typename T>
LS_INLINE void shrink_chunk(const T* __restrict__ A, int64_t ld, int64_t in, simd::M m, const float* const* xr,
                            simd::V (&acc)[TB][NV]) {
  for (int64_t i = 0; i < in; ++i) {
    simd::V av[NV];
    load_chunk<NV, Full>(A + i * ld, m, av);
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      const simd::V xv = simd::set1(xr[t][i]);
#pragma GCC unroll 16
      for (int r = 0; r < NV; ++r) acc[t][r] = simd::fma(xv, av[r], acc[t][r]);
    }
  }
}

// acc[t][r] += sum over k < rs of h_t[k] * B[k, o0 + r W : o0 + (r + 1) W]
template <int TB, int NV, bool Full, typename T>
LS_INLINE void expand_chunk(const T* __restrict__ B, int64_t ld, int64_t rs, simd::M m, const float* h,
                            int64_t h_ld, simd::V (&acc)[TB][NV]) {
  for (int64_t k = 0; k < rs; ++k) {
    simd::V bv[NV];
    load_chunk<NV, Full>(B + k * ld, m, bv);
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      const simd::V hv = simd::set1(h[t * h_ld + k]);
#pragma GCC unroll 16
      for (int r = 0; r < NV; ++r) acc[t][r] = simd::fma(hv, bv[r], acc[t][r]);
    }
  }
}

// h[t, c0 : c0 + width) = x_t @ A[:, c0 : c0 + width), width <= NV W
template <int TB, int NV, typename T>
void shrink_cols(const T* A, int64_t ld, int64_t in, int64_t c0, int64_t width, const float* const* xr, float* h,
                 int64_t h_ld) {
  if constexpr (NV > 1) {
    if (width <= (NV - 1) * kW) return shrink_cols<TB, NV - 1>(A, ld, in, c0, width, xr, h, h_ld);
  }
  const int64_t last = width - (NV - 1) * kW;
  const simd::M m = simd::mask(last);
  simd::V acc[TB][NV];
#pragma GCC unroll 16
  for (int t = 0; t < TB; ++t)
#pragma GCC unroll 16
    for (int r = 0; r < NV; ++r) acc[t][r] = simd::zero();
  if (last == kW) shrink_chunk<TB, NV, true>(A + c0, ld, in, m, xr, acc);
  else shrink_chunk<TB, NV, false>(A + c0, ld, in, m, xr, acc);
#pragma GCC unroll 16
  for (int t = 0; t < TB; ++t) store_chunk<NV>(h + t * h_ld + c0, m, acc[t]);
}

// y_t[o0 : o0 + width) += h_t[:rs] @ B[:rs, o0 : o0 + width), width <= NV W
template <int TB, int NV, typename T>
void expand_cols(const T* B, int64_t ld, int64_t rs, int64_t o0, int64_t width, const float* h, int64_t h_ld,
                 float* const* y) {
  if constexpr (NV > 1) {
    if (width <= (NV - 1) * kW) return expand_cols<TB, NV - 1>(B, ld, rs, o0, width, h, h_ld, y);
  }
  const int64_t last = width - (NV - 1) * kW;
  const simd::M m = simd::mask(last);
  simd::V acc[TB][NV];
#pragma GCC unroll 16
  for (int t = 0; t < TB; ++t) load_chunk<NV, false>(y[t] + o0, m, acc[t]);
  if (last == kW) expand_chunk<TB, NV, true>(B + o0, ld, rs, m, h, h_ld, acc);
  else expand_chunk<TB, NV, false>(B + o0, ld, rs, m, h, h_ld, acc);
#pragma GCC unroll 16
  for (int t = 0; t < TB; ++t) store_chunk<NV>(y[t] + o0, m, acc[t]);
}

// h[t] = x_t @ A[slot] for TB tokens, each member's loaded rank (h rows GR apart)
template <int TB, typename T>
void block_shrink(const Group<T>& g, const float* const* xr, int64_t slot, float* h) {
  const T* __restrict__ A = g.A(slot);
  constexpr int64_t kC = kNV * kW;
  lora_row::member_runs(g.t.R, g.t.G, g.t.rank(slot), [&](int64_t start, int64_t w) {
    for (int64_t c0 = start; c0 < start + w; c0 += kC) {
      shrink_cols<TB, kNV>(A, g.t.gr(), g.t.K, c0, std::min(kC, start + w - c0), xr, h, g.t.gr());
    }
  });
}

// y[t][o_lo : o_hi) += h_t's member j @ B_j[slot][:, o_lo : o_hi) for TB tokens (h rows GR apart)
template <int TB, typename T>
void block_expand(const Group<T>& g, int64_t j, int64_t slot, const float* h, float* const* y, int64_t o_lo,
                  int64_t o_hi) {
  const T* __restrict__ B = g.B(j, slot);
  constexpr int64_t kC = kNV * kW;
  for (int64_t o0 = o_lo; o0 < o_hi; o0 += kC)
    expand_cols<TB, kNV>(B, g.t.out[j], g.t.rank(slot), o0, std::min(kC, o_hi - o0), h + j * g.t.R, g.t.gr(), y);
}

template <int TB, typename T>
void block_kernel(const Group<T>& g, const float* const* xr, int64_t slot, const int64_t* rows, float* __restrict__ h) {
  if (g.t.rank(slot) == 0) return;
  block_shrink<TB>(g, xr, slot, h);
  float* y[TB];
  for (int64_t j = 0; j < g.t.G; ++j) {
    for (int t = 0; t < TB; ++t) y[t] = g.y[j] + rows[t] * g.y_row[j];
    block_expand<TB>(g, static_cast<int64_t>(j), slot, h, y, 0, g.t.out[j]);
  }
}

// A block's shrink alone, by its size: what block_kernel / row_kernel compute into h
template <int TB, typename T>
void dispatch_shrink(int tb, const Group<T>& g, const float* const* xr, int64_t slot, float* h) {
  if constexpr (TB > 1) {
    if (tb < TB) return dispatch_shrink<TB - 1>(tb, g, xr, slot, h);
    block_shrink<TB>(g, xr, slot, h);
  } else {
    lora_row::shrink_members(g.A(slot), g.t.K, g.t.R, g.t.G, g.t.rank(slot), xr[0],
                             h);
  }
}

// tb tokens of a block (of at least 2) through block_expand, by their count
template <int TB, typename T>
void dispatch_expand(int tb, const Group<T>& g, int64_t j, int64_t slot, const float* h, float* const* y,
                     int64_t o_lo, int64_t o_hi) {
  if constexpr (TB > 1) {
    if (tb < TB) return dispatch_expand<TB - 1>(tb, g, j, slot, h, y, o_lo, o_hi);
  }
  block_expand<TB>(g, j, slot, h, y, o_lo, o_hi);
}
#else
template <int TB, typename T>
void block_kernel(const Group<T>& g, const float* const* xr, int64_t slot, const int64_t* rows, float* h) {
  for (int t = 0; t < TB; ++t) row_kernel(g, xr[t], slot, rows[t], h);  // portable: one row at a time
}
#endif

template <int TB, typename T>
void dispatch_block(int tb, const Group<T>& g, const float* const* xr, int64_t slot, const int64_t* rows, float* h) {
  if constexpr (TB > 1) {
    if (tb < TB) return dispatch_block<TB - 1>(tb, g, xr, slot, rows, h);
    block_kernel<TB>(g, xr, slot, rows, h);
  } else {
    row_kernel(g, xr[0], slot, rows[0], h);
  }
}

// the entries' blocks: runs of one slot, at most kBlock long (starts, then N)
std::vector<int64_t> slot_runs(const slot_table::Rows& e) {
  std::vector<int64_t> starts;
  for (int64_t n = 0; n < e.N; ++n) {
    if (n == 0 || e.slots[n] != e.slots[n - 1] || n - starts.back() == kBlock) starts.push_back(n);
  }
  starts.push_back(e.N);
  return starts;
}

// every block of the entries, shrink and expand (h per thread)
template <typename T>
void run_blocks(const Group<T>& g, const float* xp, int64_t x_row, const int64_t* rp, const int64_t* sp,
                const std::vector<int64_t>& starts) {
  const int64_t nblocks = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hbuf(kBlock * g.t.gr());
    const float* xr[kBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = starts[blk];
      const int tb = static_cast<int>(starts[blk + 1] - n0);
      for (int t = 0; t < tb; ++t) xr[t] = xp + rp[n0 + t] * x_row;
      dispatch_block<kBlock>(tb, g, xr, sp[n0], rp + n0, hbuf.data());
    }
  });
}

template <typename T>
void run_rows(const at::Tensor& x, const slot_table::Table& t, const slot_table::Rows& e,
              const std::vector<at::Tensor>& ys) {
  Group<T> g{t, {}, {}};
  TORCH_CHECK(static_cast<int64_t>(ys.size()) == t.G, "one output per B matrix");
  for (int64_t j = 0; j < t.G; ++j) {
    check_f32_rows(ys[j], "ys[j]");
    TORCH_CHECK(ys[j].size(1) == t.out[j], "ys[j] width must match bs[j]");
    TORCH_CHECK(ys[j].size(0) == x.size(0), "ys[j] must have x's rows");
    g.y.push_back(ys[j].data_ptr<float>());
    g.y_row.push_back(ys[j].stride(0));
  }
  run_blocks(g, x.data_ptr<float>(), x.stride(0), e.rows, e.slots, slot_runs(e));
}

#if LORASERVE_SIMD
// panel_linear_lora_rows for a table of T: see there
template <typename T>
void linear_rows(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& bias,
                 const slot_table::Table& t, const slot_table::Rows& e, const at::Tensor& y) {
  Group<T> g{t, {}, {}};
  slot_table::check_covers(t, n);
  float* yp = y.data_ptr<float>();
  const int64_t* off = t.off;  // each member's first column in y
  for (int64_t j = 0; j < t.G; ++j) {
    g.y.push_back(yp + off[j]);
    g.y_row.push_back(n);
  }
  const std::vector<int64_t> starts = slot_runs(e);
  const float* xp = x.data_ptr<float>();
  const int64_t x_row = x.stride(0), N = e.N, GR = g.t.gr();
  const int64_t* rp = e.rows;
  const int64_t* sp = e.slots;
  if (!std::is_sorted(rp, rp + N) || std::adjacent_find(rp, rp + N) != rp + N) {
    // the items find their entries by row: otherwise the two passes one after the other
    panel_linear_out(x, w, n, bias, y, nullptr);
    run_blocks(g, xp, x_row, rp, sp, starts);
    return;
  }
  // Each entry's h, blocked as lora_rows blocks it (so each h is lora_rows' bit for bit), held
  // for blocks [b0, b1): entry e's at (e - starts[b0]) * GR. A walk chunk by chunk computes the
  // blocks of each chunk's entries at its first item, while its x rows are in L2 from that
  // item's panels (a block across two chunks is kept for the next one); a walk panel by panel
  // computes all of them first.
  struct Held {
    int64_t r0 = -1, b0 = 0, b1 = 0;
    std::vector<float> h;
  };
  auto shrink_blocks = [&](int64_t b0, int64_t b1, float* h) {
    const float* xr[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = starts[blk];
      const int tb = static_cast<int>(starts[blk + 1] - n0);
      if (g.t.rank(sp[n0]) == 0) continue;
      for (int t = 0; t < tb; ++t) xr[t] = xp + rp[n0 + t] * x_row;
      dispatch_shrink<kBlock>(tb, g, xr, sp[n0], h + (n0 - starts[b0]) * GR);
    }
  };
  const int64_t nblocks = static_cast<int64_t>(starts.size()) - 1;
  const bool by_chunk = panel_walk_chunk_major(x.size(0), x.size(1), w.size(0));
  std::vector<Held> held(by_chunk ? at::get_num_threads() : 1);
  if (!by_chunk) {
    held[0].b1 = nblocks;
    held[0].h.resize(static_cast<size_t>(N * GR));
    at::parallel_for(0, nblocks, 1,
                     [&](int64_t b0, int64_t b1) { shrink_blocks(b0, b1, held[0].h.data() + starts[b0] * GR); });
  }
  // the blocks of entries [e0, e1) into st (rows from r0 on)
  auto hold = [&](Held& st, int64_t r0, int64_t e0, int64_t e1) {
    const int64_t b0 = std::upper_bound(starts.begin(), starts.end(), e0) - starts.begin() - 1;
    const int64_t b1 = std::lower_bound(starts.begin(), starts.end(), e1) - starts.begin();
    st.h.resize(static_cast<size_t>((starts[b1] - starts[b0]) * GR));
    int64_t from = b0;
    if (st.b1 > st.b0 && b0 == st.b1 - 1) {  // the last block held runs into this chunk
      std::memmove(st.h.data(), st.h.data() + (starts[b0] - starts[st.b0]) * GR,
                   (starts[b0 + 1] - starts[b0]) * GR * sizeof(float));
      from = b0 + 1;
    }
    if (from < b1) shrink_blocks(from, b1, st.h.data() + (starts[from] - starts[b0]) * GR);
    st.r0 = r0, st.b0 = b0, st.b1 = b1;
  };
  // then each work item of the GEMM adds its entries' deltas onto its columns, still in cache;
  // an entry of a one-entry block takes the row kernel's expand, as lora_rows does
  const PanelItemHook after = [&](int64_t r0, int64_t nrows, int64_t c0, int64_t c1) {
    const int64_t e0 = std::lower_bound(rp, rp + N, r0) - rp, e1 = std::lower_bound(rp, rp + N, r0 + nrows) - rp;
    if (e0 == e1) return;
    Held& st = held[by_chunk ? at::get_thread_num() : 0];
    if (by_chunk && st.r0 != r0) hold(st, r0, e0, e1);
    int64_t b = std::upper_bound(starts.begin(), starts.end(), e0) - starts.begin() - 1;
    for (int64_t e = e0; e < e1; e = std::min(starts[++b], e1)) {
      const int64_t lo = e, hi = std::min(starts[b + 1], e1), slot = sp[lo], rs = g.t.rank(slot);
      if (rs == 0) continue;
      const bool single = starts[b + 1] - starts[b] == 1;
      const float* he = st.h.data() + (lo - starts[st.b0]) * GR;
      for (int64_t j = 0; j < g.t.G; ++j) {
        const auto [o_lo, o_hi] = g.t.member_cols(j, c0, c1);
        if (o_lo >= o_hi) continue;
        float* yr[kBlock];
        for (int64_t t = lo; t < hi; ++t) yr[t - lo] = g.y[j] + rp[t] * n;
        if (single) {
          lora_row::expand<true>(g.B(j, slot) + o_lo, g.t.out[j], o_hi - o_lo, rs, he + j * g.t.R,
                                 yr[0] + o_lo);
        } else {
          dispatch_expand<kBlock>(static_cast<int>(hi - lo), g, static_cast<int64_t>(j), slot, he, yr, o_lo, o_hi);
        }
      }
    }
  };
  panel_linear_out(x, w, n, bias, y, &after);
}
#endif

// f(T{}) for the table's element type T (float or bf16_t)
template <typename F>
void by_table_type(const slot_table::Table& t, const F& f) {
  if (t.bf16) {
    f(bf16_t{});
  } else {
    f(float{});
  }
}

// the adapter side of a call, checked: the table against x's inputs, the entries against its rows
std::pair<slot_table::Table, slot_table::Rows> checked(const at::Tensor& x, const at::Tensor& rows,
                                                       const at::Tensor& slots, const at::Tensor& a,
                                                       const std::vector<at::Tensor>& bs,
                                                       const std::optional<at::Tensor>& slot_rank) {
  using slot_table::OnBad;
  const slot_table::Table t = *slot_table::table(a, bs, slot_rank, x.size(1), OnBad::raise);
  return {t, *slot_table::rows(rows, slots, x.size(0), t.S, OnBad::raise)};
}

}  // namespace

// For every n: h = x[rows[n]] @ a[slots[n]]  (a: [S, in, G*R], the G members' A side by side)
//              ys[j][rows[n]] += h[j*R:(j+1)*R] @ bs[j][slots[n]]  (bs[j]: [S, R, out_j])
// Runs of up to kBlock consecutive entries with the same slot are computed together. a and bs are
// fp32 or bf16 (all the same); x and ys are fp32.
void lora_rows(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& slots,
               const at::Tensor& a, const std::vector<at::Tensor>& bs,
               const std::vector<at::Tensor>& ys, const std::optional<at::Tensor>& slot_rank) {
  check_f32_rows(x, "x");
  const auto checked_args = checked(x, rows, slots, a, bs, slot_rank);
  const slot_table::Table& t = checked_args.first;
  const slot_table::Rows& e = checked_args.second;
  by_table_type(t, [&](auto v) { run_rows<decltype(v)>(x, t, e, ys); });
}

// y = x @ W.T + b over fp32 weight panels (panel_linear), plus every entry's LoRA delta as
// lora_rows adds it (members side by side in y), for prefill-sized inputs: the shrink first, then
// each work item of the GEMM adds its rows' deltas onto its columns right after storing them.
// Why: run after the GEMM, lora_rows' expand re-reads and re-writes the whole output from memory
// (a 4,096-token step of the 135M shape: ~170 MB a layer), which cost about as much as its
// arithmetic; here the item's rows and columns are still in cache. Bit for bit what panel_linear
// and then lora_rows compute (the same blocks, the same order of sums for every entry).
at::Tensor panel_linear_lora_rows(const at::Tensor& x, const at::Tensor& w, int64_t n,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& rows,
                                  const at::Tensor& slots, const at::Tensor& a,
                                  const std::vector<at::Tensor>& bs,
                                  const std::optional<at::Tensor>& slot_rank) {
  check_f32_rows(x, "x");
#if LORASERVE_SIMD
  const auto checked_args = checked(x, rows, slots, a, bs, slot_rank);
  const slot_table::Table& t = checked_args.first;
  const slot_table::Rows& e = checked_args.second;
  auto y = at::empty({x.size(0), n}, x.options());
  by_table_type(t, [&](auto v) { linear_rows<decltype(v)>(x, w, n, bias, t, e, y); });
  return y;
#else
  TORCH_CHECK(false, "panel_linear_lora_rows needs an AVX-512 or AVX2+FMA build");
#endif
}
