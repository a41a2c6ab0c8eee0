"""The prefill-sized fused base + LoRA call (`panel_linear_lora_rows`, csrc/lora_cpu.cpp) against
the two passes it replaces (`panel_linear`, then `lora_rows`), bit for bit, and against the
math; in both builds (`kernel`: the host's own and the AVX2 one, tests/layers/conftest.py)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from loraserve.layers.linear import pack_panels

FIN, OUTS, R, SLOTS = 72, (100, 36, 36), 16, 5  # odd member widths: boundaries inside panels
RANKS = torch.tensor([16, 5, 0, 16, 9])  # full, partial and zero loaded rank


def _operands(
    dtype: torch.dtype, seed: int, fin: int = FIN, outs: tuple[int, ...] = OUTS
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(SLOTS, fin, len(outs) * R, generator=g).to(dtype)
    bs = [torch.randn(SLOTS, R, o, generator=g).to(dtype) for o in outs]
    return a, bs, torch.randn(sum(outs), fin, generator=g)


def _two_passes(
    kernel: ModuleType,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    slots: torch.Tensor,
    a: torch.Tensor,
    bs: list[torch.Tensor],
) -> torch.Tensor:
    """panel_linear, then lora_rows into each member's columns: what the fused call replaces."""
    outs = [b.shape[2] for b in bs]
    y = kernel.panel_linear(x, w, sum(outs), bias)
    starts = [sum(outs[:j]) for j in range(len(outs))]
    kernel.lora_rows(
        x, rows, slots, a, bs, [y[:, s : s + o] for s, o in zip(starts, outs, strict=True)], RANKS
    )
    return y


def _entries(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments of 1, 2, 13 (a block of 12 and one of 1) and the rest of the rows (across two
    chunks' ends: 300 rows are four chunks of 75), some rows without an adapter, in row order."""
    segs = [(0, 1, 3), (3, 5, 1), (90, 103, 0), (103, 104, 2), (120, m, 4)]
    rows = [r for s, e, _ in segs for r in range(s, e)]
    slots = [slot for s, e, slot in segs for _ in range(s, e)]
    return torch.tensor(rows), torch.tensor(slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_prefill_fused_call_is_the_two_passes_bit_for_bit(
    kernel: ModuleType, dtype: torch.dtype, with_bias: bool
) -> None:
    """300 rows (four chunks of work items), three members whose boundaries fall inside panels,
    blocks of one entry (the row kernel's sums), blocks cut by a chunk's end, a slot of rank 0."""
    a, bs, wt = _operands(dtype, 11)
    m, n = 300, sum(OUTS)
    x = torch.randn(m, FIN, generator=torch.Generator().manual_seed(12))
    bias = torch.randn(n) if with_bias else None
    rows, slots = _entries(m)
    w = pack_panels(wt)
    fused = kernel.panel_linear_lora_rows(x, w, n, bias, rows, slots, a, bs, RANKS)
    assert torch.equal(fused, _two_passes(kernel, x, w, bias, rows, slots, a, bs))
    # and the math: x @ W.T + b plus each entry's delta at its slot's loaded rank
    want = x @ wt.t() + (bias if bias is not None else 0)
    for i, s in zip(rows.tolist(), slots.tolist(), strict=True):
        rs = int(RANKS[s])
        want[i] += torch.cat(
            [(x[i] @ a[s, :, j * R : j * R + rs].float()) @ bs[j][s, :rs].float() for j in range(3)]
        )
    torch.testing.assert_close(fused, want, atol=1e-3, rtol=1e-4)


def test_prefill_fused_call_takes_entries_out_of_row_order(kernel: ModuleType) -> None:
    """Entries not in row order cannot be found per work item: the call then runs the two passes
    itself, with the same answer."""
    a, bs, wt = _operands(torch.float32, 13)
    m, n = 200, sum(OUTS)
    x = torch.randn(m, FIN, generator=torch.Generator().manual_seed(14))
    rows, slots = torch.tensor([150, 151, 152, 7, 8, 9, 40]), torch.tensor([1, 1, 1, 0, 0, 0, 3])
    w = pack_panels(wt)
    want = _two_passes(kernel, x, w, None, rows, slots, a, bs)
    assert torch.equal(kernel.panel_linear_lora_rows(x, w, n, None, rows, slots, a, bs, RANKS), want)


def test_prefill_fused_call_with_weights_walked_panel_by_panel(kernel: ModuleType) -> None:
    """Weights over L3's share (9 MB here) are walked panel by panel, each item another chunk of
    rows: every entry's h is then computed first. Same answer as the two passes."""
    outs = (1000, 536, 536)
    a, bs, wt = _operands(torch.float32, 16, fin=1100, outs=outs)
    m = 200
    x = torch.randn(m, 1100, generator=torch.Generator().manual_seed(17))
    rows, slots = _entries(m)
    w = pack_panels(wt)
    fused = kernel.panel_linear_lora_rows(x, w, sum(outs), None, rows, slots, a, bs, RANKS)
    assert torch.equal(fused, _two_passes(kernel, x, w, None, rows, slots, a, bs))


def test_prefill_fused_call_refuses_bad_operands(kernel: ModuleType) -> None:
    a, bs, wt = _operands(torch.float32, 15)
    x, n = torch.randn(130, FIN), sum(OUTS)
    rows, slots = torch.arange(130), torch.zeros(130, dtype=torch.long)
    with pytest.raises(RuntimeError, match="cover"):  # the members must span the output
        kernel.panel_linear_lora_rows(x, pack_panels(wt), n, None, rows, slots, a, bs[:1] * 3)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.panel_linear_lora_rows(x, pack_panels(wt), n, None, rows, slots + SLOTS, a, bs)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel.panel_linear_lora_rows(x, pack_panels(wt), n, None, rows, slots, a.half(), bs)
