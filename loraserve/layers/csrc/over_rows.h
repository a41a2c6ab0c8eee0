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
