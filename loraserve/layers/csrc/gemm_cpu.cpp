// Dense projections y = x @ W.T + b over weights packed in 32-column panels.
//
// Why our own GEMM: decode steps multiply a few rows (1-64) by every weight of
// the model, so the weights are the traffic. oneDNN's prepacked GEMM reaches
// ~21-25 GB/s at one row on a 2-core EPYC with ~40 us of fixed cost per call;
// streaming a panel layout with AVX-512 reaches 25-46 GB/s (1.6-2x per call at
// one row) and, register-blocked 12 rows x 32 columns, ~200 GFLOP/s at 32 rows
// (1.2-1.5x oneDNN), while prefill-sized inputs (4,096 rows) stay within ~5% of it.
//
// Layout: W [N, K] becomes P = ceil(N / 32) panels of [K, 32] (zero-padded
// columns), each contiguous: a panel is one sequential stream, and one k-step of
// it is two AVX-512 registers (four AVX2 ones) that every row in flight multiplies against.
//
// Two register kernels, chosen by the build's -march (simd.h): AVX-512 (below) and AVX2+FMA
// (further down: 16 registers of 8 floats, so 6 rows x 16 columns, half a panel, per block). A
// build with neither has no panel GEMM: projections stay on oneDNN (layers/ops_cpu.py decides).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <vector>

#include "lora_row.h"
#include "over_rows.h"
#include "panel_hook.h"
#include "simd.h"
#include "slot_table.h"

namespace {

constexpr int64_t kNR = 32;      // columns per panel: two AVX-512 registers, four AVX2 ones
constexpr int64_t kMC = 96;      // most rows per work item: they stay in L2 while panels pass by
// fewest rows whose decode-sized products prefetch their next panel (SpanPf); one row streams
// its panel at the memory's pace with the hardware prefetcher alone
constexpr int64_t kSpanPfMinRows = 2;
// fewest rows whose fused decode pass also fetches its adapter rows' A and B (LoraPf): fewer rows
// leave the FMAs too little time to hide the extra stream (8 and 16 rows measured level, within
// 1 ms either way on both builds; 24 / 32 / 64 rows 5 / 6 / 9 ms faster, panel_lora_linear)
constexpr int64_t kLoraPfMinRows = 20;

struct Tile {
  const float* w;  // one panel [K, 32]
  int64_t k;
  const float* bias;  // this panel's 32 entries of the bias, or null
  int64_t cols;       // columns that exist (the last panel may be partial)

  // panel p of w [P, K, 32] (covering n columns) and its share of the bias, if any
  static Tile of(const float* w, int64_t K, const float* bias, int64_t n, int64_t p) {
    return Tile{w + p * K * kNR, K, bias ? bias + p * kNR : nullptr, std::min(kNR, n - p * kNR)};
  }
};

#if LORASERVE_SIMD
// What the register kernels prefetch alongside their k-steps: nothing (plain projections and
// one-row streams), the next panel of a decode-sized product (SpanPf), or that plus the adapter
// rows the fused decode pass runs right after the panel (LoraPf). A kernel copies its PF into a
// local and steps that, so the cursors live in registers: read through the PF reference, GCC 12
// at -march=native on a Zen 5 EPYC (znver3 plus AVX-512 to GCC 12) kept them in memory and
// spilled the accumulators of the blocks inlined around them (the fused pass's panels ran 2.3x
// slower than panel_linear's). The register kernels are never inlined for the same reason.
struct NoPf {
  static constexpr bool kOn = false;
  void step() {}
};
NoPf no_pf;

// The next panel of a decode-sized product, one line per k-step from its start: a panel's first
// register block otherwise waits on DRAM (the hardware prefetcher runs a few lines ahead of a
// stream that wants ~35 GB/s per core) and its other blocks leave memory idle. 30 layers of the
// SmolLM projections (425 MB, so from DRAM), 2-core Xeon: AVX-512 build 8 / 32 / 64 rows
// 28 / 43 / 65 -> 21 / 34 / 55 ms (24.5 ms at 32 rows with the weights in cache); AVX2 build
// 38 / 63 / 96 -> 25 / 49 / 81 ms. Two lines per k-step measured 10-15 % slower than one from 16 rows.
struct SpanPf {
  static constexpr bool kOn = true;
  const char* base = nullptr;  // the next panel
  int64_t pos = 0, end = 0;    // lines of it fetched so far, and in all
  // the whole panel at `next` ([K, 32] fp32)
  static SpanPf panel(const float* next, int64_t K) {
    return SpanPf{reinterpret_cast<const char*>(next), 0, K * kNR * 4 / 64};
  }
  __attribute__((always_inline)) void step() {
    if (pos < end) _mm_prefetch(base + 64 * pos++, _MM_HINT_T1);
  }
};

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
#endif

#if LORASERVE_SIMD == 512
constexpr int kMR = 12;  // rows per register block: 24 accumulators + 2 weights + 1 broadcast
constexpr int64_t kPanelsPerItem = 2;  // prefill-sized inputs take panels in pairs (block<6, 2>)

inline void store_row(float* y, const Tile& t, __m512 a0, __m512 a1) {
  const __mmask16 lo = simd::mask(t.cols), hi = simd::mask(t.cols - 16);
  if (t.bias) {
    a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(lo, t.bias));
    a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(hi, t.bias + 16));
  }
  _mm512_mask_storeu_ps(y, lo, a0);
  _mm512_mask_storeu_ps(y + 16, hi, a1);
}

