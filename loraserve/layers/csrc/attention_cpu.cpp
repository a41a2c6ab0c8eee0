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
//
// The cache may be bf16 (`--kv-cache-dtype bfloat16`, the default when serving bf16): each value
// is widened to fp32 in registers as it streams (widen.h), so the pass reads half the bytes and the
// scores, softmax and sums stay fp32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "decode_job.h"
#include "simd.h"
#include "softmax_row.h"
#include "widen.h"

namespace {

using widen::bf16_t;
using widen::to_f;

template <typename T>  // the cache's element: float or bf16_t
inline float dot(const float* a, const T* b, int64_t n) {
#if LORASERVE_SIMD
  if (n % simd::W == 0) {  // head sizes are multiples of 16 in practice: 4 (AVX2: 8) FMAs and one sum at D=64
    simd::V acc = simd::zero();
    for (int64_t i = 0; i < n; i += simd::W) acc = simd::fma(simd::load(a + i), widen::wload(b + i), acc);
    return simd::sum(acc);
  }
#endif
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * to_f(b[i]);
  return sum;
}

// One query row's scaled scores into softmax weights, in place; a split part (ml not null) keeps
// the row's score max and sum of exponentials in ml[0], ml[1] instead of normalising.
inline void softmax_scores(float* sr, int64_t len, float* ml) {
  const float m = max_of(sr, len), sum = exp_shifted(sr, len, m);
  if (ml) {
    ml[0] = m;
    ml[1] = sum;
    return;
  }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < len; ++t) sr[t] *= inv;
}

#if LORASERVE_SIMD
// The cache is cold at every layer (a whole step's weights streamed through since it was last
// read), and one head's slice of a position is a few lines out of each cache row, a stride the
// hardware prefetcher follows late: the first head's passes ask for the lines of every head the
// work item will read (`pf` bytes from the slice) this many positions ahead, so the later heads'
// passes find them in L2 (16 positions ahead measured no better). 2-core Zen 4, real steps:
// batch 1 (ctx 229, 1 thread) 55 -> 39 us a layer (hot: 10); 32 rows (ctx ~230, 2 threads)
// 1,068 -> 760 us.
constexpr int64_t kPrefetchTokens = 8;

