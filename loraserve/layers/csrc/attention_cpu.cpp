// Decode attention straight from the paged KV cache, for CPU steps where every row is one
// sequence's next token.
//
// Why a kernel: the PyTorch path first copies each sequence's blocks into a padded
// [B, Hkv, max_ctx, D] tensor (`index_select`), then SDPA reads that copy: the context
// is read twice and written once per layer and step, and the copy grows with the context.
// Here each (sequence, KV head) pair walks its own block table once for K (scores) and
// once for V (weighted sum), so the cache is read exactly once and nothing is allocated
// but one score row per thread. The G query heads that share a KV head are handled
// together, so GQA never repeats K/V either.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "fast_exp.h"
#include "simd.h"

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
#if LORASERVE_SIMD
  if (n % simd::W == 0) {  // head sizes are multiples of 16 in practice: 4 (AVX2: 8) FMAs and one sum at D=64
    simd::V acc = simd::zero();
    for (int64_t i = 0; i < n; i += simd::W) acc = simd::fma(simd::load(a + i), simd::load(b + i), acc);
    return simd::sum(acc);
  }
#endif
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline float max_of(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
#if LORASERVE_SIMD
  if (n >= simd::W) {
    simd::V mv = simd::load(s);
    for (t = simd::W; t + simd::W <= n; t += simd::W) mv = simd::max(mv, simd::load(s + t));
    alignas(64) float lanes[simd::W];
    simd::store(lanes, mv);
    for (float v : lanes) m = std::max(m, v);
  }
#endif
  for (; t < n; ++t) m = std::max(m, s[t]);
  return m;
}

// s[t] = exp(s[t] - m), returns their sum
inline float exp_shifted(float* s, int64_t n, float m) {
  float sum = 0.f;
  int64_t t = 0;
#if LORASERVE_SIMD
  simd::V acc = simd::zero();
  const simd::V mv = simd::set1(m);
  for (; t + simd::W <= n; t += simd::W) {
    const simd::V e = simd::exp_nonpositive(simd::sub(simd::load(s + t), mv));
    simd::store(s + t, e);
    acc = simd::add(acc, e);
  }
  sum = simd::sum(acc);
#endif
  for (; t < n; ++t) {
    s[t] = exp_nonpositive(s[t] - m);
    sum += s[t];
  }
  return sum;
}

}  // namespace

// q: [B, Hq, D] (rows may be strided); k_cache, v_cache: [NB, BS, Hkv, D]; block_tables: [B, nblk] int64;
// ctx_lens: [B] int64 (positions 0..ctx-1 are attended). Returns [B, Hq, D].
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& ctx_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kFloat32 && q.dim() == 3 && q.stride(2) == 1 &&
                  q.stride(1) == q.size(2),
              "q must be a CPU float32 [B, Hq, D] tensor with contiguous heads");
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 && k_cache.dim() == 4 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
                  v_cache.scalar_type() == torch::kFloat32,
              "k_cache/v_cache must be contiguous float32 [NB, BS, Hkv, D]");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [B, nblk]");
  TORCH_CHECK(ctx_lens.scalar_type() == torch::kInt64 && ctx_lens.is_contiguous(), "ctx_lens must be int64");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t nblk = block_tables.size(1);
  TORCH_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "head shapes do not match");
  TORCH_CHECK(block_tables.size(0) == B && ctx_lens.numel() == B, "one block table and length per row");
  const int64_t G = Hq / Hkv;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  int64_t max_ctx = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] > 0 && lens[b] <= nblk * BS, "context length out of range for its block table");
    for (int64_t i = 0; i < (lens[b] + BS - 1) / BS; ++i)
      TORCH_CHECK(tables[b * nblk + i] >= 0 && tables[b * nblk + i] < NB, "block id out of range");
    max_ctx = std::max(max_ctx, lens[b]);
  }
  auto out = torch::empty({B, Hq, D}, q.options());
  const int64_t q_row = q.stride(0);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t row = Hkv * D;  // floats between consecutive positions of one head in a block
  // Work items are (sequence, range of KV heads). With at least as many sequences as
  // threads, an item takes all heads of its sequence, so each pass reads whole contiguous
  // cache rows (all heads of a position) in block order, which the prefetcher follows;
  // splitting heads across threads left every pass reading a third of each row from DRAM.
  // Fewer sequences than threads (batch 1): one head per item, so every core has work.
  const int64_t per = B >= at::get_num_threads() ? Hkv : 1;
  const int64_t items_per_seq = Hkv / per;
  at::parallel_for(0, B * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(per * G * max_ctx);
    std::vector<float> acc(per * G * D);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / items_per_seq, h0 = (it % items_per_seq) * per, n = lens[b];
      const int64_t* tb = tables + b * nblk;
      const float* qh = qp + b * q_row + h0 * G * D;  // the per*G query heads of KV heads h0..
      float* s = scores.data();
      const int64_t rows = per * G;  // query heads in this item; row r reads KV head h0 + r / G
      for (int64_t t = 0; t < n; ++t) {  // scores: one pass over K
        const float* k = kp + (tb[t / BS] * BS + t % BS) * row + h0 * D;
        for (int64_t r = 0; r < rows; ++r) s[r * max_ctx + t] = dot(qh + r * D, k + (r / G) * D, D) * sc;
      }
      for (int64_t r = 0; r < rows; ++r) {  // softmax per query head
        float* sr = s + r * max_ctx;
        const float inv = 1.f / exp_shifted(sr, n, max_of(sr, n));
        for (int64_t t = 0; t < n; ++t) sr[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {  // weighted sum: one pass over V
        const float* v = vp + (tb[t / BS] * BS + t % BS) * row + h0 * D;
        for (int64_t r = 0; r < rows; ++r) {
          const float w = s[r * max_ctx + t];
          const float* vr = v + (r / G) * D;
          float* a = acc.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += w * vr[d];
        }
      }
      std::copy(acc.begin(), acc.end(), op + (b * Hq + h0 * G) * D);
    }
  });
  return out;
}