// MR rows x NT adjacent panels (32 * NT columns): each k-step loads the panels' 2 * NT
// registers once for all MR rows. NT = 1, MR <= 12 for decode sizes; NT = 2, MR = 6 for
// prefill-sized inputs (over 96 rows), where each broadcast then feeds four FMAs instead of two
// (10 loads per 24 FMAs instead of 14): at 4,032 rows 4-7% faster than 12 x 32, level with oneDNN.
template <int MR, int NT, class PF = NoPf>
__attribute__((noinline)) void block(const float* __restrict__ x, int64_t ldx, const Tile* t,
                                     float* __restrict__ y, int64_t ldy, PF& pf = no_pf) {
  __m512 acc[MR][2 * NT];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 2 * NT; ++c) acc[m][c] = _mm512_setzero_ps();
  PF cur = pf;
  const int64_t K = t[0].k;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    cur.step();
    __m512 w[2 * NT];
    for (int j = 0; j < NT; ++j) {
      w[2 * j] = _mm512_loadu_ps(t[j].w + k * kNR);
      w[2 * j + 1] = _mm512_loadu_ps(t[j].w + k * kNR + 16);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * ldx + k]);
      for (int c = 0; c < 2 * NT; ++c) acc[m][c] = _mm512_fmadd_ps(xv, w[c], acc[m][c]);
    }
  }
  if constexpr (PF::kOn) pf = cur;
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NT; ++j) store_row(y + m * ldy + j * kNR, t[j], acc[m][2 * j], acc[m][2 * j + 1]);
}

// One row (batch-1 decode, the lm_head of one sequence): a pure stream of the panel, four
// k-steps in flight so the FMA latency never throttles the loads.
template <class PF = NoPf>
__attribute__((noinline)) void stream_row(const float* __restrict__ x, const Tile& t, float* __restrict__ y,
                                          PF& pf = no_pf) {
  __m512 a[4], c[4];
  for (int u = 0; u < 4; ++u) a[u] = c[u] = _mm512_setzero_ps();
  const float* __restrict__ w = t.w;
  int64_t k = 0;
  PF cur = pf;
  for (; k + 4 <= t.k; k += 4) {
    cur.step();
    for (int u = 0; u < 4; ++u) {
      const __m512 xv = _mm512_set1_ps(x[k + u]);
      a[u] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + (k + u) * kNR), a[u]);
      c[u] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + (k + u) * kNR + 16), c[u]);
    }
  }
  for (; k < t.k; ++k) {
    const __m512 xv = _mm512_set1_ps(x[k]);
    a[0] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + k * kNR), a[0]);
    c[0] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + k * kNR + 16), c[0]);
  }
  if constexpr (PF::kOn) pf = cur;
  store_row(y, t, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
            _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3])));
}
constexpr int kWideMR = 6;

// k-steps a decode-sized panel takes over M rows (one panel, register blocks of at most kMR rows)
inline int64_t panel_k_steps(int64_t M, int64_t K) { return M == 1 ? K / 4 : K * ((M + kMR - 1) / kMR); }