template <typename T>
inline void prefetch_rows(const T* base, const int64_t* tb, int64_t BS, int64_t row, int64_t t, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(base + (tb[t / BS] * BS + t % BS) * row);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// Scaled scores of RB query rows that share one KV head over positions t0..n-1, for head sizes
// whose queries do not fit the registers beside the V pass's accumulators (D = 64 with AVX2: 8
// vectors a row): the queries are read from L1 as FMA operands, so one pass over K serves RB rows
// instead of one pass per row. Each pass over K starts cold from DRAM (latency-bound at 32 decode
// rows); three rows to a pass give each cold line three times the work.
template <int NV, int RB, typename T>
inline void score_rows(const float* q, float* s, int64_t s_stride, int64_t t0, int64_t n, const T* kp,
                       const int64_t* tb, int64_t BS, int64_t row, float sc, int64_t pf) {
  constexpr int64_t D = NV * simd::W;
  for (int64_t t = t0; t < n; ++t) {
    const T* k = kp + (tb[t / BS] * BS + t % BS) * row;
    if (pf && t + kPrefetchTokens < n) prefetch_rows(kp, tb, BS, row, t + kPrefetchTokens, pf);
    simd::V acc[RB][2];
    for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = simd::zero();
    for (int j = 0; j < NV; ++j) {
      const simd::V kv = widen::wload(k + j * simd::W);
      for (int r = 0; r < RB; ++r) acc[r][j & 1] = simd::fma(simd::load(q + r * D + j * simd::W), kv, acc[r][j & 1]);
    }
    for (int r = 0; r < RB; ++r) s[r * s_stride + t - t0] = simd::sum(simd::add(acc[r][0], acc[r][1])) * sc;
  }
}

// Weighted sums of VB query rows that share one KV head over positions t0..n-1 (their softmax
// weights in s), for head sizes whose VB rows of accumulators do not fit the registers whole
// (D = 64 with AVX2 is 8 vectors a row; D = 128 with AVX2 and 256 with AVX-512 are 16): D in
// chunks of NC vectors, VB * NC accumulators, so one load and widening of a V row serves VB query
// rows. Each accumulator takes the same FMAs in the same order as head_rows' V pass, so the sums
// are its bits. Why: with one V pass per query row, the G = 3 rows of SmolLM2's KV heads loaded
// and widened every V row three times; at 32 decode rows attention was ~15 % of an AVX2 int8
// step. With the cache in L3 those loads set its pace (~65 cycles per position and KV head; 32
// rows x 160 keys, 2 threads: 203 -> 162 us a layer); from DRAM its latency does (412 -> 387).
template <int NV, int VB, typename T>
inline void weigh_rows(float* out, const float* s, int64_t s_stride, int64_t t0, int64_t n, const T* vp,
                       const int64_t* tb, int64_t BS, int64_t row, int64_t pf) {
  constexpr int NC = std::min(NV, VB == 1 ? 8 : 12 / VB);
  static_assert(NV % NC == 0, "chunks must tile the head");
  constexpr int64_t D = NV * simd::W;
  for (int c = 0; c < NV; c += NC) {
    simd::V o[VB][NC];
    for (int r = 0; r < VB; ++r)
      for (int j = 0; j < NC; ++j) o[r][j] = simd::zero();
    for (int64_t t = t0; t < n; ++t) {
      const T* v = vp + (tb[t / BS] * BS + t % BS) * row + c * simd::W;
      if (pf && c == 0 && t + kPrefetchTokens < n) prefetch_rows(vp, tb, BS, row, t + kPrefetchTokens, pf);
      simd::V w[VB];
      for (int r = 0; r < VB; ++r) w[r] = simd::set1(s[r * s_stride + t - t0]);
      for (int j = 0; j < NC; ++j) {
        const simd::V vv = widen::wload(v + j * simd::W);
        for (int r = 0; r < VB; ++r) o[r][j] = simd::fma(w[r], vv, o[r][j]);
      }
    }
    for (int r = 0; r < VB; ++r)
      for (int j = 0; j < NC; ++j) simd::store(out + r * D + (c + j) * simd::W, o[r][j]);
  }
}

// Scores and weighted sum of RB query rows that share one KV head, for head sizes of NV
// vectors, over positions t0..n-1: the rows' queries and output accumulators stay in registers
// for the whole pass, so each cached K and V row is loaded once per block of rows and no partial
// sum goes through memory (the generic loop reloads and stores every row's accumulator once per
// token; at 32 decode rows that made attention cost as much as all the projections of an int8
// step). ml null: out is the attention output; else the part of a split context (decode_split):
// out unnormalised, each row's score max and sum of exponentials in ml[2r], ml[2r + 1].
template <int NV, int RB, typename T>
inline void head_rows(const float* q, float* out, float* s, int64_t s_stride, int64_t t0, int64_t n, const T* kp,
                      const T* vp, const int64_t* tb, int64_t BS, int64_t row, float sc, int64_t pf, float* ml) {
  constexpr int64_t D = NV * simd::W;
  simd::V qv[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) qv[r][j] = simd::load(q + r * D + j * simd::W);
  for (int64_t t = t0; t < n; ++t) {  // scores: one pass over K
    const T* k = kp + (tb[t / BS] * BS + t % BS) * row;
    if (pf && t + kPrefetchTokens < n) prefetch_rows(kp, tb, BS, row, t + kPrefetchTokens, pf);
    simd::V acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = simd::zero();
    for (int j = 0; j < NV; ++j) {
      const simd::V kv = widen::wload(k + j * simd::W);
      for (int r = 0; r < RB; ++r) acc[r] = simd::fma(qv[r][j], kv, acc[r]);
    }
    for (int r = 0; r < RB; ++r) s[r * s_stride + t - t0] = simd::sum(acc[r]) * sc;
  }
  for (int r = 0; r < RB; ++r) softmax_scores(s + r * s_stride, n - t0, ml ? ml + 2 * r : nullptr);
  static_assert(RB * NV <= 12, "weigh_rows keeps the rows' whole accumulators in registers here");
  weigh_rows<NV, RB, T>(out, s, s_stride, t0, n, vp, tb, BS, row, pf);  // weighted sum: one pass over V
}

// The G rows of one KV head, in blocks of as many rows as the registers hold.
template <int NV, typename T>
void head_all_rows(const float* q, float* out, float* s, int64_t s_stride, int64_t G, int64_t t0, int64_t n,
                   const T* kp, const T* vp, const int64_t* tb, int64_t BS, int64_t row, float sc, int64_t pf,
                   float* ml) {
  constexpr int RB = NV <= 2 ? 4 : NV <= 4 ? 3 : 1;  // RB * NV accumulators + NV loads fit the registers
  constexpr int64_t D = NV * simd::W;
  int64_t r = 0;
  if constexpr (RB == 1) {  // scores of up to 3 rows per pass over K, then their V passes 3 rows at a time
    for (; r + 3 <= G; r += 3)
      score_rows<NV, 3, T>(q + r * D, s + r * s_stride, s_stride, t0, n, kp, tb, BS, row, sc, r ? 0 : pf);
    for (; r < G; ++r) score_rows<NV, 1, T>(q + r * D, s + r * s_stride, s_stride, t0, n, kp, tb, BS, row, sc, r ? 0 : pf);
    for (r = 0; r < G; ++r) softmax_scores(s + r * s_stride, n - t0, ml ? ml + 2 * r : nullptr);
    for (r = 0; r + 3 <= G; r += 3)
      weigh_rows<NV, 3, T>(out + r * D, s + r * s_stride, s_stride, t0, n, vp, tb, BS, row, r ? 0 : pf);
    for (; r < G; ++r) weigh_rows<NV, 1, T>(out + r * D, s + r * s_stride, s_stride, t0, n, vp, tb, BS, row, r ? 0 : pf);
  } else {
    for (; r + RB <= G; r += RB)
      head_rows<NV, RB, T>(q + r * D, out + r * D, s + r * s_stride, s_stride, t0, n, kp, vp, tb, BS, row, sc,
                           r ? 0 : pf, ml ? ml + 2 * r : nullptr);
    for (; r < G; ++r)
      head_rows<NV, 1, T>(q + r * D, out + r * D, s + r * s_stride, s_stride, t0, n, kp, vp, tb, BS, row, sc,
                          r ? 0 : pf, ml ? ml + 2 * r : nullptr);
  }
}

// The head sizes with a register path, the one list of them: f(std::integral_constant<int, NV>)
// for a head of D = NV vectors; false (f not called) for any other size, which the generic loop
// runs (and decode_job_plan does not split).
template <typename F>
inline bool with_register_head(int64_t D, F&& f) {
  switch (D) {
    case 2 * simd::W: f(std::integral_constant<int, 2>{}); return true;
    case 4 * simd::W: f(std::integral_constant<int, 4>{}); return true;
    case 8 * simd::W: f(std::integral_constant<int, 8>{}); return true;
    case 16 * simd::W: f(std::integral_constant<int, 16>{}); return true;
    default: return false;
  }
}

// false when the head size has no register path (the generic loop runs instead)
template <typename T>
inline bool head_fast(int64_t D, const float* q, float* out, float* s, int64_t s_stride, int64_t G, int64_t t0,
                      int64_t n, const T* kp, const T* vp, const int64_t* tb, int64_t BS, int64_t row, float sc,
                      int64_t pf, float* ml = nullptr) {
  return with_register_head(D, [&](auto nv) {
    head_all_rows<decltype(nv)::value>(q, out, s, s_stride, G, t0, n, kp, vp, tb, BS, row, sc, pf, ml);
  });
}

// Fewer sequences than threads (batch 1): each sequence's positions split into S contiguous
// parts, one work item each over all heads, merged by their score maxima (flash-decoding). Items
// of one KV head each (the split this replaces) left a thread idle at batch 1 with 3 KV heads on
// 2 threads and read each cache row in strided thirds; a part reads whole rows in block order.
// One layer, batch 1, 9 query / 3 KV heads of 64, 2 threads (2-core EPYC, Zen 5): context 1,000
// 54 -> 22 us with a bf16 cache, 65 -> 56 us fp32; 4,000: 236 -> 124 us, 301 -> 223 us.
constexpr int64_t kMinSplitPositions = 32;  // shorter parts cost more to merge than they save

// Part (b, c)'s scores and weighted sums: positions [t0, t1) of sequence b, all heads
template <typename T>
void split_item(const DecodeJob& j, int64_t it, float* scores, int64_t span) {
  const T* kp = static_cast<const T*>(j.k);
  const T* vp = static_cast<const T*>(j.v);
  const int64_t row = j.Hkv * j.D, b = it / j.S, c = it % j.S, n = j.lens[b], t0 = n * c / j.S,
                t1 = n * (c + 1) / j.S;
  float* pm = j.ml + it * j.Hq * 2;
  if (t1 == t0) {  // a sequence shorter than S positions: an empty part weighs nothing
    for (int64_t r = 0; r < j.Hq; ++r) pm[2 * r] = -std::numeric_limits<float>::infinity(), pm[2 * r + 1] = 0.f;
    return;
  }
  for (int64_t h = 0; h < j.Hkv; ++h)
    head_fast(j.D, j.q + b * j.q_row + h * j.G * j.D, j.part + (it * j.Hq + h * j.G) * j.D, scores + h * j.G * span,
              span, j.G, t0, t1, kp + h * j.D, vp + h * j.D, j.tables + b * j.nblk, j.BS, row, j.sc,
              h ? 0 : row * static_cast<int64_t>(sizeof(T)), pm + h * j.G * 2);
}
#endif

// Item (sequence, range of `per` KV heads) of the unsplit path
template <typename T>
void head_item(const DecodeJob& j, int64_t it, std::vector<float>& scores, std::vector<float>& acc) {
  const T* kp = static_cast<const T*>(j.k);
  const T* vp = static_cast<const T*>(j.v);
  const int64_t per = j.per, G = j.G, D = j.D, max_ctx = j.max_ctx, row = j.Hkv * D;
  const float sc = j.sc;
  const int64_t items_per_seq = j.Hkv / per;
  const int64_t b = it / items_per_seq, h0 = (it % items_per_seq) * per, n = j.lens[b];
  const int64_t* tb = j.tables + b * j.nblk;
  const float* qh = j.q + b * j.q_row + h0 * G * D;  // the per*G query heads of KV heads h0..
  float* s = scores.data();
  const int64_t rows = per * G;  // query heads in this item; row r reads KV head h0 + r / G
#if LORASERVE_SIMD
  {
    bool done = true;
    for (int64_t hh = 0; hh < per && done; ++hh)
      done = head_fast(D, qh + hh * G * D, j.out + (b * j.Hq + (h0 + hh) * G) * D, s + hh * G * max_ctx, max_ctx, G,
                       0, n, kp + (h0 + hh) * D, vp + (h0 + hh) * D, tb, j.BS, row, sc,
                       // the first head prefetches the item's heads
                       hh ? 0 : per * D * static_cast<int64_t>(sizeof(T)));
    if (done) return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) {  // scores: one pass over K
    const T* k = kp + (tb[t / j.BS] * j.BS + t % j.BS) * row + h0 * D;
    for (int64_t r = 0; r < rows; ++r) s[r * max_ctx + t] = dot(qh + r * D, k + (r / G) * D, D) * sc;
  }
  for (int64_t r = 0; r < rows; ++r) softmax_scores(s + r * max_ctx, n, nullptr);  // per query head
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t t = 0; t < n; ++t) {  // weighted sum: one pass over V
    const T* v = vp + (tb[t / j.BS] * j.BS + t % j.BS) * row + h0 * D;
    for (int64_t r = 0; r < rows; ++r) {
      const float w = s[r * max_ctx + t];
      const T* vr = v + (r / G) * D;
      float* a = acc.data() + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += w * to_f(vr[d]);
    }
  }
  std::copy(acc.begin(), acc.end(), j.out + (b * j.Hq + h0 * G) * D);
}

