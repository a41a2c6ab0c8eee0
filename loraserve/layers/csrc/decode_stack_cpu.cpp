// A decode step's whole stack of Llama-family decoder layers in one call from Python.
//
// Why: at batch 1 on a small model a layer is eight short native calls (q|k|v, attention, o,
// residual + norm, gate|up, SwiGLU, down, residual + norm) of 3-40 us each, and every call from
// Python pays its own toll: the interpreter between calls, pybind11's argument conversion, the
// `Ops` method's checks, an output tensor: 240 calls a token on SmolLM2-135M (30 layers; figures in
// layers/decode_stack.py). Here the same kernels run in the same order with the same
// arguments, so the result is bitwise what the Python loop computes (tests/layers/
// test_decode_stack.py); only the trips through Python are gone. The stack is built once per
// model from the layers' packed weights and KV caches, which never move after start-up.
//
// Scope (the Python side checks it, layers/decode_stack.py): single-token decode rows only, and
// layers without per-head q/k norms, sliding windows or soft-capping. Rows with adapters take each
// projection's LoRA as `LoraLinear` does (the fused base + LoRA pass where it applies, else the
// base and then the row kernel into the members' column slices), from per-layer views of the slot
// table that the Python side hands over again whenever the table is re-allocated.
#include <torch/csrc/utils/pybind.h>

#include "aten_min.h"
#include <ATen/Parallel.h>

#include "decode_job.h"
#include "decode_steps.h"
#include "native_linear.h"
#include "region_lora.h"
#include "region_sync.h"

#include <omp.h>

#include <atomic>
#include <exception>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

at::Tensor rope_decode_attention(const at::Tensor& qkv, int64_t hq, int64_t hkv, const at::Tensor& cos,
                                 const at::Tensor& sin, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& slots,
                                 const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale);
at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gu);
int64_t lowp_range_rows();
void rope_rows_check(int64_t B, int64_t D, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     int64_t cache_slots);
void rope_store_heads(const float* qkv, int64_t ld, int64_t B, int64_t hq, int64_t hkv, int64_t D, int64_t h0,
                      int64_t h1, const float* cos, const float* sin, const int64_t* slots, void* k_cache,
                      void* v_cache, bool bf16, float* q, float* kr);
void decode_job_make(const float* qp, int64_t q_row, int64_t B, int64_t Hq, int64_t D, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                     double scale, float* op, DecodeJob& j);
void norm_row(float* xr, const float* dr, const float* wp, int64_t H, float e, float* yr);
void silu_mul_cols(const float* g, const float* u, float* o, int64_t n);

struct DecodeLayer {
  NativeLinear qkv, o, gate_up, down;
  at::Tensor post_norm, next_norm;  // next_norm: the next layer's input norm, or the final one
  at::Tensor k_cache, v_cache;
  int64_t hq, hkv;
  double scale;
  // the norms' weights and the caches as raw pointers, taken once (NativeLinear's raw fields: why)
  const float* post_norm_p;
  const float* next_norm_p;
  void* kc;
  void* vc;

  DecodeLayer(NativeLinear qkv_, NativeLinear o_, NativeLinear gate_up_, NativeLinear down_, at::Tensor post_norm_,
              at::Tensor next_norm_, at::Tensor k_cache_, at::Tensor v_cache_, int64_t hq_, int64_t hkv_,
              double scale_)
      : qkv(std::move(qkv_)),
        o(std::move(o_)),
        gate_up(std::move(gate_up_)),
        down(std::move(down_)),
        post_norm(std::move(post_norm_)),
        next_norm(std::move(next_norm_)),
        k_cache(std::move(k_cache_)),
        v_cache(std::move(v_cache_)),
        hq(hq_),
        hkv(hkv_),
        scale(scale_),
        post_norm_p(post_norm.data_ptr<float>()),
        next_norm_p(next_norm.data_ptr<float>()),
        kc(k_cache.data_ptr()),
        vc(v_cache.data_ptr()) {}
};

// the most of its next projection's weights a waiting thread prefetches into L2
constexpr int64_t kSlicePrefetch = 256 << 10;

