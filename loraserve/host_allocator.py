"""Host memory policy for CPU serving: reuse freed memory, and huge pages for big tensors.

glibc first: let it keep freed memory for reuse instead of handing it back to the OS every step.

Why: by default glibc serves blocks above 128 KiB (a threshold that only grows
slowly) with fresh `mmap`s and returns them with `munmap` when freed, so every
step's large temporaries (activations, gathered KV, logits) page-fault and get
zeroed by the kernel again. On a 2-core box that was 10-30% system time during
prefill; keeping freed memory in the heap (up to `trim_bytes` idle) cut a
4,096-token prefill from 5.4 s to 5.0 s. The cost is RSS that stays at the high
-water mark of a step, which a server reaches on its first busy step anyway.
Only glibc (Linux) has these knobs; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import mmap
import sys
import threading
import weakref

import torch

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


@functools.cache
def _libc(symbol: str) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), symbol)
    except (OSError, AttributeError):
        return None


@functools.cache
def keep_freed_memory(trim_bytes: int = 1 << 30) -> bool:
    """Tune glibc malloc once per process; True if applied."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, trim_bytes) == 1
    ok &= mallopt(M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


def return_freed_memory() -> bool:
    """Hand memory that is free but kept by malloc back to the OS (glibc's `malloc_trim`); True if
    some was returned. Why: `keep_freed_memory` keeps up to 1 GiB of freed heap for reuse, which
    is right for a step's temporaries but not for a one-off peak such as dequantising a
    checkpoint at load (about 500 MB kept for SmolLM2-135M)."""
    trim = _libc("malloc_trim")
    return bool(trim(0)) if trim is not None else False


HUGE_PAGE = 2 << 20


def _huge_mapping(nbytes: int) -> tuple[mmap.mmap, int] | None:
    """A fresh anonymous mapping for `nbytes` asked to be backed by huge pages, and where in it
    a 2 MiB boundary starts; None where the OS has no private anonymous mappings. Where it has
    no huge-page request (not Linux), or refuses it (a kernel without transparent huge pages),
    the mapping is still fresh and untouched, only with the OS's own page size. `_fresh_huge`:
    those bytes as a uint8 tensor (zero, untouched).

    Why a private mapping of its own and not `malloc` + `madvise`: glibc hands out blocks under
    its mmap threshold (32 MiB here, `keep_freed_memory`) from a heap whose pages were already
    faulted in as 4 KiB pages by earlier tensors (a checkpoint's dequantised copies at load), and
    `madvise` does not rebuild pages that exist: the lm_head and the pooled weights got none.
    (Python's `mmap` maps anonymous memory shared unless told otherwise, and shared memory follows
    another THP setting.) The tensor keeps the mapping alive; it is unmapped with the last view."""
    private, anonymous = getattr(mmap, "MAP_PRIVATE", 0), getattr(mmap, "MAP_ANONYMOUS", 0)
    if not (private and anonymous):
        return None
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=private | anonymous)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # EINVAL: built without transparent huge pages
            pass
    return m, -torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE


def _fresh_huge(nbytes: int) -> torch.Tensor | None:
    mapping = _huge_mapping(nbytes)
    if mapping is None:
        return None
    m, start = mapping
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=start)


# Small tensors that live as long as the model (a layer's packed weights: 0.3-7 MB each on the
# 135M shape) cannot get a huge page of their own; they are carved out of shared chunks. A chunk
# costs only the huge pages its tensors touch (plus the one its last tensor ends in), so chunks are
# large (fewer half-used pages: 32 MiB chunks added ~35 MB to the 135M server's RSS).
POOL_CHUNK = 64 * HUGE_PAGE
POOL_ALIGN = 64  # a cache line: every dtype's alignment, and the kernels' loads never straddle two


@dataclasses.dataclass
class _ChunkPool:
    """The chunk being carved. It holds the chunk's mapping weakly (every tensor carved out of it
    keeps the mapping alive), so a chunk is unmapped with the last tensor carved out of it."""

    mapping: weakref.ref | None = None
    start: int = 0  # where the 2 MiB-aligned chunk starts in the mapping
    used: int = 0  # bytes of it handed out
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def take(self, nbytes: int) -> torch.Tensor | None:
        with self.lock:
            m = self.mapping() if self.mapping is not None else None
            used = -(-self.used // POOL_ALIGN) * POOL_ALIGN
            if m is None or used + nbytes > POOL_CHUNK:
                fresh = _huge_mapping(POOL_CHUNK)
                if fresh is None:
                    return None
                m, self.start = fresh
                used = 0
            self.mapping, self.used = weakref.ref(m), used + nbytes
        return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=self.start + used)


_pool = _ChunkPool()


