"""Batched multi-LoRA linear: many adapters, one batch, one grouped op per projection.

Adapter weights live in a *slot table* on the device: ``b[proj][layer, slot,
:R, :out]`` holds ``scale * lora_B.T`` of each projection (the scale is folded
in once, at load) and ``a[group][layer, slot, :in, j*R:(j+1)*R]`` holds
``lora_A.T`` of member ``j`` of a *group*, the projections that read the same
input (q/k/v, gate/up): one `bmm` computes every member's ``x @ A``, which
saves calls and, for prefills, runs the thin rank-R matmul three times wider.
A row's delta for member ``j`` is then ``(x @ a[slot])[:, jR:(j+1)R] @
b[slot]``. Adapters of lower rank than the table's R (or that skip a member)
are zero-padded; R grows to the largest rank actually loaded (up to the
configured maximum), so a deployment of rank-16 adapters computes with
exactly rank 16. Full-width, contiguous operands matter on CPU: a
rank-sliced or transposed operand makes `bmm` several times slower.

Per step, tokens are grouped by slot (SGMV-style):
- with the native CPU backend (layers/ops_cpu.py), every token goes to its
  `lora_rows` kernel, one call per group: decode rows stream their A and B straight
  from the table (decode steps are bound by reading every adapter once, and
  this reads them at full bandwidth, with no padding or gathers), prefill
  segments run register-blocked, 6 or 12 tokens at a time; measured on the 135M
  shape with 32 adapters, 1.3x faster per decode step and 2x per prefill
  than the `bmm` path below, which stays for CUDA and other dtypes; decode-sized
  steps (up to 96 rows) run base and LoRA as one call instead, each row's LoRA
  between two base panels, and prefill-sized ones too, each GEMM work item's rows
  getting their deltas while the item is in cache (`CpuNativeOps.linear_lora`);
- otherwise segments are padded into a ``[slots, max_seg, in]`` buffer and handled by
  two `bmm`s over the contiguous slot range the batch uses — one call per
  projection however many adapters are in the batch; when every slot has the
  same number of contiguous tokens (decode rows, or equal-length prefills) the
  buffer is a zero-copy view;
- a long segment whose padding would more than double the bmm's work (one
  prefill among decode rows) gets its own two matmuls instead, where the
  Python overhead is negligible next to the work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loraserve.host_allocator import HUGE_PAGE, populate, release_pages, reserved_zeros

# what a CPU slot block adds past its whole huge pages (LoraTable._round_block says why)
SLOT_COLOR = 4096

# Segments up to this length always share the padded bmm; longer ones may get their own matmuls.
LONG_SEGMENT = 16


@dataclass
class LoraBatch:
    """How this step's tokens map onto adapter slots (built once per step)."""

    slot_lo: int = 0
    slot_hi: int = 0  # bmm over slots [lo, hi); empty when hi == lo
    max_seg: int = 0
    dense: bool = False  # tokens [tok_start, tok_start + n*max_seg) are exactly the padded layout
    tok_start: int = 0
    tok_rows: torch.Tensor | None = None  # [N] token indices in the bmm part (not dense)
    pad_rows: torch.Tensor | None = None  # [N] their rows in the padded buffer
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, slot)
    rows: torch.Tensor | None = None  # [N] token indices, grouped by sequence (row-kernel layout)
    row_slots: torch.Tensor | None = None  # [N] their slots