template <int MR, class PF>
void rows_block(int mr, const float* x, int64_t ldx, const Tile& t, float* y, int64_t ldy, PF& pf) {
  if constexpr (MR > 1) {
    if (mr < MR) return rows_block<MR - 1>(mr, x, ldx, t, y, ldy, pf);
    block<MR, 1>(x, ldx, &t, y, ldy, pf);
  } else {
    stream_row(x, t, y, pf);
  }
}

// `rows` rows (at most kMC) x `np` adjacent panels (1, or 2 for prefill-sized inputs)
template <class PF = NoPf>
void panel_rows(const float* x, int64_t ldx, const Tile* t, int64_t np, int64_t rows, float* y, int64_t ldy,
                PF& pf = no_pf) {
  int64_t done = 0;
  if (np == 2) {  // prefill-sized (over 96 rows): 6 x 64 blocks; up to 96, 12 x 32 measured faster
    for (; done + kWideMR <= rows; done += kWideMR) block<kWideMR, 2>(x + done * ldx, ldx, t, y + done * ldy, ldy);
  }
  for (int64_t q = 0; q < np; ++q) {
    // the rest spread evenly over register blocks (32 rows: 11 + 11 + 10, not 12 + 12 + 8)
    const float* xd = x + done * ldx;
    float* yd = y + done * ldy + q * kNR;
    over_blocks(rows - done, kMR, [&](int64_t r, int mr) { rows_block<kMR>(mr, xd + r * ldx, ldx, t[q], yd + r * ldy, ldy, pf); });
  }
}

#elif LORASERVE_SIMD == 256
// AVX2+FMA has 16 registers of 8 floats: a whole panel k-step is 4 of them, so 6 rows x 16
// columns (12 accumulators + 2 weights + 1 broadcast) is the register block, run over both
// halves of the panel; one row streams the whole panel (8 accumulators: two k-steps in flight),
// two rows take it whole too (8 accumulators + 4 weights). The half-panel passes re-read the
// panel from L2, which the 6-row blocks' FLOPs hide.
constexpr int kMR = 6;
constexpr int64_t kPanelsPerItem = 1;

// the 8 columns at y (valid of them exist), plus their bias; always inlined and called from fully
// unrolled loops, else GCC keeps the accumulators in memory and stores all 12 every k-step
__attribute__((always_inline)) inline void store8(float* y, const float* bias, int64_t valid, __m256 v) {
  if (valid >= 8) {
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(y, v);
  } else if (valid > 0) {
    const simd::M m = simd::mask(valid);
    if (bias) v = _mm256_add_ps(v, _mm256_maskload_ps(bias, m));
    _mm256_maskstore_ps(y, m, v);
  }
}

// MR rows x NV registers: the 8 * NV columns of the panel from column c0
template <int MR, int NV, class PF>
__attribute__((noinline)) void block(const float* __restrict__ x, int64_t ldx, const Tile& t, int64_t c0,
                                     float* __restrict__ y, int64_t ldy, PF& pf) {
  __m256 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_setzero_ps();
  const float* __restrict__ w = t.w + c0;
  PF cur = pf;
  const int64_t K = t.k;
  // unrolled: the loop's own counter, compare and pointer steps were a fifth of its uops
  // (K x 6 x 16 in-cache micro-benchmark, one thread: 89 -> 97 GFLOP/s)
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    cur.step();
    __m256 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = _mm256_loadu_ps(w + k * kNR + 8 * j);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * ldx + k);
      for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  if constexpr (PF::kOn) pf = cur;
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      store8(y + m * ldy + c0 + 8 * j, t.bias ? t.bias + c0 + 8 * j : nullptr, t.cols - c0 - 8 * j, acc[m][j]);
}

template <class PF>
__attribute__((noinline)) void stream_row(const float* __restrict__ x, const Tile& t, float* __restrict__ y,
                                          PF& pf) {
  __m256 a[2][4];
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < 4; ++j) a[u][j] = _mm256_setzero_ps();
  const float* __restrict__ w = t.w;
  int64_t k = 0;
  PF cur = pf;
  for (; k + 2 <= t.k; k += 2) {
    cur.step();
    for (int u = 0; u < 2; ++u) {
      const __m256 xv = _mm256_broadcast_ss(x + k + u);
      for (int j = 0; j < 4; ++j) a[u][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + (k + u) * kNR + 8 * j), a[u][j]);
    }
  }
  if (k < t.k) {
    const __m256 xv = _mm256_broadcast_ss(x + k);
    for (int j = 0; j < 4; ++j) a[0][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + k * kNR + 8 * j), a[0][j]);
  }
  if constexpr (PF::kOn) pf = cur;
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    store8(y + 8 * j, t.bias ? t.bias + 8 * j : nullptr, t.cols - 8 * j, _mm256_add_ps(a[0][j], a[1][j]));
}

