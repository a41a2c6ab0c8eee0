// The torch entry points of decode attention and of the KV writes around it: the checks of every
// tensor they are handed, then raw pointers. paged_decode_attention and rope_decode_attention make
// a DecodeJob (decode_job.h) and run its items on torch's threads; the decode stack
// (decode_stack_cpu.cpp) checks and makes its job once a step (rope_rows_check, decode_job_make),
// then runs rope_store_heads and the items of every layer in its own region. The
// kernels those items run are in attention_cpu.cpp: kept apart so each file reads as one thing
// (what is checked and written here, how a context is read there).
#include "aten_min.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "decode_job.h"
#include "rotary.h"
#include "widen.h"

using widen::bf16_t;

// The checks both entry points make of a layer's cache pair; true for a bf16 cache, false for fp32.
static bool cache_is_bf16(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || k_cache.scalar_type() == at::kFloat) && k_cache.dim() == 4 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "k_cache/v_cache must be contiguous [NB, BS, Hkv, D], both float32 or both bfloat16");
  return bf16;
}

// The checked core of both entry points: q rows `q_row` floats apart, each [Hq, D] contiguous;
// out [B, Hq, D] contiguous. Checks the tables against the cache before anything is read. (The
// decode stack makes one a step, for layers whose caches share one shape.)
void decode_job_make(const float* qp, int64_t q_row, int64_t B, int64_t Hq, int64_t D, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                     double scale, float* op, DecodeJob& j) {
  const bool bf16 = cache_is_bf16(k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [B, nblk]");
  TORCH_CHECK(ctx_lens.scalar_type() == at::kLong && ctx_lens.is_contiguous(), "ctx_lens must be int64");
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
  j.q = qp, j.q_row = q_row, j.k = k_cache.data_ptr(), j.v = v_cache.data_ptr(), j.bf16 = bf16, j.out = op;
  j.tables = tables, j.lens = lens, j.B = B, j.Hq = Hq, j.Hkv = Hkv, j.D = D, j.G = G, j.BS = BS, j.nblk = nblk;
  j.max_ctx = max_ctx, j.sc = static_cast<float>(scale);
}

// a made job planned for torch's threads and run by them
static void decode_job_run(DecodeJob& j) {
  decode_job_plan(j, at::get_num_threads());
  at::parallel_for(0, j.items, 1, [&](int64_t begin, int64_t end) { decode_job_items(j, begin, end); });
  decode_job_finish(j, j.out);
}

// q: [B, Hq, D] (rows may be strided); k_cache, v_cache: [NB, BS, Hkv, D]; block_tables: [B, nblk] int64;
// ctx_lens: [B] int64 (positions 0..ctx-1 are attended). Returns [B, Hq, D].
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& ctx_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1 &&
                  q.stride(1) == q.size(2),
              "q must be a CPU float32 [B, Hq, D] tensor with contiguous heads");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  auto out = at::empty({B, Hq, D}, q.options());
  DecodeJob j;
  decode_job_make(q.data_ptr<float>(), q.stride(0), B, Hq, D, k_cache, v_cache, block_tables, ctx_lens, scale,
                  out.data_ptr<float>(), j);
  decode_job_run(j);
  return out;
}

// `n` floats into a KV cache from element `at` on, rounded to the cache's dtype
static void store_head(void* cache, bool bf16, int64_t at, int64_t n, const float* src) {
  if (bf16) {
    bf16_t* d = static_cast<bf16_t*>(cache) + at;
    for (int64_t i = 0; i < n; ++i) d[i] = widen::to_bf16(src[i]);
  } else {
    std::memcpy(static_cast<float*>(cache) + at, src, n * sizeof(float));
  }
}

// One cache slot for each of `n` rows, every one below `cache_slots`: the slots' pointer
static const int64_t* checked_slots(const at::Tensor& slots, int64_t n, int64_t cache_slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == n,
              "slots must be a contiguous int64 tensor of ", n, " (one per row)");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < cache_slots, "cache slot out of range");
  return sp;
}

// New keys and values into their cache slots, rounded to the cache's dtype: k, v [T, Hkv, D] fp32
// (rows any stride, heads D apart: views into the fused q|k|v output) into k_cache, v_cache
// [NB, BS, Hkv, D] (fp32 or bf16) at flat slots [T]. One call per layer instead of PyTorch's two
// conversions and two index_copy_ (~14 us a layer at one decode row, 0.4 ms of a 30-layer step).
void write_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& slots) {
  const bool bf16 = cache_is_bf16(k_cache, v_cache);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), H = k_cache.size(2), D = k_cache.size(3);
  for (const at::Tensor* x : {&k, &v}) {
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->dim() == 3 && x->size(1) == H &&
                    x->size(2) == D && x->stride(2) == 1 && x->stride(1) == D,
                "k and v must be CPU float32 [T, Hkv, D] with contiguous heads matching the cache");
  }
  const int64_t T = k.size(0);
  TORCH_CHECK(v.size(0) == T, "k and v must have the same rows");
  const int64_t* sp = checked_slots(slots, T, NB * BS);
  const int64_t row = H * D;
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    store_head(k_cache.data_ptr(), bf16, sp[t] * row, row, kp + t * k.stride(0));
    store_head(v_cache.data_ptr(), bf16, sp[t] * row, row, vp + t * v.stride(0));
  }
}

