// What the decode stack's one-region step (decode_stack_cpu.cpp `run_region`) synchronises and
// splits its threads with: a spin barrier whose waiters fetch their next weight slice, and each
// thread's share of a piece of work.
//
// Why not OpenMP's barrier: the step passes six a layer (ten with adapter rows), microseconds
// apart, and OpenMP's waiters only spin or sleep, where these fetch the weights their thread
// reads next.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <utility>

// Lines of a thread's next weight slice fetched into L2 while the thread has nothing else to do
struct SlicePrefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  void start(const char* b, int64_t bytes, int64_t budget) {
    p = b;
    end = b + std::min(bytes, budget);
  }
  void step(int lines) {
    for (int i = 0; i < lines && p < end; ++i, p += 64) __builtin_prefetch(p, 0, 2);
  }
};

// A sense-reversing spin barrier whose waiters prefetch their next slice instead of only spinning
struct SpinBarrier {
  std::atomic<int> count{0};
  std::atomic<int> gen{0};
  // threads: the team's size as the region got it (OpenMP may grant fewer than asked for)
  void wait(SlicePrefetch& pf, int threads) {
    const int g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      count.store(0, std::memory_order_relaxed);
      gen.store(g + 1, std::memory_order_release);
      return;
    }
    // after ~50 us of spinning, yield the core: with more threads than free cores (another
    // process, an oversubscribed box) a pure spin would hold the core the last thread needs
    for (int spins = 0; gen.load(std::memory_order_acquire) == g; ++spins) {
      pf.step(2);
      if (spins > 4096) {
        std::this_thread::yield();
      } else {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
    }
  }
};

// thread t of T's share [begin, end) of n items: how every piece of the region splits its work
inline std::pair<int64_t, int64_t> share(int64_t n, int t, int T) { return {n * t / T, n * (t + 1) / T}; }