// k-steps a decode-sized panel takes over M rows (register blocks of at most kMR rows, each over
// both halves of the panel; two rows take it whole, one row two k-steps at a time)
inline int64_t panel_k_steps(int64_t M, int64_t K) {
  return M == 1 ? K / 2 : M == 2 ? K : 2 * K * ((M + kMR - 1) / kMR);
}

template <int MR, class PF>
void rows_block(int mr, const float* x, int64_t ldx, const Tile& t, float* y, int64_t ldy, PF& pf) {
  if constexpr (MR > 2) {
    if (mr < MR) return rows_block<MR - 1>(mr, x, ldx, t, y, ldy, pf);
    block<MR, 2>(x, ldx, t, 0, y, ldy, pf);
    if (t.cols > 16) block<MR, 2>(x, ldx, t, 16, y, ldy, pf);
  } else if constexpr (MR == 2) {
    if (mr < 2) return stream_row(x, t, y, pf);
    block<2, 4>(x, ldx, t, 0, y, ldy, pf);
  }
}

template <class PF = NoPf>
void panel_rows(const float* x, int64_t ldx, const Tile* t, int64_t np, int64_t rows, float* y, int64_t ldy,
                PF& pf = no_pf) {
  for (int64_t q = 0; q < np; ++q)  // evenly: 16 rows are 6 + 5 + 5, not 6 + 6 + 4
    over_blocks(rows, kMR, [&](int64_t r, int mr) { rows_block<kMR>(mr, x + r * ldx, ldx, t[q], y + r * ldy + q * kNR, ldy, pf); });
}
#endif

// projections fused in one output (q/k/v: 3); outside the SIMD block because panel_lora_linear's
// argument checks use it in every build (a portable one only refuses the call)
constexpr int kMaxMembers = 4;

#if LORASERVE_SIMD
// ---- The fused decode path: panel GEMM + every row's own LoRA (panel_lora_linear) ----

struct LoraRows {
  const float* x;
  int64_t ldx;
  const int64_t* rows;   // [N] rows of x (and y) with an adapter
  const int64_t* slots;  // [N] their slots
  const float* a;        // [S, K, G*R]
  int64_t a_slot, k, gr, r;
  int g;
  const float* b[kMaxMembers];  // [S, R, out_j]
  int64_t b_slot[kMaxMembers], out[kMaxMembers], off[kMaxMembers];
  const int64_t* slot_rank;  // [S] or null
  float* d;                  // [N, n]: each entry's delta, added to y once every panel is stored
  int64_t n;

  int64_t rank(int64_t s) const { return slot_rank ? std::clamp<int64_t>(slot_rank[s], 0, r) : r; }
};

// entry e: d[e] = the delta of its row under its slot's adapter, every member side by side
void lora_unit(const LoraRows& L, int64_t e, float* h) {
  const int64_t s = L.slots[e], rs = L.rank(s);
  float* de = L.d + e * L.n;
  if (rs == 0) {
    std::fill(de, de + L.n, 0.f);
    return;
  }
  const float* x = L.x + L.rows[e] * L.ldx;
  const float* A = L.a + s * L.a_slot;
  lora_row::shrink_members(A, L.k, L.r, int64_t{L.g}, rs, x, h);
  for (int j = 0; j < L.g; ++j) {
    lora_row::expand<false>(L.b[j] + s * L.b_slot[j], L.out[j], L.out[j], rs, h + j * L.r, de + L.off[j]);
  }
}
#endif

}  // namespace

bool panel_gemm_available() {
  return LORASERVE_SIMD != 0;  // a build without AVX2+FMA keeps oneDNN (layers/ops_cpu.py decides)
}

// The arguments both panel entry points share: x [M, K] with contiguous rows, w [P, K, 32]
// panels covering n columns, an optional bias [n].
static void check_panel_args(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                             const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [M, K] tensor with contiguous rows");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 3 && w.is_contiguous() && w.size(2) == kNR,
              "w must be a contiguous float32 [P, K, 32] panel tensor");
  const int64_t K = x.size(1), P = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x has ", K, " columns, the weight ", w.size(1));
  TORCH_CHECK(n > (P - 1) * kNR && n <= P * kNR, "n = ", n, " does not match ", P, " panels");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == n,
                "bias must be a contiguous float32 [n] tensor");
  }
}