def _padded_rows(segs: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(rows of the padded [slot range x longest per-slot run] buffer, real rows) for `segs`."""
    per_slot: dict[int, int] = {}
    for s, e, slot in segs:
        per_slot[slot] = per_slot.get(slot, 0) + e - s
    span = max(per_slot) - min(per_slot) + 1
    return span * max(per_slot.values()), sum(per_slot.values())


def build_lora_batch(token_slots: list[tuple[int, int, int]], device: torch.device) -> LoraBatch | None:
    """token_slots: (tok_start, tok_end, slot) per sequence that uses an adapter, in token order.

    Everything goes through the padded bmm unless padding would more than double
    the work; then the longest segments (prefills) move to their own matmuls
    until it doesn't. 32 equal-length prefills on 32 adapters are one dense bmm;
    one long prefill among decode rows runs alone.
    """
    if not token_slots:
        return None
    lb = LoraBatch()
    short = sorted(token_slots, key=lambda t: t[1] - t[0])
    while short and short[-1][1] - short[-1][0] > LONG_SEGMENT:
        padded, real = _padded_rows(short)
        if padded <= 2 * real + 2 * LONG_SEGMENT:
            break
        lb.segments.append(short.pop())
    if not short:
        return lb
    short.sort()
    lo = min(sl for _, _, sl in short)
    hi = max(sl for _, _, sl in short) + 1
    per_slot: dict[int, list[int]] = {}
    for s, e, slot in short:
        per_slot.setdefault(slot, []).extend(range(s, e))
    max_seg = max(len(v) for v in per_slot.values())
    lb.slot_lo, lb.slot_hi, lb.max_seg = lo, hi, max_seg
    first = short[0][0]
    n = hi - lo
    if len(per_slot) == n and all(
        per_slot.get(lo + i) == list(range(first + i * max_seg, first + (i + 1) * max_seg)) for i in range(n)
    ):
        lb.dense, lb.tok_start = True, first
        return lb
    tok_rows, pad_rows = [], []
    for slot, toks in per_slot.items():
        base = (slot - lo) * max_seg
        tok_rows.extend(toks)
        pad_rows.extend(range(base, base + len(toks)))
    lb.tok_rows = torch.tensor(tok_rows, dtype=torch.long, device=device)
    lb.pad_rows = torch.tensor(pad_rows, dtype=torch.long, device=device)
    return lb


def apply_lora(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    a: torch.Tensor,
    bs: Sequence[torch.Tensor],
    lb: LoraBatch,
) -> None:
    """ys[j][T, out_j] += LoRA delta of projection j of x[T, in], for projections sharing input x.

    a: [slots, in, len(ys) * R], the A matrices of every projection side by side (one `bmm`
    reads them all); bs[j]: [slots, R, out_j] of one layer.
    """
    r = bs[0].shape[-2]
    if lb.slot_hi > lb.slot_lo:
        lo, hi = lb.slot_lo, lb.slot_hi
        n, m = hi - lo, lb.max_seg
        whole = lo == 0 and hi == a.shape[0]  # every slot in use: no slicing (fewer ops per call)
        a_s = a if whole else a[lo:hi]
        bs_s = bs if whole else [b[lo:hi] for b in bs]
        if lb.dense:
            all_rows = lb.tok_start == 0 and n * m == x.shape[0]
            rows = slice(lb.tok_start, lb.tok_start + n * m)
            xp = (x if all_rows else x[rows]).view(n, m, x.shape[1])
        else:
            xp = x.new_zeros(n * m, x.shape[1])
            xp.index_copy_(0, lb.pad_rows, x.index_select(0, lb.tok_rows))
            xp = xp.view(n, m, x.shape[1])
        h = torch.bmm(xp, a_s)
        for j, (y, b) in enumerate(zip(ys, bs_s, strict=True)):
            hj = h[:, :, j * r : (j + 1) * r]
            if lb.dense and m > 1:  # prefills: accumulate in place, skipping a pass over y
                y[rows].view(n, m, -1).baddbmm_(hj, b)
            elif lb.dense:
                (y if all_rows else y[rows]).add_(torch.bmm(hj, b).view(n * m, -1))
            else:
                d = torch.bmm(hj, b).view(n * m, -1)
                y.index_add_(0, lb.tok_rows, d.index_select(0, lb.pad_rows))
    for s, e, slot in lb.segments:
        h = x[s:e] @ a[slot]
        for j, (y, b) in enumerate(zip(ys, bs, strict=True)):
            y[s:e].addmm_(h[:, j * r : (j + 1) * r], b[slot])


class LoraTable:
    """Device-resident slot table for every projection of every layer.

    The slot count (`num_slots`) is fixed at start-up from the adapter memory budget, and a
    step never allocates or moves adapter weights: activating an adapter is a copy into its slot.

    Layout: one flat buffer, slot-major. Slot `s` owns a block of `slot_stride` elements, sized
    for --max-lora-rank, that holds all of its tensors at the table's current rank R (every
    group's A for every layer, then every projection's B); `a[group]` [L, S, in, members * R]
    and `b[proj]` [L, S, R, out] are strided views of it, and the kernels read a layer's slice
    slot by slot (each slot's matrix contiguous, slots a block apart: csrc/slot_table.h).
    Why slot-major: the whole table is reserved at start as address space (`reserved_zeros`:
    untouched host pages cost no memory), a slot's pages are its own, and they are taken when
    its adapter is first written, so nothing grows or moves as adapters arrive. The layer-major
    table this replaced was allocated for the first 4 slots and doubled as more were needed,
    which copied it on the step thread: 180-540 ms for 8 -> 16 slots on the 135M shape, faulting
    in the new table, and inter-token p99 during 8 cold loads rose to 2.4-2.7x the warm
    control's (bench workload (c)). A table of every slot allocated at start instead held memory
    no adapter used (289 MiB of a 1.44 GB server for SmolLM2-135M).
    The rank still grows: R is the largest rank loaded so far (the kernels stream R columns of
    each A row), and an adapter of higher rank re-lays out the loaded slots inside their blocks,
    once per new rank. On CUDA the reservation is device memory allocated at start (the budget).
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        num_layers: int,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        rank: int = 8,
        groups: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        """`groups`: projections that read the same input (q/k/v; gate/up) keep their A
        matrices side by side in one tensor, so one `bmm` serves the whole group; every
        projection not named in a group is a group of its own, under its own name."""
        self.shapes, self.num_layers, self.num_slots = shapes, num_layers, num_slots
        self.max_rank, self.dtype, self.device = max_rank, dtype, device
        grouped = {m for members in (groups or {}).values() for m in members}
        self.groups = {**(groups or {}), **{m: (m,) for m in shapes if m not in grouped}}
        self.member_of: dict[str, tuple[str, int]] = {}
        for g, members in self.groups.items():
            if len({shapes[m][0] for m in members}) != 1:
                raise ValueError(f"LoRA group {g!r} mixes input sizes")
            for j, m in enumerate(members):
                self.member_of[m] = (g, j)
        self.rank = 0
        # bumped whenever the `a`/`b` views change (rank growth), so holders of per-layer views
        # (the native decode stack, layers/decode_stack.py) know to take the new ones
        self.generation = 0
        # largest rank loaded into each slot: the native kernel reads only that much of the
        # slot's (zero-padded) A columns and B rows, so mixed ranks don't all pay for the largest
        self.slot_rank = torch.zeros(num_slots, dtype=torch.long)
        self.written = [False] * num_slots  # slots whose pages were ever touched
        self.slot_stride = self._round_block(self._slot_elements(max_rank))
        self.buf = reserved_zeros(num_slots * self.slot_stride, dtype, device)
        self.a: dict[str, torch.Tensor] = {}  # per group: [L, S, in, members * R]
        self.b: dict[str, torch.Tensor] = {}  # per projection: [L, S, R, out]
        self.ensure_rank(min(rank, max_rank))

    @staticmethod
    def bytes_per_slot(
        shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int, dtype: torch.dtype
    ) -> int:
        per = sum(fin + fout for fin, fout in shapes.values()) * max_rank * num_layers
        return per * torch.empty((), dtype=dtype).element_size()

    def _offsets(self, rank: int) -> tuple[dict[str, int], int]:
        """Where each group's A and each projection's B start in a slot's block at `rank` (each
        on a cache line of its own), and the elements the block then uses."""
        align = 64 // self.dtype.itemsize
        off, at = 0, {}
        for key, n in [
            *((f"a:{g}", self.shapes[ms[0]][0] * len(ms) * rank) for g, ms in self.groups.items()),
            *((f"b:{m}", rank * fout) for m, (_fin, fout) in self.shapes.items()),
        ]:
            at[key] = off
            off += -(-self.num_layers * n // align) * align
        return at, off

    def _slot_elements(self, rank: int) -> int:
        return self._offsets(rank)[1]

    def _round_block(self, elements: int) -> int:
        """On CPU a block of a huge page or more is whole huge pages plus one 4 KiB page
        (SLOT_COLOR), so slot s starts s pages past a huge page: its pages are still its own
        apart from the first, and the same matrix element of different slots no longer falls
        in the same cache sets. A decode step reads one layer's matrices of every slot in the
        batch at the same offsets; 2 MiB apart, every slot's copy of a line mapped to one set of
        a 1 MiB 8-way L2 (128 KiB of sets), and the fused low-precision pass, which then fetched
        the same columns of every row's B together (csrc/fused_lora.h run_by_columns), thrashed it.
        SmolLM2-135M int8-bf16, 32 rows on 32 distinct rank-16 adapters, AVX2, 2-core Zen 4: a
        decode step, fused ÷ two passes, alternated step by step, 1.06 -> 0.96. Elsewhere blocks
        are only cache-line aligned (device memory is allocated whole)."""
        big = self.device.type == "cpu" and elements * self.dtype.itemsize >= HUGE_PAGE
        unit = (HUGE_PAGE if big else 64) // self.dtype.itemsize
        color = SLOT_COLOR // self.dtype.itemsize if big else 0
        return -(-elements // unit) * unit + color

    def _make_views(self) -> None:
        at, _ = self._offsets(self.rank)
        L, S, R, st = self.num_layers, self.num_slots, self.rank, self.slot_stride
        for g, members in self.groups.items():
            fin, w = self.shapes[members[0]][0], len(members) * R
            self.a[g] = self.buf.as_strided((L, S, fin, w), (fin * w, st, w, 1), at[f"a:{g}"])
        for m, (_fin, fout) in self.shapes.items():
            self.b[m] = self.buf.as_strided((L, S, R, fout), (R * fout, st, fout, 1), at[f"b:{m}"])
        # per-layer views, indexed in Python: the forward pass then issues no select ops for them
        self.a_layers = {g: list(t.unbind(0)) for g, t in self.a.items()}
        self.b_layers = {m: list(t.unbind(0)) for m, t in self.b.items()}
        self.generation += 1

    def ensure_rank(self, rank: int) -> None:
        """Widen the table to `rank`, keeping every loaded adapter (zero-padded)."""
        if rank <= self.rank:
            return
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the table's maximum {self.max_rank}")
        old, kept = self.rank, [s for s in range(self.num_slots) if self.written[s]]
        saved = {
            s: (
                {g: t[:, s].clone() for g, t in self.a.items()},
                {m: t[:, s].clone() for m, t in self.b.items()},
            )
            for s in kept
        }
        self.rank = rank
        self._make_views()
        for s, (a_old, b_old) in saved.items():
            self._zero_block(s)
            for g, members in self.groups.items():
                for j in range(len(members)):
                    self.a[g][:, s, :, j * rank : j * rank + old] = a_old[g][..., j * old : (j + 1) * old]
            for m, b in b_old.items():
                self.b[m][:, s, :old] = b

    def _zero_block(self, slot: int) -> None:
        start = slot * self.slot_stride
        self.buf[start : start + self._slot_elements(self.rank)].zero_()

    def prefault(self, slot: int, rank: int) -> bool:
        """Take a never-written slot's pages now, for an adapter of `rank`, without changing its
        contents: safe from any thread, even while the step thread writes that slot."""
        if self.written[slot]:
            return False
        used = self._slot_elements(min(max(self.rank, rank), self.max_rank))
        return populate(self.buf[slot * self.slot_stride :], used * self.dtype.itemsize)

    def discard(self, slot: int) -> None:
        """Empty a slot and hand its pages back to the OS (zero again, and untouched until the
        next write), so an adapter memory budget counts only the slots that hold an adapter."""
        self.slot_rank[slot] = 0
        self.written[slot] = False
        release_pages(self.buf[slot * self.slot_stride : (slot + 1) * self.slot_stride])

    def clear_slot(self, slot: int) -> None:
        self.slot_rank[slot] = 0
        if self.written[slot]:  # never written: its pages are untouched, so still zero
            self._zero_block(slot)

    def write(
        self, slot: int, layer: int, module: str, a: torch.Tensor, b: torch.Tensor, scale: float
    ) -> None:
        """a: [r, in] (PEFT lora_A), b: [out, r] (PEFT lora_B)."""
        r = a.shape[0]
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is past the table's {self.num_slots} slots")
        self.written[slot] = True
        self.slot_rank[slot] = max(int(self.slot_rank[slot]), r)
        group, j = self.member_of[module]
        self.a[group][layer, slot, :, j * self.rank : j * self.rank + r].copy_(a.t())
        self.b[module][layer, slot, :r].copy_(b.t() * scale)
