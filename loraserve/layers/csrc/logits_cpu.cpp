// Per row of a logits matrix, in two passes over the row: the first index of its maximum, its
// log-sum-exp and whether every entry is finite. That is all a greedy step needs (the token, its
// logprob = x[token] - lse) and what a sampled one needs besides the draw.
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

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "fast_exp.h"
#include "over_rows.h"
#include "simd.h"

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

}  // namespace

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
