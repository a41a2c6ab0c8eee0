// Row-wise elementwise kernels: run on the calling thread when the work is small, else split
// the rows over torch's intra-op threads. Shared by the native CPU kernels.
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