def zeros_on_huge_pages(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pooled: bool = False
) -> torch.Tensor:
    """`torch.zeros`, but a big host tensor asks for 2 MiB pages before it is first touched.

    Why: the tensors a step streams through (KV cache, LoRA slot table, weights) are hundreds of
    MB read in small strided pieces; with 4 KiB pages that walk thrashes the TLB, and the hardware
    prefetchers stop at every 4 KiB boundary. Linux set to `madvise` for transparent huge pages
    (the common default) only gives them to memory that asks. Measured: the 32-adapter decode
    LoRA matmuls ran 8% faster; the weights pooled and on fresh mappings (before, the per-layer
    panels were too small to be advised and the lm_head came from already-faulted heap), batch-1
    decode of SmolLM2-135M on a 2-core Zen 5, alternated runs, fastest step: int8 4.76-5.08 ->
    4.27-4.43 ms, fp32 12.2-12.3 -> 10.9-11.7 ms.
    `pooled`: a tensor smaller than a few huge pages that lives as long as the model (packed
    weights) shares POOL_CHUNK chunks with others, which are unmapped once every tensor carved
    out of them is. Best effort: no effect on CUDA, on other OSes, or where huge pages are off.
    """
    nbytes = dtype.itemsize * math.prod(shape)
    raw = None
    if device.type == "cpu" and nbytes >= 4 * HUGE_PAGE:
        raw = _fresh_huge(nbytes)
    elif device.type == "cpu" and pooled and nbytes <= POOL_CHUNK // 4:
        raw = _pool.take(nbytes)
    if raw is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return raw.view(dtype).view(shape).zero_()  # zero already: this faults the pages in now


def reserved_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat zero tensor whose host memory is taken only where it is first written.

    Why: the LoRA slot table is sized for every slot the adapter budget allows, but a server
    uses the slots of the adapters that arrive; a fresh anonymous mapping left untouched costs
    address space, not memory, and each page is faulted in (as a 2 MiB page where the tensor is
    big enough to be advised and the OS has them) by the first write to it. On CUDA, on an OS
    without anonymous mappings, or for a tensor under a few huge pages this is `torch.zeros`
    (allocated and zeroed now)."""
    nbytes = dtype.itemsize * numel
    raw = _fresh_huge(nbytes) if device.type == "cpu" and nbytes >= 4 * HUGE_PAGE else None
    if raw is None:
        return torch.zeros(numel, dtype=dtype, device=device)
    return raw.view(dtype)  # zero already, and untouched


MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable, keeping what they hold


def populate(t: torch.Tensor, nbytes: int) -> bool:
    """Fault in the pages under `nbytes` from `t`'s first element now; True if the OS did.

    Why: the first write to a fresh mapping pays its page faults, and for the LoRA slot table
    that write is an adapter's load on the step thread: on a 2-core Xeon VM, 52 ms of a 64 ms
    load of a rank-16 SmolLM adapter (19.5 MB) was faulting, stalling every running request.
    A worker thread populates the slot before the request is submitted (AdapterSlots.prepare).
    `MADV_POPULATE_WRITE` changes no byte, so it is harmless even if the step thread writes the
    same pages meanwhile. No effect (False) on CUDA, other OSes, or kernels before 5.14."""
    madvise = _libc("madvise")
    if madvise is None or t.device.type != "cpu" or nbytes <= 0:
        return False
    start = t.data_ptr()
    lo = start - start % mmap.PAGESIZE
    return madvise(ctypes.c_void_p(lo), ctypes.c_size_t(nbytes + start - lo), MADV_POPULATE_WRITE) == 0


MADV_DONTNEED = 4  # Linux: a private anonymous page reads as zero again, and is no longer taken


def release_pages(t: torch.Tensor) -> bool:
    """Zero the contiguous tensor `t` and hand the whole pages under it back to the OS; True if
    the OS took them. Why: a LoRA slot table's slot keeps its pages after its adapter is gone
    (reserved_zeros), so an adapter budget counting taken memory could never drop an idle slot.
    The bytes of pages `t` shares with its neighbours are zeroed in place; elsewhere (CUDA,
    other OSes, or when madvise refuses) the whole tensor is zeroed and stays taken. Linux only:
    elsewhere MADV_DONTNEED may keep a page's old bytes, and a dropped slot must read zero."""
    madvise = _libc("madvise") if sys.platform.startswith("linux") else None
    n, size = t.numel(), t.element_size()
    start = t.data_ptr()
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + n * size) // page * page
    if madvise is None or t.device.type != "cpu" or not t.is_contiguous() or hi <= lo:
        t.zero_()
        return False
    head, tail = (lo - start) // size, (start + n * size - hi) // size
    t[:head].zero_()
    t[n - tail :].zero_()
    if madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) != 0:
        t[head : n - tail].zero_()
        return False
    return True
