// Per row of a logits matrix, in two passes over the row: the first index of its maximum, its
// log-sum-exp and whether every entry is finite. That is all a greedy step needs (the token, its
// logprob = x[token] - lse) and what a sampled one needs besides the draw (`draw_rows`, below:
// the inverse CDF at the row's uniform, without torch's [B, V] softmax, cumsum and search).
//
// Why our own: PyTorch's CPU argmax over a 49,152-token vocabulary runs ~25 times slower than its
// amax (an index-tracking reduction that does not vectorise), and its log_softmax writes a whole
// [rows, vocab] tensor only for one value per row to be read back; at 32 decode rows of the 135M
// model the two cost several milliseconds a step, as much as the model's attention.
//
// Ties: the first index of the maximum, as torch.argmax (and so Hugging Face's greedy search).
// NaN entries never win the max; a row with any NaN or infinity reports finite = false, and its
// lse is then meaningless (the caller masks such rows: -inf from a grammar mask is the one
// non-finite value a processed row may hold, and it contributes exp(-87) ~ 1e-38, i.e. nothing).
#include "aten_min.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "fast_exp.h"
#include "over_rows.h"
#include "simd.h"
#include "softmax_row.h"

namespace {

struct RowStats {
  int64_t arg;
  float lse;
  bool finite;
};

#if LORASERVE_SIMD
// lanes of x that equal m, as a bit mask (bit i: lane i)
inline uint32_t eq_lanes(simd::V x, simd::V m) {
#if LORASERVE_SIMD == 512
  return _mm512_cmp_ps_mask(x, m, _CMP_EQ_OQ);
#else
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, m, _CMP_EQ_OQ)));
#endif
}

RowStats row_stats(const float* x, int64_t n) {
  constexpr int W = simd::W;
  const int64_t body = n / W * W;
  const float ninf = -std::numeric_limits<float>::infinity();
  // pass 1: the max (NaN lanes never replace it: max(a, b) returns b when either is NaN, so the
  // running max goes second) and x - x, which is 0 for finite x and NaN for NaN or +-inf
  simd::V vmax = simd::set1(ninf), bad = simd::zero();
  for (int64_t i = 0; i < body; i += W) {
    const simd::V v = simd::load(x + i);
    vmax = simd::max(v, vmax);
    bad = simd::add(bad, simd::sub(v, v));
  }
  alignas(64) float lanes[W];
  simd::store(lanes, vmax);
  float m = ninf;
  for (int i = 0; i < W; ++i) m = std::max(m, lanes[i]);
  bool finite = !std::isnan(simd::sum(bad));
  for (int64_t i = body; i < n; ++i) {
    if (x[i] > m) m = x[i];
    finite = finite && std::isfinite(x[i]);
  }
  // pass 2: sum of exp(x - m), and the first position equal to m
  const simd::V mv = simd::set1(m);
  simd::V s = simd::zero();
  int64_t arg = -1;
  for (int64_t i = 0; i < body; i += W) {
    const simd::V v = simd::load(x + i);
    s = simd::add(s, simd::exp_nonpositive(simd::sub(v, mv)));
    if (arg < 0) {
      const uint32_t hit = eq_lanes(v, mv);
      if (hit) arg = i + __builtin_ctz(hit);
    }
  }
  float total = simd::sum(s);
  for (int64_t i = body; i < n; ++i) {
    total += exp_nonpositive(x[i] - m);
    if (arg < 0 && x[i] == m) arg = i;
  }
  return {arg < 0 ? 0 : arg, m + std::log(total), finite};
}
#else
RowStats row_stats(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t arg = 0;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    if (x[i] > m) m = x[i], arg = i;
  }
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += exp_nonpositive(x[i] - m);
  return {arg, m + std::log(total), finite};
}
#endif

// A draw's exponentials come in chunks of this many entries, each chunk's sum kept, so the search
// skips whole chunks and walks one entry by entry
constexpr int64_t kDrawChunk = 256;