class DecodeStack {
 public:
  DecodeStack(double eps, bool bf16_activations, int64_t fused_lora_rows, int64_t fused_lora_members)
      : eps_(eps), bf16_act_(bf16_activations), fused_rows_(fused_lora_rows), fused_members_(fused_lora_members) {}

  void add_layer(const at::Tensor& qkv_w, int64_t qkv_n, const std::optional<at::Tensor>& qkv_scale,
                 const std::optional<at::Tensor>& qkv_bias, const at::Tensor& o_w, int64_t o_n,
                 const std::optional<at::Tensor>& o_scale, const std::optional<at::Tensor>& o_bias,
                 const at::Tensor& gu_w, int64_t gu_n, const std::optional<at::Tensor>& gu_scale,
                 const std::optional<at::Tensor>& gu_bias, const at::Tensor& down_w, int64_t down_n,
                 const std::optional<at::Tensor>& down_scale, const std::optional<at::Tensor>& down_bias,
                 const at::Tensor& post_norm, const at::Tensor& next_norm, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, int64_t hq, int64_t hkv, double scale) {
    // the region splits gate|up at a panel boundary and keeps the residual stream [M, o's width];
    // it checks the first layer's attention once a step and runs every layer's with those checks
    const DecodeLayer* first = layers_.empty() ? nullptr : &layers_[0];
    const bool same_attention =
        qkv_n == (hq + 2 * hkv) * k_cache.size(3) &&
        (!first || (hq == first->hq && hkv == first->hkv && k_cache.sizes() == first->k_cache.sizes() &&
                    v_cache.sizes() == first->v_cache.sizes() && k_cache.dtype() == first->k_cache.dtype() &&
                    v_cache.dtype() == first->v_cache.dtype() && k_cache.is_contiguous() && v_cache.is_contiguous()));
    region_ok_ = region_ok_ && gu_n % 64 == 0 && o_n == down_n && same_attention;
    layers_.emplace_back(NativeLinear(qkv_w, qkv_n, qkv_scale, qkv_bias), NativeLinear(o_w, o_n, o_scale, o_bias),
                         NativeLinear(gu_w, gu_n, gu_scale, gu_bias),
                         NativeLinear(down_w, down_n, down_scale, down_bias), post_norm, next_norm, k_cache, v_cache,
                         hq, hkv, scale);
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // projection group g (0 q|k|v, 1 o, 2 gate|up, 3 down) of `layer`: its members' output widths
  // (once) and its slot-table views (again after every re-allocation of the table)
  void set_lora(int64_t layer, int64_t group, const at::Tensor& a, const std::vector<at::Tensor>& bs,
                const std::vector<int64_t>& widths) {
    TORCH_CHECK(layer >= 0 && layer < size() && group >= 0 && group < 4, "no projection group ", group,
                " in layer ", layer);
    TORCH_CHECK(bs.size() == widths.size(), "one B per member");
    DecodeLayer& l = layers_[layer];
    NativeLinear* g[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
    g[group]->lora_a = a;
    g[group]->lora_bs = bs;
    g[group]->bounds.clear();
    int64_t start = 0;
    for (int64_t w : widths) {
      g[group]->bounds.emplace_back(start, start + w);
      start += w;
    }
    TORCH_CHECK(start == g[group]->n, "members cover ", start, " of ", g[group]->n, " output columns");
  }

  // x: the residual stream [B, hidden] (updated in place); h: the first layer's normed input.
  // Returns the final norm of the residual stream, as the model's forward does.
  // lora_rows / lora_slots: this step's adapter rows and their slots (none: no row has an adapter)
  at::Tensor run(const at::Tensor& x, at::Tensor h, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                 const std::optional<at::Tensor>& lora_rows, const std::optional<at::Tensor>& lora_slots,
                 const std::optional<at::Tensor>& slot_rank) const {
    TORCH_CHECK(lora_rows.has_value() == lora_slots.has_value(), "adapter rows need their slots");
    std::optional<LoraRows> lr;
    if (lora_rows) {
      for (const DecodeLayer& l : layers_)
        for (const NativeLinear* g : {&l.qkv, &l.o, &l.gate_up, &l.down})
          TORCH_CHECK(g->lora_a.defined(), "adapter rows but no slot table (set_lora)");
      lr = LoraRows{*lora_rows, *lora_slots, slot_rank};
    }
    const LoraRows* lp = lr ? &*lr : nullptr;
    if (x.size(0) <= lowp_range_rows() && at::get_num_threads() > 1 && region_ && region_ok_ &&
        x.size(1) == layers_[0].o.n)
      return run_region(x, h, cos, sin, slots, block_tables, ctx_lens, lp);
    for (const DecodeLayer& l : layers_) {
      const at::Tensor qkv = l.qkv(h, bf16_act_, lp, fused_rows_, fused_members_);
      const at::Tensor attn = rope_decode_attention(qkv, l.hq, l.hkv, cos, sin, l.k_cache, l.v_cache, slots,
                                                    block_tables, ctx_lens, l.scale);
      h = add_rms_norm_(x, l.o(attn, bf16_act_, lp, fused_rows_, fused_members_), l.post_norm, eps_);
      const at::Tensor act = silu_mul(l.gate_up(h, bf16_act_, lp, fused_rows_, fused_members_));
      h = add_rms_norm_(x, l.down(act, bf16_act_, lp, fused_rows_, fused_members_), l.next_norm, eps_);
    }
    return h;
  }

  // `steps` steps, each fed the token the one before picked (decode_steps_cpu.cpp: greedy, or
  // sampled at `temperature` with `uniforms`), the layers of each as `run` computes them
  std::vector<at::Tensor> run_burst(const DecodeHead& head, const at::Tensor& ids, const at::Tensor& positions,
                                    int64_t steps, const at::Tensor& block_tables, int64_t block_size,
                                    const std::optional<at::Tensor>& lora_rows,
                                    const std::optional<at::Tensor>& lora_slots,
                                    const std::optional<at::Tensor>& slot_rank,
                                    const std::optional<at::Tensor>& temperature,
                                    const std::optional<at::Tensor>& uniforms) const {
    return burst_steps(
        head, ids, positions, steps, block_tables, block_size,
        [&](const at::Tensor& x, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& slots, const at::Tensor& ctx) {
          return run(x, h, cos, sin, slots, block_tables, ctx, lora_rows, lora_slots, slot_rank);
        },
        temperature, uniforms);
  }

  // LORASERVE_DECODE_REGION=0 (read by the Python side): every step takes the per-kernel path
  void set_region(bool on) { region_ = on; }
  // LORASERVE_REGION_LORA_SPLIT=0: the region adds each projection's deltas on one thread
  void set_lora_split(bool on) { split_ = on; }
  // steps run in one parallel region so far (the tests check which path a step took)
  int64_t region_runs() const { return region_runs_.load(); }
  // projections whose adapter rows the region's threads split so far (region_lora.h), for the tests
  int64_t split_runs() const { return split_runs_.load(); }

 private:
  // The same step in one parallel region. Each projection's panels split over the threads as the
  // kernels split them (q|k|v's at head boundaries, where a head is whole panels); SwiGLU runs on
  // the columns a thread computed (its gate panels and the matching up panels); every thread keeps
  // its own copy of the residual stream and its norms (the same arithmetic on the same inputs, so
  // the copies agree bit for bit); each rotates the q/k heads it computed and stores their new
  // K/V, then attention's items (decode_job.h) split over the threads. A barrier wherever a thread
  // reads what others wrote: five a layer, and with adapter rows up to four more, after each
  // projection's deltas: the threads split them (region_lora.h: each runs one
  // chain of the rows' shrink before its base panels, then adds the deltas of the columns those
  // panels computed, with the per-kernel path's arithmetic), or, where that path would sum them
  // otherwise, one thread adds them as it does. Waiting threads prefetch their share of the next
  // projection's weights, and each thread the KV-cache lines of its attention items while its
  // q|k|v share computes. Why: the per-kernel path runs four
  // parallel regions a layer (120 a token on SmolLM2-135M), each with a start, an end barrier and
  // a cold start of the weight stream, and its serial norm and SwiGLU read their inputs from the
  // other core's cache with the memory bus idle.
  at::Tensor run_region(const at::Tensor& x, const at::Tensor& h, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& slots, const at::Tensor& block_tables,
                        const at::Tensor& ctx_lens, const LoraRows* lp) const {
    const int64_t M = x.size(0), H = x.size(1);
    ++region_runs_;
    int64_t most = 0;
    for (const DecodeLayer& l : layers_)
      for (const NativeLinear* g : {&l.qkv, &l.o, &l.gate_up, &l.down}) most = std::max(most, g->n);
    // one output buffer per projection kind, reused layer after layer: [M, n] at the front of it
    const at::Tensor bufs = at::empty({4, M * most}, x.options());
    auto out = [&](int64_t i, const NativeLinear& g) { return bufs[i].narrow(0, 0, M * g.n).view({M, g.n}); };
    float* buf[4];
    for (int64_t i = 0; i < 4; ++i) buf[i] = bufs.data_ptr<float>() + i * M * most;
    const at::Tensor hx = x.contiguous(), hh = h.contiguous();
    at::Tensor y = at::empty_like(hh);
    // attention's checks and its job, once for the step (every layer's attention has the first
    // one's shapes: add_layer); a layer then only rotates, stores its new keys and values, and
    // points a thread's copy of the job at its cache
    const DecodeLayer& l0 = layers_[0];
    const int64_t hq = l0.hq, hkv = l0.hkv, D = l0.k_cache.size(3), width = hq * D, heads = hq + 2 * hkv;
    const at::Tensor attn_buf = at::empty({M * width}, x.options());  // the unsplit items write it
    rope_rows_check(M, D, cos, sin, slots, l0.k_cache.size(0) * l0.k_cache.size(1));
    std::vector<float> q(static_cast<size_t>(M * width));  // the rotated queries
    DecodeJob job;
    decode_job_make(q.data(), width, M, hq, D, l0.k_cache, l0.v_cache, block_tables, ctx_lens, l0.scale,
                    attn_buf.data_ptr<float>(), job);
    const float* cos_p = cos.data_ptr<float>();
    const float* sin_p = sin.data_ptr<float>();
    const int64_t* slot_p = slots.data_ptr<int64_t>();
    // where a head is whole panels, q|k|v's panels split at head boundaries and each thread rotates
    // and stores the heads it computed: no serial step, no barrier of their own. From the end of a
    // thread's q|k|v panels to the start of attention, per batch-1 step of the 135M model (AVX2
    // int8, 2-core Zen 4, rdtsc, three runs each): 194-242 / 149-370 us (thread 0 / 1) when one
    // thread rotated every head between two barriers, with each layer's checks and views; 37-142
    // / 30-51 us now (thread 0 has the extra head: 8 of 15)
    const int64_t head_panels = D % 32 == 0 ? D / 32 : 0;
    std::exception_ptr err;
    bool failed = false;
    const int threads = static_cast<int>(at::get_num_threads());
    // each projection's adapter rows split over the threads where that keeps the per-kernel path's
    // arithmetic (region_lora.h; else one thread adds them), and the shrink's two chains of sums
    std::vector<region_lora::Split> splits;
    int64_t gr_most = 0;
    for (const DecodeLayer& l : layers_) {
      const int64_t ins[4] = {H, l.hq * D, H, l.gate_up.n / 2};  // each projection's inputs
      const NativeLinear* gs[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
      for (int k = 0; k < 4 && lp != nullptr; ++k) {
        const NativeLinear* g = gs[k];
        const bool deltas = g->fused(M, ins[k], bf16_act_, fused_rows_, fused_members_);
        splits.push_back(split_ ? region_lora::make_split(lp->rows, lp->slots, lp->slot_rank, g->lora_a, g->lora_bs,
                                                          g->bounds, M, ins[k], deltas)
                                : region_lora::Split{});
        gr_most = std::max(gr_most, g->lora_a.size(2));
      }
    }
    split_runs_ += std::count_if(splits.begin(), splits.end(), [](const region_lora::Split& sp) { return sp.on; });
    const int64_t chain_floats = lp ? lp->rows.numel() * gr_most : 0;
    std::vector<float> chains(2 * chain_floats);
    // how attention's items split, as the per-kernel path splits them: the same plan for every
    // layer (one shape, one context), known before the region so each thread can prefetch the
    // cache lines of its own items
    decode_job_plan(job, threads);
    SpinBarrier bar;
    const float e = static_cast<float>(eps_);
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      RangeScratch s;
      region_lora::Scratch ls;
      SlicePrefetch pf;
      std::vector<float> mine;  // this thread's merge of a split attention
      DecodeJob my = job;       // pointed at each layer's cache; its parts stay in the step job's scratch
      my.scratch = {};
      std::vector<float> kr(static_cast<size_t>(D));  // a rotated key head
      // this thread's residual stream and normed input, at the same offsets from a 64-byte line as
      // x's and h's (norm_row's vector loop is the loop path's only where the alignment is too)
      std::vector<float> mem(2 * (M * H + 16));
      auto aligned_like = [&](float* base, const float* like) {
        const int64_t lag = (reinterpret_cast<uintptr_t>(like) % 64) / 4;
        return base + ((16 - (reinterpret_cast<uintptr_t>(base) % 64) / 4) % 16) + lag;
      };
      float* res = aligned_like(mem.data(), hx.data_ptr<float>());
      float* hn = aligned_like(mem.data() + M * H + 16, hh.data_ptr<float>());
      std::copy_n(hx.data_ptr<float>(), M * H, res);
      std::copy_n(hh.data_ptr<float>(), M * H, hn);
      // the panels [p0, p1) this thread computes next: what it prefetches while it waits
      auto next = [&](const NativeLinear& g, std::pair<int64_t, int64_t> range) {
        const auto [b, n] = g.panel_bytes(range.first, range.second);
        pf.start(b, n, kSlicePrefetch);
      };
      auto next_share = [&](const NativeLinear& g) { next(g, share(g.P, t, T)); };
      // thread 0's piece of serial work, then a barrier; an exception stops every thread there
      auto serial = [&](const auto& f) {
        if (t == 0 && !failed) {
          try {
            f();
          } catch (...) {
            err = std::current_exception();
            failed = true;
          }
        }
        bar.wait(pf, T);
      };
      // layer i's projection k's split, or null: one thread adds its deltas (serial)
      auto split_of = [&](size_t i, int k) -> const region_lora::Split* {
        return lp && splits[4 * i + k].on ? &splits[4 * i + k] : nullptr;
      };
      // chain c of every adapter row's shrink of x, by thread c % T, before the base panels
      auto shrink = [&](const region_lora::Split* sp, const float* xin, int64_t ldx) {
        for (int c = 0; c < 2 && sp; ++c)
          if (c % T == t) region_lora::shrink_part(*sp, xin, ldx, c, chains.data() + c * chain_floats);
      };
      // the deltas onto output columns `r` of y (the ones this thread's panels computed)
      auto add_cols = [&](const region_lora::Split& sp, const NativeLinear& g, float* yb,
                          std::initializer_list<std::pair<int64_t, int64_t>> r) {
        region_lora::add_cols(sp, chains.data(), chains.data() + chain_floats, yb, g.n, r.begin(),
                              static_cast<int>(r.size()), ls);
      };
      // the output columns of g's panels [p0, p1), and of this thread's share of them
      auto cols = [&](const NativeLinear& g, std::pair<int64_t, int64_t> panels) {
        return std::pair<int64_t, int64_t>{32 * panels.first, std::min(g.n, 32 * panels.second)};
      };
      auto own = [&](const NativeLinear& g) { return cols(g, share(g.P, t, T)); };
      // M rows of `cols` floats at p as a tensor (the adapter kernels take tensors)
      auto rows_of = [&](const float* p, int64_t cols) {
        return at::from_blob(const_cast<float*>(p), {M, cols}, x.options());
      };
      const auto [i0, i1] = share(job.items, t, T);  // this thread's attention items, every layer
      const auto [h0, h1] = share(heads, t, T);        // its heads, where q|k|v splits by heads
      for (size_t i = 0; i < layers_.size(); ++i) {
        const DecodeLayer& l = layers_[i];
        void* const kc = l.kc;
        void* const vc = l.vc;
        decode_job_prefetch(job, kc, vc, i0, i1);
        my.k = kc, my.v = vc, my.sc = static_cast<float>(l.scale);
        const region_lora::Split* sq = split_of(i, 0);
        shrink(sq, hn, H);
        // q|k|v splits by heads (adapter rows: when the threads split their deltas too; else one
        // thread adds them, and then rotates every head)
        const bool by_heads = head_panels > 0 && (lp == nullptr || sq != nullptr);
        const auto qkv_panels = by_heads ? std::pair{h0 * head_panels, h1 * head_panels} : share(l.qkv.P, t, T);
        l.qkv.panels(hn, H, M, H, buf[0], qkv_panels.first, qkv_panels.second, s);
        next_share(l.o);
        if (by_heads) {
          if (sq) {
            bar.wait(pf, T);  // the deltas read both threads' chains of the shrink
            add_cols(*sq, l.qkv, buf[0], {cols(l.qkv, qkv_panels)});
          }
          rope_store_heads(buf[0], l.qkv.n, M, hq, hkv, D, h0, h1, cos_p, sin_p, slot_p, kc, vc, my.bf16, q.data(),
                           kr.data());
        } else {
          bar.wait(pf, T);
          if (sq) {
            add_cols(*sq, l.qkv, buf[0], {own(l.qkv)});
            bar.wait(pf, T);  // rotary reads every column
          }
          if (t == 0 && !failed) {  // adapter rows, rotary, the new keys and values into the cache: one thread
            try {
              if (lp && !sq) l.qkv.add_lora(rows_of(hn, H), out(0, l.qkv), *lp, bf16_act_, fused_rows_, fused_members_);
              rope_store_heads(buf[0], l.qkv.n, M, hq, hkv, D, 0, heads, cos_p, sin_p, slot_p, kc, vc, my.bf16,
                               q.data(), kr.data());
            } catch (...) {
              err = std::current_exception();
              failed = true;
            }
          }
        }
        bar.wait(pf, T);
        if (failed) break;
        const auto [j0, j1] = share(my.items, t, T);
        decode_job_items(my, j0, j1);
        bar.wait(pf, T);
        // a split context: every thread merges the parts into its own copy (no barrier, no
        // reads from the other core's cache); else the items wrote the shared buffer
        const float* attn = my.out;
        if (my.S > 1) {
          mine.resize(static_cast<size_t>(M * width));
          decode_job_finish(my, mine.data());
          attn = mine.data();
        }
        const region_lora::Split* so = split_of(i, 1);
        shrink(so, attn, width);
        l.o.range(attn, width, M, width, buf[1], t, T, s);
        // gate panels [g0, g1) and the up panels of the same columns (SwiGLU on them, below)
        const int64_t I = l.gate_up.n / 2, G = I / 32;
        const auto [g0, g1] = share(G, t, T);
        next(l.gate_up, {g0, g1});
        bar.wait(pf, T);
        if (so) {
          add_cols(*so, l.o, buf[1], {own(l.o)});
          bar.wait(pf, T);
        } else if (lp) {
          serial([&] { l.o.add_lora(rows_of(attn, width), out(1, l.o), *lp, bf16_act_, fused_rows_, fused_members_); });
        }
        if (failed) break;
        for (int64_t m = 0; m < M; ++m) norm_row(res + m * H, buf[1] + m * H, l.post_norm_p, H, e, hn + m * H);
        const region_lora::Split* sg = split_of(i, 2);
        shrink(sg, hn, H);
        l.gate_up.panels(hn, H, M, H, buf[2], g0, g1, s);
        l.gate_up.panels(hn, H, M, H, buf[2], G + g0, G + g1, s);
        if (lp) {  // SwiGLU waits for its columns' adapter deltas (split: this thread's own)
          bar.wait(pf, T);
          if (sg) {
            add_cols(*sg, l.gate_up, buf[2], {{32 * g0, 32 * g1}, {I + 32 * g0, I + 32 * g1}});
          } else {
            serial([&] { l.gate_up.add_lora(rows_of(hn, H), out(2, l.gate_up), *lp, bf16_act_, fused_rows_, fused_members_); });
          }
          if (failed) break;
        }
        for (int64_t m = 0; m < M; ++m)
          silu_mul_cols(buf[2] + m * 2 * I + 32 * g0, buf[2] + m * 2 * I + I + 32 * g0, buf[0] + m * I + 32 * g0,
                        32 * (g1 - g0));
        next_share(l.down);
        bar.wait(pf, T);
        const region_lora::Split* sd = split_of(i, 3);
        shrink(sd, buf[0], I);
        l.down.range(buf[0], I, M, I, buf[3], t, T, s);
        if (i + 1 < layers_.size()) next_share(layers_[i + 1].qkv);
        bar.wait(pf, T);
        if (sd) {
          add_cols(*sd, l.down, buf[3], {own(l.down)});
          bar.wait(pf, T);
        } else if (lp) {
          serial([&] { l.down.add_lora(rows_of(buf[0], I), out(3, l.down), *lp, bf16_act_, fused_rows_, fused_members_); });
        }
        if (failed) break;
        for (int64_t m = 0; m < M; ++m) norm_row(res + m * H, buf[3] + m * H, l.next_norm_p, H, e, hn + m * H);
      }
      if (t == 0 && !failed) {
        std::copy_n(res, M * H, hx.data_ptr<float>());
        std::copy_n(hn, M * H, y.data_ptr<float>());
      }
    }
    if (err) std::rethrow_exception(err);
    if (!x.is_contiguous()) x.copy_(hx);
    return y;
  }

  std::vector<DecodeLayer> layers_;
  double eps_;
  bool bf16_act_;
  int64_t fused_rows_, fused_members_;
  bool region_ = true, region_ok_ = true, split_ = true;
  mutable std::atomic<int64_t> region_runs_{0}, split_runs_{0};
};

// module_local: the AVX2 and the host's build load side by side in one process (the tests do), and
// pybind11 registers a class type once per process otherwise
void bind_decode_stack(pybind11::module_& m) {
  pybind11::class_<DecodeStack, std::shared_ptr<DecodeStack>>(
      m, "DecodeStack", "a model's decoder layers run by one native call per decode step", pybind11::module_local())
      .def(pybind11::init<double, bool, int64_t, int64_t>(), pybind11::arg("eps"),
           pybind11::arg("bf16_activations"), pybind11::arg("fused_lora_rows"), pybind11::arg("fused_lora_members"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_lora", &DecodeStack::set_lora)
      .def("set_region", &DecodeStack::set_region)
      .def("set_lora_split", &DecodeStack::set_lora_split)
      .def("region_runs", &DecodeStack::region_runs)
      .def("split_runs", &DecodeStack::split_runs)
      .def("__len__", &DecodeStack::size)
      .def("run", &DecodeStack::run, pybind11::arg("x"), pybind11::arg("h"), pybind11::arg("cos"),
           pybind11::arg("sin"), pybind11::arg("slots"), pybind11::arg("block_tables"), pybind11::arg("ctx_lens"),
           pybind11::arg("lora_rows") = pybind11::none(), pybind11::arg("lora_slots") = pybind11::none(),
           pybind11::arg("slot_rank") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("run_burst", &DecodeStack::run_burst, pybind11::arg("head"), pybind11::arg("ids"),
           pybind11::arg("positions"), pybind11::arg("steps"), pybind11::arg("block_tables"),
           pybind11::arg("block_size"), pybind11::arg("lora_rows") = pybind11::none(),
           pybind11::arg("lora_slots") = pybind11::none(), pybind11::arg("slot_rank") = pybind11::none(),
           pybind11::arg("temperature") = pybind11::none(), pybind11::arg("uniforms") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
