// The torch entry points of decode attention and of the KV writes around it: the checks of every
// tensor they are handed, then raw pointers. paged_decode_attention and rope_decode_attention make
// a DecodeJob (decode_job.h) and run its items on torch's threads; the decode stack
// (decode_stack_cpu.cpp) calls rope_decode_prepare and runs the items in its own region. The
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
// out [B, Hq, D] contiguous. Checks the tables against the cache before anything is read.
static void decode_job_make(const float* qp, int64_t q_row, int64_t B, int64_t Hq, int64_t D,
                            const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale, float* op,
                            DecodeJob& j) {
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

// One position's keys and values (`row` floats each) into cache slot `slot`, rounded to the cache's dtype.
static void store_slot(const at::Tensor& k_cache, const at::Tensor& v_cache, bool bf16, int64_t slot,
                       int64_t row, const float* ks, const float* vs) {
  if (bf16) {
    bf16_t* kd = static_cast<bf16_t*>(k_cache.data_ptr()) + slot * row;
    bf16_t* vd = static_cast<bf16_t*>(v_cache.data_ptr()) + slot * row;
    for (int64_t i = 0; i < row; ++i) kd[i] = widen::to_bf16(ks[i]);
    for (int64_t i = 0; i < row; ++i) vd[i] = widen::to_bf16(vs[i]);
  } else {
    std::memcpy(k_cache.data_ptr<float>() + slot * row, ks, row * sizeof(float));
    std::memcpy(v_cache.data_ptr<float>() + slot * row, vs, row * sizeof(float));
  }
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
  TORCH_CHECK(v.size(0) == T && slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T,
              "slots must be a contiguous int64 [T]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < NB * BS, "cache slot out of range");
  const int64_t row = H * D;
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    store_slot(k_cache, v_cache, bf16, sp[t], row, kp + t * k.stride(0), vp + t * v.stride(0));
}

// rope_decode_attention up to its work items: the checks, rotary, the new keys and values into
// the cache; `job` made (not planned) with the rotated queries in `q` and the output in `out`
void rope_decode_prepare(const at::Tensor& qkv, int64_t hq, int64_t hkv, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                         double scale, std::vector<float>& q, const at::Tensor& out, DecodeJob& job) {
  const bool bf16 = cache_is_bf16(k_cache, v_cache);
  const int64_t B = qkv.size(0), NB = k_cache.size(0), BS = k_cache.size(1), D = k_cache.size(3), half = D / 2;
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 2 &&
                  qkv.size(1) == (hq + 2 * hkv) * D && qkv.stride(1) == 1 && D % 2 == 0,
              "qkv must be CPU float32 [B, (Hq + 2 * Hkv) * D] with contiguous rows");
  TORCH_CHECK(k_cache.size(2) == hkv, "the cache holds ", k_cache.size(2), " KV heads, qkv ", hkv);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == B * half && sin.numel() == B * half,
              "cos/sin must be contiguous float32 [B, D/2]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == B,
              "slots must be a contiguous int64 [B]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(sp[b] >= 0 && sp[b] < NB * BS, "cache slot out of range");
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  const int64_t ld = qkv.stride(0), row = hkv * D;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == B * hq * D,
              "out must be a contiguous float32 [B, Hq * D] tensor");
  q.resize(static_cast<size_t>(B * hq * D));
  std::vector<float> kr(row);
  for (int64_t b = 0; b < B; ++b) {
    const float* x = xp + b * ld;
    for (int64_t h = 0; h < hq + hkv; ++h)
      rotate_head(x + h * D, cp + b * half, snp + b * half,
                  h < hq ? q.data() + (b * hq + h) * D : kr.data() + (h - hq) * D, half);
    store_slot(k_cache, v_cache, bf16, sp[b], row, kr.data(), x + (hq + hkv) * D);
  }
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