// e[t] = exp(x[t] - m), exactly 0 where x[t] is -inf (a masked token has no mass; the fast exp
// would give it 1e-38); returns their sum
inline float chunk_exp(const float* x, float* e, int64_t n, float m) {
  float sum = 0.f;
  int64_t t = 0;
#if LORASERVE_SIMD
  simd::V acc = simd::zero();
  const simd::V mv = simd::set1(m), big = simd::set1(std::numeric_limits<float>::max());
  for (; t + simd::W <= n; t += simd::W) {
    const simd::V v = simd::load(x + t);
    // x + FLT_MAX is negative only for -inf
    const simd::V ex = simd::select_nonneg(simd::add(v, big), simd::exp_nonpositive(simd::sub(v, mv)), simd::zero());
    simd::store(e + t, ex);
    acc = simd::add(acc, ex);
  }
  sum = simd::sum(acc);
#endif
  for (; t < n; ++t) {
    e[t] = x[t] == -std::numeric_limits<float>::infinity() ? 0.f : exp_nonpositive(x[t] - m);
    sum += e[t];
  }
  return sum;
}

}  // namespace

// The first index whose cumulative mass exceeds u times the row's total, as sampling.py's torch
// draw (softmax, cumsum, searchsorted right) defines it; sums in double. A row with no mass
// (never handed here: truncation keeps a token) gives 0. e and sums: the caller's buffers, reused
// across rows (draw_rows; a burst's sampled rows, decode_steps_cpu.cpp).
int64_t draw_row(const float* x, int64_t n, float u, std::vector<float>& e, std::vector<double>& sums) {
  const float m = max_of(x, n);
  if (!(m > -std::numeric_limits<float>::infinity())) return 0;
  const int64_t chunks = (n + kDrawChunk - 1) / kDrawChunk;
  e.resize(static_cast<size_t>(n));
  sums.resize(static_cast<size_t>(chunks));
  double total = 0.;
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t c0 = k * kDrawChunk;
    sums[k] = chunk_exp(x + c0, e.data() + c0, std::min(kDrawChunk, n - c0), m);
    total += sums[k];
  }
  // u < 1, but u * total may round up to total: stay strictly below it
  double target = static_cast<double>(u) * total;
  if (!(target < total)) target = std::nextafter(total, 0.);
  double c = 0.;
  int64_t k = 0;
  while (k < chunks && c + sums[k] <= target) c += sums[k++];
  int64_t last = -1;
  for (int64_t i = k * kDrawChunk; i < n; ++i) {
    if (e[i] > 0.f) {
      last = i;
      c += e[i];
      if (c > target) return i;
    }
  }
  // the sums' rounding left the target past every entry: the last one with mass
  for (int64_t i = std::min(n, k * kDrawChunk) - 1; last < 0 && i >= 0; --i)
    if (e[i] > 0.f) last = i;
  return std::max<int64_t>(last, 0);
}

// x [B, V] fp32 scores (masked entries -inf), u [B] fp32 uniforms in [0, 1) -> int64 [B]: each
// row's token at its uniform (draw_row). The CPU backend's draw for every sampled row, one step
// at a time (Ops.draw) or in a burst (decode_steps_cpu.cpp), so both pick the same token.
at::Tensor draw_rows(const at::Tensor& x, const at::Tensor& u) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [B, V] tensor with contiguous rows");
  TORCH_CHECK(x.size(1) > 0, "x must have at least one column");
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.dim() == 1 && u.size(0) == x.size(0),
              "u must be a CPU float32 [B] tensor");
  const int64_t B = x.size(0), V = x.size(1), ld = x.stride(0);
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  const at::Tensor uc = u.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* up = uc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  over_rows(B, V, 2 * 16384, [&](int64_t r0, int64_t r1) {
    std::vector<float> e;
    std::vector<double> sums;
    for (int64_t r = r0; r < r1; ++r) op[r] = draw_row(xp + r * ld, V, up[r], e, sums);
  });
  return out;
}

// x [B, V] fp32, contiguous rows -> (argmax int64 [B], logsumexp fp32 [B], finite bool [B])
std::tuple<at::Tensor, at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU float32 [B, V] tensor with contiguous rows");
  TORCH_CHECK(x.size(1) > 0, "x must have at least one column");
  const int64_t B = x.size(0), V = x.size(1), ld = x.stride(0);
  auto arg = at::empty({B}, x.options().dtype(at::kLong));
  auto lse = at::empty({B}, x.options());
  auto finite = at::empty({B}, x.options().dtype(at::kBool));
  const float* xp = x.data_ptr<float>();
  int64_t* ap = arg.data_ptr<int64_t>();
  float* lp = lse.data_ptr<float>();
  bool* fp = finite.data_ptr<bool>();
  // a row is ~50k entries of exp: rows in parallel from two of them
  over_rows(B, V, 2 * 16384, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowStats st = row_stats(xp + r * ld, V);
      ap[r] = st.arg;
      lp[r] = st.lse;
      fp[r] = st.finite;
    }
  });
  return {arg, lse, finite};
}
