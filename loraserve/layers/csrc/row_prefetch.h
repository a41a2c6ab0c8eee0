// The software prefetch of a one-row weight stream (batch-1 decode: lowp_kernels.h's bf16 and
// int8 rows, gemm_int8dp_cpu.cpp's one-row block), a fixed distance ahead of the loads, with the
// hint the CPU wants, or none.
//
// Why a choice per CPU, made when the library loads: on Intel a prefetch into L1 (T0) holds one
// of the core's ~16 L1 fill buffers until its line arrives, which capped a streaming row at ~7
// GB/s a core, so Intel gets L2 prefetches (T1): 30 layers of the SmolLM projections from DRAM,
// one row, 2-core Xeon with AMX, AVX2 build int8 8.0 -> 5.4 ms, bf16 9.6 -> 9.1 ms; AVX-512 (int8
// dot products) 6.4 -> 4.8-5.1 ms. On AMD Zen 5 T0 beat no prefetch (int8 14.2 -> 9.3-10.4 ms,
// bf16 23.7 -> 21.1). On AMD Zen 4 (family 19h with AVX-512) any prefetch slowed the stream: 269
// MB of bf16 panels, one row, 1 thread, best of 15, two runs: no prefetch 8.4 / 9.1 ms, T0 8.9 /
// 9.6, NTA 8.9 / 9.5, T1 12.2 / 13.1; and in session 40 (2-core Zen 4): 142 MB of int8 panels,
// one row (the int8 dot-product block), 2 threads, alternated, read 57-61 GB/s with no prefetch
// against 50-52 with T0 4 KB ahead when the memory read ~60 GB/s (0.95-0.99 of a plain sum
// against 0.83-0.86), 36-41 against 31-39 at ~35 GB/s; SmolLM2-135M batch-1 decode in-process
// (`python -m bench.row_prefetch`), off / T0: int8 222 / 216 tok/s (2 threads), 164 / 146 (1),
// int8-bf16 211 / 210, 162 / 144, bf16 107 / 106, 89 / 83. So Zen 4's AVX-512 build streams with
// the hardware prefetcher alone. Its AVX2 build keeps T0: level there (int8 227 / 233 tok/s, bf16
// 1 thread 93 / 86), and T0 ahead on the ~1B shape (bf16, 2 threads: 24.6 against 22.8 tok/s,
// session 34). Zen 3 (family 19h, no AVX-512) keeps T0 too: level with no prefetch (session 39:
// 106-118 tok/s by mode).
// `LORASERVE_ROW_PREFETCH=t0|t1|off` overrides the choice, and `set_row_prefetch` switches it in a
// running process (bench/row_prefetch.py alternates them), to compare them on a new host.
#pragma once

#include <cstdlib>
#include <cstring>

#include "simd.h"

namespace row_prefetch {

enum Mode : int { kOff = 0, kT0 = 1, kT1 = 2 };

// `LORASERVE_ROW_PREFETCH`, else this CPU's choice (above)
inline int choose() {
  if (const char* e = std::getenv("LORASERVE_ROW_PREFETCH")) {
    if (!std::strcmp(e, "off")) return kOff;
    if (!std::strcmp(e, "t0")) return kT0;
    if (!std::strcmp(e, "t1")) return kT1;
  }
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (!__builtin_cpu_is("amd")) return kT1;
#if defined(__AVX512F__)
  // an AVX-512 build on family 19h: Zen 4 (Zen 3 has no AVX-512)
  if (__builtin_cpu_is("amdfam19h")) return kOff;
#endif
  return kT0;
#else
  return kT1;
#endif
}

// chosen when the library loads; `set_row_prefetch` (bindings.cpp) changes it between steps, so a
// benchmark can alternate the modes in one process
inline int g_mode = choose();

#if LORASERVE_SIMD
// the mode as a kernel call reads it once, before its loop
struct Hint {
  int mode;
  // one 64-byte line at p
  LS_INLINE void line(const void* p) const {
    if (mode == kT1) {
      _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
    } else if (mode == kT0) {
      _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
    }
  }
};
inline Hint hint() { return Hint{g_mode}; }
#endif

}  // namespace row_prefetch
