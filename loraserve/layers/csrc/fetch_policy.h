// What a register kernel prefetches alongside its k-steps (its PF template argument): nothing
// (NoPf), or spans of memory a caller names, at a rate spread over the kernel's k-steps (Spans).
// The fp32 panels (panel_kernels.h) and the low-precision ones (lowp_kernels.h) take the same
// policies, so the fused decode passes (fused_lora.h) fetch their adapter rows the same way
// whichever weights the base product reads.
//
// A kernel copies its PF into a local and steps that, so the cursors live in registers: read
// through the PF reference, GCC 12 at -march=native on a Zen 5 EPYC (znver3 plus AVX-512 to GCC
// 12) kept them in memory and spilled the accumulators of the blocks inlined around them (the
// fused pass's panels ran 2.3x slower than panel_linear's).
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace fetch_policy {

struct NoPf {
  static constexpr bool kOn = false;
  void step() {}
};
inline NoPf no_pf;

#if LORASERVE_SIMD
// A span of memory to fetch: n 64-byte lines from base, or `rows` such runs `stride` bytes apart
// (a range of columns of a row-major matrix)
struct Lines {
  const char* base;
  int64_t n;
  int64_t rows = 1, stride = 0;
  int64_t lines() const { return n * rows; }
};

// Walks a list of spans in order, at `rate` / 256 lines per k-step (at most two), into L2 (T1:
// on the 2-core Zen 4 the fused low-precision pass measured T0 slower, 32 rows on 32 distinct
// adapters, AVX2 int8, a decode step 77.8 ms with T1, 84.1 with T0, 80.6 with the two passes,
// although T0 suits its one-row weight streams, row_prefetch.h)
struct Spans {
  static constexpr bool kOn = true;
  const char* base = nullptr;  // the run being fetched
  int64_t pos = 0, end = 0;
  int64_t rows = 0, stride = 0;  // runs of the span left after this one, and their distance
  const Lines* next = nullptr;  // the spans after it
  const Lines* last = nullptr;
  int64_t rate = 0, credit = 0;

  // spans[0, n) (`lines` lines in all) spread evenly over `steps` k-steps
  static Spans over(const Lines* spans, int n, int64_t lines, int64_t steps) {
    Spans s;
    s.next = spans;
    s.last = spans + n;
    s.rate = std::min<int64_t>(512, (lines * 256 + steps - 1) / std::max<int64_t>(steps, 1));
    return s;
  }
  __attribute__((always_inline)) static void fetch(const char* p) { _mm_prefetch(p, _MM_HINT_T1); }
  __attribute__((always_inline)) void one() {
    if (pos < end) {
      fetch(base + 64 * pos++);
    } else if (rows > 0) {
      base += stride, pos = 0, --rows;
      fetch(base + 64 * pos++);
    } else if (next < last) {
      base = next->base, end = next->n, pos = 0, rows = next->rows - 1, stride = next->stride;
      ++next;
      fetch(base + 64 * pos++);
    }
  }
  __attribute__((always_inline)) void step() {
    credit += rate;
    if (credit >= 256) {
      credit -= 256;
      one();
      if (credit >= 256) {
        credit -= 256;
        one();
      }
    }
  }
};
#endif

}  // namespace fetch_policy