#if LORASERVE_SIMD
// Panel p of a decode-sized product (at most kMC rows, one work item per panel) into y [M, n],
// fetching panel p + 1 meanwhile when the same thread takes it next
static void decode_panel(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t n,
                         const float* bias, int64_t p, bool next, float* y) {
  const Tile t = Tile::of(w, K, bias, n, p);
  if (M >= kSpanPfMinRows && next) {
    SpanPf pf = SpanPf::panel(w + (p + 1) * K * kNR, K);
    panel_rows(x, ldx, &t, 1, M, y + p * kNR, n, pf);
  } else {
    panel_rows(x, ldx, &t, 1, M, y + p * kNR, n);
  }
}

// decode_panel for the fused pass: also fetches the adapter rows' spans (`lines` lines in all),
// spread evenly over the panel's k-steps; the caller gives spans only from kLoraPfMinRows rows
static void decode_panel_lora(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t n,
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
#endif

bool panel_walk_chunk_major(int64_t M, int64_t K, int64_t P) {
  const int64_t chunks = (M + kMC - 1) / kMC;
  return chunks == 1 || grid_chunk_major_fp32(M, K, chunks, P * K * kNR * 4);
}

// x [M, K] (rows contiguous, any row stride), w [P, K, 32] -> [M, n]
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                           const std::optional<torch::Tensor>& bias) {
  check_panel_args(x, w, n, bias);
  auto y = torch::empty({x.size(0), n}, x.options());
  panel_linear_out(x, w, n, bias, y, nullptr);
  return y;
}

// panel_linear into y [M, n] (contiguous), with `after` (if any) run on each work item by the
// thread that just stored it, on the item's rows and columns while they are still in its cache:
// the prefill LoRA's expand (lora_cpu.cpp `panel_linear_lora_rows`) adds onto them there.
void panel_linear_out(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                      const std::optional<torch::Tensor>& bias, const torch::Tensor& y, const PanelItemHook* after) {
  check_panel_args(x, w, n, bias);
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.is_contiguous() && y.dim() == 2 && y.size(0) == x.size(0) &&
                  y.size(1) == n,
              "y must be a contiguous float32 [M, n] tensor");
#if LORASERVE_SIMD
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  if (M == 0) return;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), chunks = (M + kMC - 1) / kMC;
  const bool major = panel_walk_chunk_major(M, K, P);
  // decode sizes take panels one by one, which splits 18 or 30 panels evenly over the threads
  const int64_t per = chunks > 1 ? kPanelsPerItem : 1, groups = (P + per - 1) / per;
  // one work item: a chunk of rows x one panel (or, AVX-512 prefill, two adjacent ones)
  at::parallel_for(0, groups * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const auto [g, c] = grid_item(it, groups, chunks, major);
      const int64_t p0 = per * g, np = std::min(per, P - p0);
      // chunks of equal size (64 rows: one chunk; 100 rows: 50 + 50, not 96 + 4)
      const int64_t r0 = M * c / chunks, rows = M * (c + 1) / chunks - r0;
      if (chunks == 1) {  // decode sizes: items are panels, the next one this thread's next item
        decode_panel(xp, ldx, M, K, wp, n, bp, p0, it + 1 < hi, yp);
      } else {
        Tile tiles[kPanelsPerItem];
        for (int64_t q = 0; q < np; ++q) tiles[q] = Tile::of(wp, K, bp, n, p0 + q);
        panel_rows(xp + r0 * ldx, ldx, tiles, np, rows, yp + r0 * n + p0 * kNR, n);
      }
      if (after) (*after)(r0, rows, p0 * kNR, std::min(n, (p0 + np) * kNR));
    }
  });
#else
  TORCH_CHECK(false, "panel_linear needs an AVX-512 or AVX2+FMA build");
#endif
}

// Panels [p0, p1) of panel_linear's product for at most kMC rows, each panel computed exactly as
// panel_linear computes it there (one work item per panel): the decode stack's threads each take a
// range inside one parallel region (decode_stack_cpu.cpp), and the split cannot change a bit.
void panel_linear_range(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t n,
                        const float* bias, int64_t p0, int64_t p1, float* y) {
#if LORASERVE_SIMD
  for (int64_t p = p0; p < p1; ++p) decode_panel(x, ldx, M, K, w, n, bias, p, p + 1 < p1, y);
#endif
}

