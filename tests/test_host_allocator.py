"""Host memory helpers: same results as plain torch, whatever the platform grants."""

from __future__ import annotations

import sys

import torch

from loraserve.host_allocator import keep_freed_memory, zeros_on_huge_pages


def test_zeros_on_huge_pages_is_zeros() -> None:
    for shape in [(3, 4), (64, 1024, 64)]:  # small (no advice) and 16 MiB (advised)
        t = zeros_on_huge_pages(shape, torch.float32, torch.device("cpu"))
        assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
        assert not t.any()
        t.fill_(1.0)  # writable everywhere, including the advised interior
        assert t.sum().item() == t.numel()


def test_big_tensor_gets_huge_pages_where_linux_allows() -> None:
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    try:
        mode = open(path).read()
    except OSError:
        return
    defrag = open("/sys/kernel/mm/transparent_hugepage/defrag").read()
    if "[never]" in mode or "[never]" in defrag or not sys.platform.startswith("linux"):
        return  # huge pages off, or only granted when memory happens to be unfragmented
    before = _anon_huge_kib()
    t = zeros_on_huge_pages((64, 1024, 1024), torch.float32, torch.device("cpu"))  # 256 MiB
    assert _anon_huge_kib() > before  # the advice took effect on first touch
    del t


def _anon_huge_kib() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_keep_freed_memory_is_idempotent() -> None:
    first = keep_freed_memory()
    assert keep_freed_memory() is first  # applied once per process
