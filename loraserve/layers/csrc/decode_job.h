// One layer's decode attention as independent work items, so that whoever runs it can split
// them over its threads: paged_decode_attention and rope_decode_attention with at::parallel_for,
// the decode stack's one parallel region (decode_stack_cpu.cpp) by its own split. An item
// computes the same bits whichever thread takes it, so the split cannot change the result.
#pragma once

#include <cstdint>
#include <vector>

struct DecodeJob {
  const float* q = nullptr;  // [B] rows q_row floats apart, each [Hq, D]
  int64_t q_row = 0;
  const void* k = nullptr;  // the layer's cache [NB, BS, Hkv, D], float or bf16
  const void* v = nullptr;
  bool bf16 = false;
  float* out = nullptr;  // [B, Hq, D]: the unsplit items write here
  const int64_t* tables = nullptr;
  const int64_t* lens = nullptr;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0, G = 0, BS = 0, nblk = 0, max_ctx = 0;
  float sc = 1.f;
  // decode_job_plan: S > 1 splits each sequence's positions in S parts (items B * S, merged by
  // decode_job_finish from `part` and `ml`); else items of `per` KV heads
  int64_t S = 1, per = 1, items = 0;
  float* part = nullptr;
  float* ml = nullptr;
  std::vector<float> scratch;
};

void decode_job_plan(DecodeJob& j, int64_t threads);
void decode_job_items(const DecodeJob& j, int64_t begin, int64_t end);
void decode_job_finish(const DecodeJob& j, float* op);
void decode_job_prefetch(const DecodeJob& j, const void* k, const void* v, int64_t begin, int64_t end);
