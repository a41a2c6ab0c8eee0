"""Batched multi-LoRA linear: many adapters, one batch, one grouped op per projection.

Adapter weights live in a *slot table* on the device: for each projection,
``a[layer, slot, :in, :R]`` holds ``lora_A.T`` and ``b[layer, slot, :R, :out]``
holds ``scale * lora_B.T`` (the scale is folded in once, at load). A row's
delta is then ``(x @ a[slot]) @ b[slot]``. Adapters of lower rank than the
table's R are zero-padded; R grows to the largest rank actually loaded (up
to the configured maximum), so a deployment of rank-16 adapters computes
with exactly rank 16. Full-width, contiguous operands matter on CPU: a
rank-sliced or transposed operand makes `bmm` several times slower.

Per step, tokens are grouped by slot (SGMV-style):
- segments are padded into a ``[slots, max_seg, in]`` buffer and handled by
  two `bmm`s over the contiguous slot range the batch uses — one call per
  projection however many adapters are in the batch; when every slot has the
  same number of contiguous tokens (decode rows, or equal-length prefills) the
  buffer is a zero-copy view;
- a long segment whose padding would more than double the bmm's work (one
  prefill among decode rows) gets its own two matmuls instead, where the
  Python overhead is negligible next to the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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


def apply_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lb: LoraBatch) -> None:
    """y[T, out] += LoRA delta of x[T, in]; a: [slots, in, R], b: [slots, R, out] of one layer."""
    if lb.slot_hi > lb.slot_lo:
        n, m = lb.slot_hi - lb.slot_lo, lb.max_seg
        if lb.dense:
            xp = x[lb.tok_start : lb.tok_start + n * m].view(n, m, x.shape[1])
        else:
            xp = x.new_zeros(n * m, x.shape[1])
            xp.index_copy_(0, lb.pad_rows, x.index_select(0, lb.tok_rows))
            xp = xp.view(n, m, x.shape[1])
        h = torch.bmm(xp, a[lb.slot_lo : lb.slot_hi])
        d = torch.bmm(h, b[lb.slot_lo : lb.slot_hi])
        if lb.dense:
            y[lb.tok_start : lb.tok_start + n * m] += d.view(n * m, -1)
        else:
            y.index_add_(0, lb.tok_rows, d.view(n * m, -1).index_select(0, lb.pad_rows))
    for s, e, slot in lb.segments:
        y[s:e].addmm_(x[s:e] @ a[slot], b[slot])


class LoraTable:
    """Device-resident slot table for every projection of every layer.

    The slot count is fixed at start-up, so activating an adapter is a copy
    into preallocated memory and a step never allocates or moves adapter
    weights. The rank dimension grows (a rare, one-off reallocation) when an
    adapter of higher rank than any before it arrives.
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
    ) -> None:
        self.shapes, self.num_layers, self.num_slots = shapes, num_layers, num_slots
        self.max_rank, self.dtype, self.device = max_rank, dtype, device
        self.rank = 0
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.ensure_rank(min(rank, max_rank))

    @staticmethod
    def bytes_per_slot(
        shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int, dtype: torch.dtype
    ) -> int:
        per = sum(fin + fout for fin, fout in shapes.values()) * max_rank * num_layers
        return per * torch.empty((), dtype=dtype).element_size()

    def ensure_rank(self, rank: int) -> None:
        """Widen the table to `rank`, keeping every loaded adapter (zero-padded)."""
        if rank <= self.rank:
            return
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the table's maximum {self.max_rank}")
        L, S, old = self.num_layers, self.num_slots, self.rank
        for name, (fin, fout) in self.shapes.items():
            a = torch.zeros(L, S, fin, rank, dtype=self.dtype, device=self.device)
            b = torch.zeros(L, S, rank, fout, dtype=self.dtype, device=self.device)
            if old:
                a[..., :old] = self.a[name]
                b[:, :, :old] = self.b[name]
            self.a[name], self.b[name] = a, b
        self.rank = rank

    def clear_slot(self, slot: int) -> None:
        for t in (*self.a.values(), *self.b.values()):
            t[:, slot].zero_()

    def write(
        self, slot: int, layer: int, module: str, a: torch.Tensor, b: torch.Tensor, scale: float
    ) -> None:
        """a: [r, in] (PEFT lora_A), b: [out, r] (PEFT lora_B)."""
        r = a.shape[0]
        self.a[module][layer, slot, :, :r].copy_(a.t())
        self.b[module][layer, slot, :r].copy_(b.t() * scale)
