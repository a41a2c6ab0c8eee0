"""Host memory helpers: same results as plain torch, whatever the platform grants."""

from __future__ import annotations

import gc
import mmap
import sys
from pathlib import Path

import pytest
import torch

from loraserve import host_allocator
from loraserve.host_allocator import HUGE_PAGE, POOL_CHUNK, keep_freed_memory, zeros_on_huge_pages
from tests.fixtures.memory import needs_proc, rss_bytes


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


def test_big_tensor_gets_whole_huge_pages_and_is_unmapped_with_its_last_view() -> None:
    """A fresh private mapping starting on a 2 MiB boundary, not heap memory that earlier tensors
    already faulted in as 4 KiB pages; the mapping goes away with the tensor (no leak)."""
    if not sys.platform.startswith("linux") or not Path("/proc/self/smaps").exists():
        return
    t = zeros_on_huge_pages((4, 1024, 1024), torch.float32, torch.device("cpu"))  # 16 MiB
    assert t.data_ptr() % HUGE_PAGE == 0
    view = t[1:3]
    address = view.data_ptr()
    del t
    gc.collect()
    assert "hg" in _vm_flags(address)  # a view keeps the mapping
    del view
    gc.collect()
    assert _vm_flags(address, missing_ok=True) is None


def test_pooled_small_tensors_share_advised_chunks_without_overlapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Packed weights (`pooled`): many small tensors of any dtype out of shared huge-page chunks,
    each zero, cache-line aligned, writable without touching its neighbours; their chunk goes
    with them. A fresh pool, so weights of other tests' models do not share (and pin) the chunk."""
    monkeypatch.setattr(host_allocator, "_pool", host_allocator._ChunkPool())
    cpu = torch.device("cpu")
    shapes = [((3, 70, 32), torch.int8), ((5, 33, 32, 2), torch.bfloat16), ((7, 9), torch.float32)] * 40
    ts = [zeros_on_huge_pages(shape, dtype, cpu, pooled=True) for shape, dtype in shapes]
    for i, t in enumerate(ts):
        assert not t.any() and t.is_contiguous() and t.data_ptr() % 64 == 0
        t.fill_(i % 100 + 1)
    for i, t in enumerate(ts):
        assert bool((t == i % 100 + 1).all()), f"tensor {i} was overwritten by a neighbour"
    if sys.platform.startswith("linux") and Path("/proc/self/smaps").exists():
        assert all("hg" in _vm_flags(t.data_ptr()) for t in ts)
        # shared: ~1 MB of tensors is one chunk's mapping, not a mapping (and a huge page) each
        assert len({_mapping(t.data_ptr()) for t in ts}) == 1
        # a tensor too big to pool has a mapping of its own, not a share of a chunk
        big = zeros_on_huge_pages((POOL_CHUNK // 2,), torch.uint8, cpu, pooled=True)
        assert not big.any()
        # the chunks go with the last tensors carved out of them (the model's weights): no leak
        address = ts[-1].data_ptr()
        del ts, t
        gc.collect()
        assert _vm_flags(address, missing_ok=True) is None


def _mapping(address: int) -> tuple[int, int]:
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            return lo, hi
    raise AssertionError("address not mapped")


def _vm_flags(address: int, missing_ok: bool = False) -> list[str] | None:
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    if missing_ok:
        return None
    raise AssertionError("address not mapped")


def test_keep_freed_memory_is_idempotent() -> None:
    first = keep_freed_memory()
    assert keep_freed_memory() is first  # applied once per process


@needs_proc
@pytest.mark.parametrize("huge_pages", [True, False])
def test_reserved_zeros_take_memory_only_where_written(
    huge_pages: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reservation (the LoRA slot table's) is zero and costs memory only where it is written,
    with huge pages or, on a platform without the request, with plain pages (not `torch.zeros`,
    which would touch it all)."""
    if not huge_pages:  # an OS with private anonymous mappings but no MADV_HUGEPAGE
        bare = type("Mmap", (), {k: getattr(mmap, k) for k in ("mmap", "MAP_PRIVATE", "MAP_ANONYMOUS")})
        monkeypatch.setattr(host_allocator, "mmap", bare)
    before = rss_bytes()
    t = host_allocator.reserved_zeros(64 << 20, torch.float32, torch.device("cpu"))  # 256 MiB
    assert t.numel() == 64 << 20 and t.dtype == torch.float32
    assert rss_bytes() - before < 16 << 20
    t[: 1 << 20].fill_(1.0)
    assert rss_bytes() - before < 24 << 20
    assert t[: 1 << 20].sum().item() == 1 << 20 and not t[1 << 20 :: 4096].any()
    if huge_pages and sys.platform.startswith("linux") and Path("/proc/self/smaps").exists():
        assert "hg" in _vm_flags(t.data_ptr())


@needs_proc
def test_populate_takes_the_pages_and_keeps_what_they_hold() -> None:
    """What a worker thread does for a slot before its adapter loads: the pages become resident,
    and a write that raced it (here: one before it) survives."""
    t = host_allocator.reserved_zeros(32 << 20, torch.float32, torch.device("cpu"))  # 128 MiB
    t[100:200] = 7.0
    before = rss_bytes()
    if not host_allocator.populate(t[64:], 64 << 20):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")
    assert rss_bytes() - before > 60 << 20
    assert t[100:200].eq(7.0).all() and not t[:100].any() and not t[200:].any()


@needs_proc
def test_release_pages_hands_back_memory_and_leaves_neighbours_alone() -> None:
    """What dropping an idle LoRA slot does: the slot reads zero again and its whole pages are no
    longer resident, while the bytes it shares a page with on either side keep their values."""
    t = host_allocator.reserved_zeros(32 << 20, torch.float32, torch.device("cpu"))  # 128 MiB
    t.fill_(3.0)
    lo, hi = 1001, (24 << 20) + 7  # not on page boundaries: the edges share pages
    before = rss_bytes()
    released = host_allocator.release_pages(t[lo:hi])
    after = rss_bytes()  # before the checks below, whose temporaries take heap memory
    assert not t[lo:hi].any()
    assert t[:lo].eq(3.0).all() and t[hi:].eq(3.0).all()
    if sys.platform.startswith("linux"):
        assert released and before - after > 80 << 20  # of the 96 MB released
    t[lo:hi] = 5.0  # the pages come back on the next write
    assert t[lo:hi].eq(5.0).all()
