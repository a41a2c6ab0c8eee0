// Row-wise elementwise kernels: run on the calling thread when the work is small, else split
// the rows over torch's intra-op threads; and the GEMMs' split of a work item's rows into
// register blocks. Shared by the native CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

// Rows in parallel once there are at least `serial_max` elements: a parallel region costs
// more than a few rows of cheap work (rotary), but SiLU's exp pays for it much sooner.
template <typename F>
void over_rows(int64_t rows, int64_t work_per_row, int64_t serial_max, const F& body) {
  if (rows < 2 || rows * work_per_row < serial_max) {
    body(0, rows);
  } else {
    at::parallel_for(0, rows, 1, body);
  }
}

// `rows` evenly over blocks of at most `most` rows, f(first row, block rows): 16 rows at 6 are
// 6 + 5 + 5, not 6 + 6 + 4, so no register block runs nearly empty
template <typename F>
__attribute__((always_inline)) inline void over_blocks(int64_t rows, int64_t most, const F& f) {
  const int64_t nb = (rows + most - 1) / most;
  for (int64_t b = 0, r = 0; b < nb; ++b) {
    const int mr = static_cast<int>((rows * (b + 1)) / nb - (rows * b) / nb);
    f(r, mr);
    r += mr;
  }
}

// A GEMM's work items are (row chunk, panel group) pairs, split in contiguous ranges over the
// threads. Weights up to kL3Weights bytes are walked chunk-major: a thread keeps one chunk of
// rows in L2 while every panel passes by (re-read from L3); bigger ones (an lm_head) panel-major,
// each panel read once from DRAM for all chunks. Panel-major with weights that fit L3 streams
// all M rows from L3 once per panel: fp32 chunk-major measured 15-25% faster at 4,096 rows (an
// extra pass that interleaves each block's rows for sequential broadcasts measured slower); the
// low-precision panels, panel-major until they took this order too, ran 4,096 x 576 x 576 and
// 1536 x 576 int8 at ~180 GFLOP/s against ~204 chunk-major (AVX2 build, 2 Zen 5 cores).
constexpr int64_t kL3Weights = 8 << 20;

struct GridItem {
  int64_t group, chunk;
};

// fp32 panels (gemm_cpu.cpp) whose rows fit L2 whole (M x K fp32 up to kL2Rows bytes) in no
// more chunks than there are threads walk panel-major too: chunk-major would hand each thread one
// chunk and every panel, so each thread streams all the weights (T times the weight traffic),
// where panel-major splits the panels, reads each once and re-reads the few rows from L2 (a
// 128-token prompt of the 135M model, 2-core Xeon, alternated: AVX2 build 551 -> 599 tok/s,
// AVX-512 858 -> 985). The low-precision panels, 2-4x fewer bytes, keep chunk-major there: the
// same change measured 1-2 % slower for them (AVX2 bf16 683 -> 673, int8 731 -> 719). Decode
// sizes (one chunk) map the same either way.
constexpr int64_t kL2Rows = 1 << 20;

// the walk of a GEMM's work items, decided once per call (outside its parallel region)
inline bool grid_chunk_major(int64_t weight_bytes) { return weight_bytes <= kL3Weights; }
inline bool grid_chunk_major_fp32(int64_t M, int64_t K, int64_t chunks, int64_t weight_bytes) {
  return grid_chunk_major(weight_bytes) && (chunks > at::get_num_threads() || M * K * 4 > kL2Rows);
}

// work item `it` of `groups` panel groups x `chunks` row chunks
inline GridItem grid_item(int64_t it, int64_t groups, int64_t chunks, bool chunk_major) {
  if (chunk_major) return GridItem{it % groups, it / groups};
  return GridItem{it / chunks, it % chunks};
}
