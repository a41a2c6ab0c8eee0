"""Host memory helpers: same results as plain torch, whatever the platform grants."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from loraserve.host_allocator import keep_freed_memory, zeros_on_huge_pages


def test_zeros_on_huge_pages_is_zeros() -> None:
    for shape in [(3, 4), (64, 1024, 64)]:  # small (no advice) and 16 MiB (advised)
        t = zeros_on_huge_pages(shape, torch.float32, torch.device("cpu"))
        assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
        assert not t.any()
        t.fill_(1.0)  # writable everywhere, including the advised interior
        assert t.sum().item() == t.numel()


def test_big_tensor_is_advised_for_huge_pages_on_linux() -> None:
    """The advice itself is checked (the `hg` flag on the mapping), not whether the kernel
    found free huge pages at that moment, which depends on the machine."""
    if not sys.platform.startswith("linux") or not Path("/proc/self/smaps").exists():
        return
    t = zeros_on_huge_pages((64, 1024, 1024), torch.float32, torch.device("cpu"))  # 256 MiB
    middle = t.data_ptr() + t.numel() * t.element_size() // 2
    assert "hg" in _vm_flags(middle)
    small = zeros_on_huge_pages((4, 4), torch.float32, torch.device("cpu"))
    assert not small.any()


def _vm_flags(address: int) -> list[str]:
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError("address not mapped")


def test_keep_freed_memory_is_idempotent() -> None:
    first = keep_freed_memory()
    assert keep_freed_memory() is first  # applied once per process