#if LORASERVE_SIMD
// The adapter rows of a fused pass, checked: x [M, K] rows, a [S, K, G*R], each member's B
// [S, R, out_j] side by side over n output columns
static LoraRows lora_rows_args(const torch::Tensor& x, int64_t n, const torch::Tensor& rows, const torch::Tensor& slots,
                               const torch::Tensor& a, const std::vector<torch::Tensor>& bs,
                               const std::optional<torch::Tensor>& slot_rank) {
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64, "rows/slots must be int64");
  TORCH_CHECK(rows.is_contiguous() && slots.is_contiguous() && rows.numel() == slots.numel(), "rows/slots mismatch");
  TORCH_CHECK(slot_matrices(a) && a.scalar_type() == torch::kFloat32, "a must be [S, in, G*R], each slot contiguous");
  const int64_t G = static_cast<int64_t>(bs.size()), N = rows.numel(), S = a.size(0), GR = a.size(2);
  TORCH_CHECK(G > 0 && G <= kMaxMembers, "1 to ", kMaxMembers, " B matrices");
  const int64_t R = GR / G;
  TORCH_CHECK(a.size(1) == x.size(1) && R * G == GR, "a's shape does not match x or the group");
  LoraRows L{x.data_ptr<float>(), x.stride(0), rows.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), a.data_ptr<float>(),
             a.stride(0), x.size(1), GR, R, static_cast<int>(G), {}, {}, {}, {}, nullptr, nullptr, n};
  if (slot_rank.has_value()) {
    const torch::Tensor& sr = *slot_rank;
    TORCH_CHECK(sr.device().is_cpu() && sr.scalar_type() == torch::kInt64 && sr.is_contiguous() && sr.numel() == S,
                "slot_rank must be a contiguous CPU int64 tensor with one entry per slot");
    L.slot_rank = sr.data_ptr<int64_t>();
  }
  int64_t off = 0;
  for (int64_t j = 0; j < G; ++j) {
    TORCH_CHECK(slot_matrices(bs[j]) && bs[j].scalar_type() == torch::kFloat32 && bs[j].size(0) == S &&
                    bs[j].size(1) == R,
                "bs[j] must be [S, R, out], each slot contiguous");
    L.b[j] = bs[j].data_ptr<float>();
    L.b_slot[j] = bs[j].stride(0);
    L.out[j] = bs[j].size(2);
    L.off[j] = off;
    off += bs[j].size(2);
  }
  TORCH_CHECK(off == n, "the B matrices cover ", off, " of ", n, " output columns");
  for (int64_t e = 0; e < N; ++e) {
    TORCH_CHECK(L.rows[e] >= 0 && L.rows[e] < x.size(0) && L.slots[e] >= 0 && L.slots[e] < S,
                "row or slot out of range");
  }
  return L;
}

// every panel is stored: add the deltas (in L2 by now)
static void add_deltas(const LoraRows& L, int64_t N, float* yp) {
  const int64_t n = L.n;
  for (int64_t e = 0; e < N; ++e) {
    float* __restrict__ ye = yp + L.rows[e] * n;
    const float* __restrict__ de = L.d + e * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) ye[c] += de[c];
  }
}
#endif

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
  const int64_t N = rows.numel(), GR = L.gr;
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
        const int64_t s = L.slots[u], rs = L.rank(s);
        if (rs == 0 || s == fetched) continue;  // nothing to read, or this thread just fetched it
        fetched = s;
        span(L.a + s * L.a_slot, L.k * L.gr);
        for (int j = 0; j < L.g; ++j) span(L.b[j] + s * L.b_slot[j], rs * L.out[j]);
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
  const int64_t N = rows.numel();
  auto d = torch::empty({N, y.size(1)}, x.options());
  L.d = d.data_ptr<float>();
  std::vector<float> h(L.gr);
  for (int64_t e = 0; e < N; ++e) lora_unit(L, e, h.data());
  add_deltas(L, N, y.data_ptr<float>());
#else
  TORCH_CHECK(false, "lora_deltas needs an AVX-512 or AVX2+FMA build");
#endif
}