template <typename T>
void job_items(const DecodeJob& j, int64_t begin, int64_t end) {
#if LORASERVE_SIMD
  if (j.S > 1) {
    const int64_t span = (j.max_ctx + j.S - 1) / j.S + 1;
    std::vector<float> scores(j.Hq * span);
    for (int64_t it = begin; it < end; ++it) split_item<T>(j, it, scores.data(), span);
    return;
  }
#endif
  std::vector<float> scores(j.per * j.G * j.max_ctx), acc(j.per * j.G * j.D);
  for (int64_t it = begin; it < end; ++it) head_item<T>(j, it, scores, acc);
}

}  // namespace

// How the work splits for `threads` threads. Fewer sequences than threads and a context long
// enough: each sequence's positions in S parts (split_item, merged by decode_job_finish). Else
// work items are (sequence, range of KV heads). With at least as many sequences as threads, an
// item takes all heads of its sequence, so each pass reads whole contiguous cache rows (all heads
// of a position) in block order, which the prefetcher follows; splitting heads across threads
// left every pass reading a third of each row from DRAM. Fewer sequences than threads and a
// context too short to split: one head per item, so every core has work.
void decode_job_plan(DecodeJob& j, int64_t threads) {
  j.S = 1;
#if LORASERVE_SIMD
  if (j.B < threads && with_register_head(j.D, [](auto) {}))
    j.S = std::max<int64_t>(1, std::min((threads + j.B - 1) / j.B, j.max_ctx / kMinSplitPositions));
#endif
  j.per = j.B >= threads ? j.Hkv : 1;
  j.items = j.S > 1 ? j.B * j.S : j.B * (j.Hkv / j.per);
  if (j.S > 1) {
    j.scratch.resize(static_cast<size_t>(j.B * j.S * j.Hq * (j.D + 2)));
    j.part = j.scratch.data();
    j.ml = j.part + j.B * j.S * j.Hq * j.D;
  }
}

