"""Keep CPU parallelism in one thread: the step loop's.

Why: OpenMP (which PyTorch, oneDNN and MKL use on CPU) gives every thread that
runs parallel work its own pool of worker threads, kept until that thread
exits. Once the pools outnumber the cores, libgomp stops spin-waiting between
parallel regions and parks its workers, so every one of a decode step's
hundreds of small kernels pays a wake-up. Measured on a 2-core box: loading the
engine on the main thread and stepping it on another made decode steps 10%
slower on the base model and 25% slower with LoRA (whose batched matmuls are
many and short).

So the engine is built on its step-loop thread (`AsyncEngine.build`), and every
other thread that may touch tensors — the main thread, adapter loaders, merge
workers — runs its OpenMP regions with one thread (`use_one_omp_thread`),
which creates no pool. The setting is per thread (OpenMP's nthreads ICV), so
the step loop keeps all cores. Where libgomp is not loaded (macOS, a build
with another OpenMP, CUDA-only work) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor


@functools.cache
def _omp_set_num_threads() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def use_one_omp_thread() -> bool:
    """Run this thread's OpenMP regions single-threaded (no worker pool). True if applied."""
    import torch

    fn = _omp_set_num_threads()
    if fn is None:
        return False
    # PyTorch sets each thread's OpenMP size lazily, on its first parallel op, from the global
    # torch.set_num_threads value: trigger that first, or it would undo ours later.
    torch.get_num_threads()
    fn(1)
    return True


def helper_pool(max_workers: int, thread_name_prefix: str) -> ThreadPoolExecutor:
    """A thread pool for work beside the step loop (I/O, parsing, merging) that keeps its
    tensor work single-threaded, so it never slows the step loop's kernels."""
    return ThreadPoolExecutor(
        max_workers, thread_name_prefix=thread_name_prefix, initializer=use_one_omp_thread
    )
