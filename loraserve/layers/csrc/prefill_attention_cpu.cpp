// Causal attention of fresh prefills (prompts with no earlier context) over their own new keys.
//
// Why a kernel: PyTorch's CPU path for a GQA prompt folds each KV head's G query heads into rows
// and runs SDPA with an explicit causal mask, so its flash kernel computes every score above the
// diagonal too; on a 128-token prompt of SmolLM2-135M (9 query / 3 KV heads of 64) that is ~0.45 ms
// a layer on 2 cores, a tenth of the prompt. Here both products are small register-blocked GEMMs:
// a prompt's keys are transposed once per KV head, so the scores of a block of query rows come out a
// vector of keys per FMA with no horizontal sums; only the key tiles at or before a block's last
// position are computed; and the G query heads that share a KV head read its keys and values in the
// same pass. Scores and sums stay fp32 and each row's softmax is exact (max, then exp and sum over
// the whole row, not online): a work item keeps its rows' score rows, and long prompts get fewer
// positions per item so that stays within kScratchFloats.
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "simd.h"
#include "softmax_row.h"

namespace {

constexpr int64_t kMaxBlockPositions = 16;  // query positions per work item (times G query rows)
constexpr int64_t kScratchFloats = 1 << 17;  // a work item's score rows: 512 KB, within L2

#if LORASERVE_SIMD
constexpr int64_t kVW = simd::W;
constexpr int64_t kKT = 2 * simd::W;           // keys per score tile: two vectors
constexpr int kRB = simd::W == 16 ? 12 : 6;    // score rows per register block: 2 * kRB accumulators
constexpr int kRB2 = 6;                        // output rows per register block of the weighted sum
constexpr int kNV = simd::W == 16 ? 4 : 2;     // vectors of the head per pass of the weighted sum
#else
constexpr int64_t kVW = 1;
constexpr int64_t kKT = 1;
constexpr int kRB = 1;
#endif

struct Span {
  int64_t start, len;  // rows of the prompt in q/k/v/out
  int64_t lp;          // len rounded up to whole score tiles: the row length of its transposed keys
};

struct Item {
  int64_t span, head, p0, p1;  // one KV head's query positions [p0, p1) of one prompt
  int64_t cost() const { return (p1 - p0) * p1; }
};

struct Geometry {
  const float *q, *k, *v;
  float* out;
  int64_t ldq, ldk, ldv, Hq, Hkv, D, G;
  float scale;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// kt [D, sp.lp]: one prompt's keys of one KV head, transposed and zero-padded to a whole score tile
void pack_keys(const Geometry& g, const Span& sp, int64_t h, float* kt) {
  for (int64_t d = 0; d < g.D; ++d) {
    float* row = kt + d * sp.lp;
    for (int64_t j = 0; j < sp.len; ++j) row[j] = g.k[(sp.start + j) * g.ldk + h * g.D + d];
    std::fill(row + sp.len, row + sp.lp, 0.f);
  }
}

#if LORASERVE_SIMD
// s[r, j .. j + NK * W) = sc * q_r . kt[:, j ..) for kRB query rows read in place (a zero row
// past the item's last): packing them first stalled on each row's first touch, here the loads
// overlap the FMAs. NK = 1 for a block's last tile when one vector of keys reaches its diagonal.
template <int NK>
inline void score_tile(const float* const* qr, const float* kt, int64_t lp, int64_t D, float sc, float* s,
                       int64_t lds, int64_t j) {
  simd::V acc[kRB][NK];
  for (int r = 0; r < kRB; ++r)
    for (int c = 0; c < NK; ++c) acc[r][c] = simd::zero();
  for (int64_t d = 0; d < D; ++d) {
    simd::V kv[NK];
    for (int c = 0; c < NK; ++c) kv[c] = simd::load(kt + d * lp + j + c * simd::W);
    for (int r = 0; r < kRB; ++r) {
      const simd::V b = simd::set1(qr[r][d]);
      for (int c = 0; c < NK; ++c) acc[r][c] = simd::fma(b, kv[c], acc[r][c]);
    }
  }
  const simd::V scv = simd::set1(sc);
  for (int r = 0; r < kRB; ++r)
    for (int c = 0; c < NK; ++c) simd::store(s + r * lds + j + c * simd::W, simd::mul(acc[r][c], scv));
}

// o_r[0 .. NV * W) = inv_r * sum_j p_r[j] v_j for kRB2 rows (p_r: s + r * lds; v_j: v + j * ldv)
template <int NV>
inline void weighted_sum(const float* s, int64_t lds, int64_t n, const float* v, int64_t ldv, float* const* o,
                         const float* inv, int rows) {
  simd::V acc[kRB2][NV];
  for (int r = 0; r < kRB2; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = simd::zero();
  for (int64_t j = 0; j < n; ++j) {
    simd::V vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = simd::load(v + j * ldv + c * simd::W);
    for (int r = 0; r < kRB2; ++r) {
      const simd::V w = simd::set1(s[r * lds + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = simd::fma(w, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < NV; ++c) simd::store(o[r] + c * simd::W, simd::mul(acc[r][c], simd::set1(inv[r])));
}
#endif

// Per-thread buffers, grown to the largest item a thread meets; `zero` is the query row of the
// padding rows of a register block (D zeros).
struct Scratch {
  explicit Scratch(int64_t D) : zero(D, 0.f) {}
  std::vector<float> s, inv, zero;
  std::vector<const float*> q;
  std::vector<float*> o;
};

void run_item(const Geometry& g, const Span& sp, const Item& it, const float* kt, Scratch& w) {
  const int64_t G = g.G, D = g.D, R = (it.p1 - it.p0) * G, Rp = round_up(R, kRB), lp = sp.lp;
  const int64_t lds = round_up(it.p1, kKT);
  w.s.resize(Rp * lds);
  w.inv.resize(Rp);
  w.o.resize(Rp);
  w.q.resize(Rp);
  auto pos = [&](int64_t r) { return it.p0 + r / G; };  // row r: position p0 + r / G, head h * G + r % G
  for (int64_t r = 0; r < Rp; ++r) {
    const bool real = r < R;
    w.q[r] = real ? g.q + (sp.start + pos(r)) * g.ldq + (it.head * G + r % G) * D : w.zero.data();
    w.o[r] = real ? g.out + (sp.start + pos(r)) * g.Hq * D + (it.head * G + r % G) * D : nullptr;
  }
  // scores: the key tiles at or before each register block's last position
  float* s = w.s.data();
  for (int64_t b = 0; b < Rp; b += kRB) {
    const int64_t n = pos(std::min(b + kRB, R) - 1) + 1;
#if LORASERVE_SIMD
    for (int64_t j = 0; j < n; j += kKT) {
      if (n - j > simd::W)
        score_tile<2>(w.q.data() + b, kt, lp, D, g.scale, s + b * lds, lds, j);
      else
        score_tile<1>(w.q.data() + b, kt, lp, D, g.scale, s + b * lds, lds, j);
    }
#else
    for (int64_t r = b; r < std::min(b + kRB, R); ++r)
      for (int64_t j = 0; j < n; ++j) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += w.q[r][d] * kt[d * lp + j];
        s[r * lds + j] = acc * g.scale;
      }
#endif
  }
  // softmax per row over its own causal prefix; later keys weigh 0. Whole vectors only: the keys
  // past the prefix up to the next vector's end read as -inf (exp gives them ~1e-38 each, nothing
  // against a sum >= 1, and they are zeroed after), since a scalar tail of up to W - 1 exps cost
  // more than the row's vectors at these lengths.
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * lds;
    const int64_t n = pos(r) + 1, nv = round_up(n, kVW);
    std::fill(sr + n, sr + nv, -std::numeric_limits<float>::infinity());
    w.inv[r] = 1.f / exp_shifted(sr, nv, max_of(sr, nv));
    std::fill(sr + n, sr + lds, 0.f);
  }
  const float* vh = g.v + sp.start * g.ldv + it.head * D;
#if LORASERVE_SIMD
  if (D % simd::W == 0) {
    for (int64_t b = 0; b < R; b += kRB2) {
      const int rows = static_cast<int>(std::min<int64_t>(kRB2, R - b));
      const int64_t n = pos(b + rows - 1) + 1;
      float* o[kRB2];
      if (D % (kNV * simd::W) == 0) {
        for (int64_t c = 0; c < D; c += kNV * simd::W) {
          for (int r = 0; r < rows; ++r) o[r] = w.o[b + r] + c;
          weighted_sum<kNV>(s + b * lds, lds, n, vh + c, g.ldv, o, w.inv.data() + b, rows);
        }
      } else {
        for (int64_t c = 0; c < D; c += simd::W) {
          for (int r = 0; r < rows; ++r) o[r] = w.o[b + r] + c;
          weighted_sum<1>(s + b * lds, lds, n, vh + c, g.ldv, o, w.inv.data() + b, rows);
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < R; ++r) {
    float* o = w.o[r];
    std::fill(o, o + D, 0.f);
    const int64_t n = pos(r) + 1;
    for (int64_t j = 0; j < n; ++j) {
      const float p = s[r * lds + j] * w.inv[r];
      for (int64_t d = 0; d < D; ++d) o[d] += p * vh[j * g.ldv + d];
    }
  }
}

}  // namespace

// q [T, Hq, D], k and v [T, Hkv, D]: CPU float32, rows any stride, heads contiguous (views into a
// fused q|k|v output), already rotated; spans: (first row, end row) of each fresh prefill. Writes
// each span's rows of out [T, Hq, D] (contiguous float32); other rows are left as they are.
void prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::vector<std::pair<int64_t, int64_t>>& spans, double scale, const at::Tensor& out) {
  for (const at::Tensor* x : {&q, &k, &v}) {
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->dim() == 3 && x->stride(2) == 1 &&
                    x->stride(1) == x->size(2),
                "q, k and v must be CPU float32 [T, H, D] with contiguous heads");
  }
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && k.size(2) == D && v.sizes() == k.sizes(),
              "k and v must be [T, Hkv, D] like q's rows and head size");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == q.sizes(),
              "out must be a contiguous CPU float32 tensor shaped like q");
  std::vector<Span> sp;
  for (const auto& [s, e] : spans) {
    TORCH_CHECK(0 <= s && s < e && e <= T, "prefill span out of range");
    sp.push_back({s, e - s, round_up(e - s, kKT)});
  }
  if (sp.empty()) return;
  const Geometry g{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                   q.stride(0), k.stride(0), v.stride(0), Hq, Hkv, D, Hq / Hkv, static_cast<float>(scale)};
  // transposed keys of every (prompt, KV head)
  std::vector<int64_t> kt_off(sp.size() * Hkv + 1, 0);
  for (size_t i = 0; i < sp.size(); ++i)
    for (int64_t h = 0; h < Hkv; ++h) kt_off[i * Hkv + h + 1] = kt_off[i * Hkv + h] + D * sp[i].lp;
  std::vector<float> kt(kt_off.back());
  at::parallel_for(0, static_cast<int64_t>(sp.size()) * Hkv, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      pack_keys(g, sp[i / Hkv], i % Hkv, kt.data() + kt_off[i]);
  });
  // work items, dealt to threads largest first onto the least loaded (causal rows cost their position)
  std::vector<Item> items;
  for (size_t i = 0; i < sp.size(); ++i) {
    const int64_t qb = std::clamp<int64_t>(kScratchFloats / (g.G * sp[i].lp), 1, kMaxBlockPositions);
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t p = 0; p < sp[i].len; p += qb)
        items.push_back({static_cast<int64_t>(i), h, p, std::min(p + qb, sp[i].len)});
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost() > b.cost(); });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size()));
  std::vector<std::vector<Item>> bins(threads);
  std::vector<int64_t> load(threads, 0);
  for (const Item& it : items) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    bins[t].push_back(it);
    load[t] += it.cost();
  }
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    Scratch w(D);
    for (int64_t t = b; t < e; ++t)
      for (const Item& it : bins[t]) run_item(g, sp[it.span], it, kt.data() + kt_off[it.span * Hkv + it.head], w);
  });
}