// items [begin, end) of a planned job: each computed the same whichever thread runs it
void decode_job_items(const DecodeJob& j, int64_t begin, int64_t end) {
  if (j.bf16) job_items<bf16_t>(j, begin, end);
  else job_items<float>(j, begin, end);
}

// Prefetch (into L1) the cache lines items [begin, end) of a planned job will read from the cache
// pair k, v (one layer's; the job's own are ignored), issued before the layer's q|k|v projection
// so they arrive while it streams its weights: a context's cache of ~100 KB a layer is read cold
// after the step's weights have passed through every cache (at 128 positions, 8 -> 5 us a layer).
void decode_job_prefetch(const DecodeJob& j, const void* k, const void* v, int64_t begin, int64_t end) {
  const int64_t el = j.bf16 ? 2 : 4, row = j.Hkv * j.D * el;
  const char* kc = static_cast<const char*>(k);
  const char* vc = static_cast<const char*>(v);
  for (int64_t it = begin; it < end; ++it) {
    int64_t b, t0, t1, h0 = 0, h1 = j.Hkv;
    if (j.S > 1) {
      b = it / j.S;
      const int64_t c = it % j.S, n = j.lens[b];
      t0 = n * c / j.S, t1 = n * (c + 1) / j.S;
    } else {
      const int64_t items_per_seq = j.Hkv / j.per;
      b = it / items_per_seq, h0 = (it % items_per_seq) * j.per, h1 = h0 + j.per;
      t0 = 0, t1 = j.lens[b];
    }
    const int64_t* tb = j.tables + b * j.nblk;
    t1 = std::min(t1, j.nblk * j.BS);  // unchecked input (the checks come later): stay in the table
    const int64_t first = h0 * j.D * el, bytes = (h1 - h0) * j.D * el;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t off = (tb[t / j.BS] * j.BS + t % j.BS) * row + first;
      for (int64_t q = 0; q < bytes; q += 64) {
        __builtin_prefetch(kc + off + q, 0, 3);
        __builtin_prefetch(vc + off + q, 0, 3);
      }
    }
  }
}

// a split job's parts merged by their score maxima into op [B, Hq, D] (nothing to do unsplit)
void decode_job_finish(const DecodeJob& j, float* op) {
  if (j.S <= 1) return;
  const int64_t B = j.B, S = j.S, Hq = j.Hq, D = j.D;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r < Hq; ++r) {
      float m = -std::numeric_limits<float>::infinity(), den = 0.f;
      for (int64_t c = 0; c < S; ++c) m = std::max(m, j.ml[((b * S + c) * Hq + r) * 2]);
      float* o = op + (b * Hq + r) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t c = 0; c < S; ++c) {
        const float* pm = j.ml + ((b * S + c) * Hq + r) * 2;
        if (pm[1] == 0.f) continue;
        const float w = std::exp(pm[0] - m);
        den += w * pm[1];
        const float* pp = j.part + ((b * S + c) * Hq + r) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * pp[d];
      }
      const float inv = 1.f / den;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  }
}