// The checks of a step's rotary tables and cache slots, for B rows of heads of D into a cache of
// `cache_slots` positions (rope_decode_attention's, and the decode stack's once a step)
void rope_rows_check(int64_t B, int64_t D, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     int64_t cache_slots) {
  const int64_t half = D / 2;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == B * half && sin.numel() == B * half,
              "cos/sin must be contiguous float32 [B, D/2]");
  checked_slots(slots, B, cache_slots);
}

// Heads [h0, h1) of q|k|v (hq + 2 hkv heads of D) of every row: rotary on the q and k heads, and
// the row's new keys and values into its cache slot. On pointers that rope_rows_check and the
// cache's checks cleared: qkv [B, (hq + 2 hkv) * D], rows `ld` floats apart; the rotated queries
// into q [B, hq * D]; kr, one rotated key head [D]; the cache [slots, hkv, D], float or bf16.
// Why heads: the decode stack's one-region step has each thread run the heads whose columns it
// computed, straight after its q|k|v panels (no other thread's cache lines, no barrier of its
// own). Why raw pointers: it ran on one thread while the other waited, and the checks, views and
// allocations around it cost ~5 us a layer (146 us of a batch-1 step of the 135M model).
void rope_store_heads(const float* qkv, int64_t ld, int64_t B, int64_t hq, int64_t hkv, int64_t D, int64_t h0,
                      int64_t h1, const float* cos, const float* sin, const int64_t* slots, void* k_cache,
                      void* v_cache, bool bf16, float* q, float* kr) {
  const int64_t half = D / 2, row = hkv * D;
  for (int64_t b = 0; b < B; ++b) {
    const float* x = qkv + b * ld;
    const float *c = cos + b * half, *sn = sin + b * half;
    for (int64_t h = h0; h < h1; ++h) {
      if (h < hq) {
        rotate_head(x + h * D, c, sn, q + (b * hq + h) * D, half);
      } else if (h < hq + hkv) {
        rotate_head(x + h * D, c, sn, kr, half);
        store_head(k_cache, bf16, slots[b] * row + (h - hq) * D, D, kr);
      } else {
        store_head(v_cache, bf16, slots[b] * row + (h - hq - hkv) * D, D, x + h * D);
      }
    }
  }
}

// rope_decode_attention up to its work items: the checks, rotary, the new keys and values into
// the cache; `job` made (not planned) with the rotated queries in `q` and the output in `out`
static void rope_decode_prepare(const at::Tensor& qkv, int64_t hq, int64_t hkv, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& slots, const at::Tensor& block_tables,
                                const at::Tensor& ctx_lens, double scale, std::vector<float>& q,
                                const at::Tensor& out, DecodeJob& job) {
  const bool bf16 = cache_is_bf16(k_cache, v_cache);
  const int64_t B = qkv.size(0), D = k_cache.size(3);
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 2 &&
                  qkv.size(1) == (hq + 2 * hkv) * D && qkv.stride(1) == 1 && D % 2 == 0,
              "qkv must be CPU float32 [B, (Hq + 2 * Hkv) * D] with contiguous rows");
  TORCH_CHECK(k_cache.size(2) == hkv, "the cache holds ", k_cache.size(2), " KV heads, qkv ", hkv);
  rope_rows_check(B, D, cos, sin, slots, k_cache.size(0) * k_cache.size(1));
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == B * hq * D,
              "out must be a contiguous float32 [B, Hq * D] tensor");
  q.resize(static_cast<size_t>(B * hq * D + D));  // the rotated queries, then a rotated key head
  rope_store_heads(qkv.data_ptr<float>(), qkv.stride(0), B, hq, hkv, D, 0, hq + 2 * hkv, cos.data_ptr<float>(),
                   sin.data_ptr<float>(), slots.data_ptr<int64_t>(), k_cache.data_ptr(), v_cache.data_ptr(), bf16,
                   q.data(), q.data() + B * hq * D);
  decode_job_make(q.data(), hq * D, B, hq, D, k_cache, v_cache, block_tables, ctx_lens, scale, out.data_ptr<float>(),
                  job);
}

// A decode step's whole attention of one layer in one call: qkv [B, (Hq + 2 Hkv) * D] (one row per
// sequence, the fused q|k|v projection), cos/sin [B, D/2]: rotary on q and k, the new k and v into
// their cache slots, decode attention over each context -> [B, Hq * D]. What it saves is dispatch:
// through the Ops seam, seven views and three calls per layer (~8 us each at batch 1, where a
// 30-layer int8 step of the 135M model is ~5 ms); inside, it touches raw pointers only (rotated q in
// a local buffer, rotated k and v written straight into their slots), because each ATen op (narrow,
// view, empty) costs ~1 us cold after a step's weight stream, as much as rotating a row.
at::Tensor rope_decode_attention(const at::Tensor& qkv, int64_t hq, int64_t hkv, const at::Tensor& cos,
                                 const at::Tensor& sin, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& slots,
                                 const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale) {
  cache_is_bf16(k_cache, v_cache);  // its checks first: the output's size reads the cache's head size
  auto out = at::empty({qkv.size(0), hq * k_cache.size(3)}, qkv.options());
  std::vector<float> q;
  DecodeJob job;
  rope_decode_prepare(qkv, hq, hkv, cos, sin, k_cache, v_cache, slots, block_tables, ctx_lens, scale, q, out, job);
  decode_job_run(job);
  return out;
}
