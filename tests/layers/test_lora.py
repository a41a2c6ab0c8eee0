"""The grouped multi-LoRA op, on both paths (PyTorch and the native CPU kernel), against a
per-row loop written out by hand."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from loraserve.layers.lora import LONG_SEGMENT, SLOT_COLOR, LoraTable
from tests.fixtures.memory import needs_proc, rss_bytes
from tests.fixtures.native import ops_for

SHAPES = {"q_proj": (24, 40)}


def table_with(adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]], slots: int = 6) -> LoraTable:
    t = LoraTable(
        SHAPES,
        num_layers=1,
        num_slots=slots,
        max_rank=32,
        dtype=torch.float32,
        device=torch.device("cpu"),
        rank=4,
    )
    for slot, (a, b, scale) in adapters.items():
        t.ensure_rank(a.shape[0])
        t.write(slot, 0, "q_proj", a, b, scale)
    return t


def lay_out(seqs: list[tuple[int, int | None]]) -> tuple[list[int | None], list[tuple[int, int, int]]]:
    """(slot of every token, (start, end, slot) per adapter sequence) for (length, slot) sequences."""
    rows: list[int | None] = []
    token_slots = []
    for n, slot in seqs:
        if slot is not None:
            token_slots.append((len(rows), len(rows) + n, slot))
        rows += [slot] * n
    return rows, token_slots


def reference(x: torch.Tensor, rows: list[int | None], adapters) -> torch.Tensor:
    out = torch.zeros(x.shape[0], 40)
    for i, slot in enumerate(rows):
        if slot is not None:
            a, b, scale = adapters[slot]
            out[i] = scale * (x[i] @ a.t()) @ b.t()
    return out


@pytest.mark.parametrize(
    "layout", ["dense", "shared-slot", "gaps", "long", "mixed", "prefills", "one-prefill"]
)
def test_grouped_lora_matches_per_row_math(layout: str, lora_kernel: ModuleType | None) -> None:
    g = torch.Generator().manual_seed(0)
    adapters = {
        s: (torch.randn(r, 24, generator=g), torch.randn(40, r, generator=g), 0.5 * (s + 1))
        for s, r in zip(range(5), (4, 8, 16, 8, 2))
    }
    seqs = {  # (num tokens, slot) per sequence, in batch order
        "dense": [(1, 0), (1, 1), (1, 2), (1, 3)],
        "shared-slot": [(1, 2), (1, 2), (1, 3), (3, 1)],
        "gaps": [(1, None), (2, 0), (1, None), (1, 4)],
        "long": [(LONG_SEGMENT + 5, 1), (1, None), (LONG_SEGMENT + 1, 3)],
        "mixed": [(1, 4), (1, 0), (LONG_SEGMENT + 3, 2), (4, 4), (1, None)],
        "prefills": [(40, 0), (40, 1), (40, 2)],
        "one-prefill": [(1, 0), (1, 1), (1, 2), (1, 3), (100, 4)],
    }[layout]
    rows, token_slots = lay_out(seqs)
    x = torch.randn(len(rows), 24, generator=g)
    t = table_with(adapters)
    assert t.rank == 16
    lb = ops_for(lora_kernel).lora_batch(token_slots)
    if lora_kernel is not None:
        assert lb.rows is not None and lb.slot_hi == lb.slot_lo and not lb.segments  # all on the kernel
    elif layout in ("dense", "prefills"):
        assert lb.dense and not lb.segments  # one zero-copy bmm, even for long equal prefills
    if layout == "one-prefill" and lora_kernel is None:
        assert lb.dense and lb.segments == [(4, 104, 4)]  # the odd long prefill runs on its own
    y = torch.zeros(len(rows), 40)
    ops_for(lora_kernel).lora((y,), x, t.a["q_proj"][0], (t.b["q_proj"][0],), lb, t.slot_rank)
    torch.testing.assert_close(y, reference(x, rows, adapters), atol=1e-4, rtol=1e-4)


def test_rank_growth_keeps_loaded_adapters_and_refuses_past_max(lora_kernel: ModuleType | None) -> None:
    g = torch.Generator().manual_seed(1)
    small = (torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g), 2.0)
    t = table_with({0: small})
    assert t.rank == 4
    big = (torch.randn(32, 24, generator=g), torch.randn(40, 32, generator=g), 0.25)
    t.ensure_rank(32)
    t.write(1, 0, "q_proj", *big)
    x = torch.randn(2, 24, generator=g)
    y = torch.zeros(2, 40)
    ops_for(lora_kernel).lora(
        (y,),
        x,
        t.a["q_proj"][0],
        (t.b["q_proj"][0],),
        ops_for(lora_kernel).lora_batch([(0, 1, 0), (1, 2, 1)]),
    )
    torch.testing.assert_close(y, reference(x, [0, 1], {0: small, 1: big}), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="exceeds"):
        t.ensure_rank(64)


@pytest.mark.parametrize("layout", ["dense", "prefills", "gaps", "one-prefill"])
def test_grouped_projections_share_one_a_matmul(layout: str, lora_kernel: ModuleType | None) -> None:
    """q/k/v-style group: A matrices side by side; adapters may target only some members; the
    outputs are column slices of one fused [T, q+k+v] tensor, as the model passes them."""
    g = torch.Generator().manual_seed(2)
    shapes = {"q": (24, 40), "k": (24, 8), "v": (24, 8), "o": (40, 24)}
    t = LoraTable(
        shapes, 1, 6, 32, torch.float32, torch.device("cpu"), rank=4, groups={"qkv": ("q", "k", "v")}
    )
    assert set(t.a) == {"qkv", "o"} and t.a["qkv"].shape[-1] == 3 * 4
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    targets = {0: "qkv", 1: "qv", 2: "k", 3: "qkv"}
    for slot, mods in targets.items():
        r = (4, 8, 2, 16)[slot]
        t.ensure_rank(r)
        for m in mods:
            fin, fout = shapes[m]
            w = (torch.randn(r, fin, generator=g), torch.randn(fout, r, generator=g), 0.5 + slot)
            weights[slot, m] = w
            t.write(slot, 0, m, *w)
    assert t.rank == 16  # growth relaid out earlier adapters' A blocks
    seqs = {
        "dense": [(1, 0), (1, 1), (1, 2), (1, 3)],
        "prefills": [(20, 0), (20, 1), (20, 2)],
        "gaps": [(1, None), (3, 1), (1, 3), (2, None)],
        "one-prefill": [(1, 0), (1, 1), (1, 2), (60, 3)],
    }[layout]
    rows, token_slots = lay_out(seqs)
    x = torch.randn(len(rows), 24, generator=g)
    fused = torch.zeros(len(rows), 40 + 8 + 8)
    ys = [fused[:, :40], fused[:, 40:48], fused[:, 48:]]
    lb = ops_for(lora_kernel).lora_batch(token_slots)
    assert t.slot_rank.tolist()[:4] == [4, 8, 2, 16]
    ops_for(lora_kernel).lora(ys, x, t.a["qkv"][0], [t.b[m][0] for m in "qkv"], lb, t.slot_rank)
    for y, m in zip(ys, "qkv", strict=True):
        want = torch.zeros_like(y)
        for i, slot in enumerate(rows):
            if slot is not None and (slot, m) in weights:
                a, b, scale = weights[slot, m]
                want[i] = scale * (x[i] @ a.t()) @ b.t()
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_group_members_must_share_their_input() -> None:
    with pytest.raises(ValueError, match="mixes input sizes"):
        LoraTable(
            {"a": (8, 8), "b": (4, 8)}, 1, 2, 8, torch.float32, torch.device("cpu"), groups={"ab": ("a", "b")}
        )


def test_slots_keep_what_they_hold_through_rank_growth_and_nothing_moves_as_slots_fill() -> None:
    """Slots are blocks of one reserved buffer: writing any slot leaves the views (and the native
    side's copies of them, `generation`) as they are; rank growth re-lays out every loaded slot,
    padded with zeros, and a slot past the table refuses."""
    g = torch.Generator().manual_seed(3)
    t = LoraTable(SHAPES, 2, 20, 32, torch.float32, torch.device("cpu"), rank=4)
    assert t.a["q_proj"].shape[:2] == (2, 20) and t.b["q_proj"].shape[:3] == (2, 20, 4)
    generation, weights = t.generation, {}
    for slot, r in ((0, 4), (5, 4), (19, 4)):
        weights[slot] = (torch.randn(r, 24, generator=g), torch.randn(40, r, generator=g))
        t.write(slot, 1, "q_proj", *weights[slot], 0.5)
    assert t.generation == generation  # filling slots moved nothing
    for slot, r in ((6, 16), (13, 8)):
        weights[slot] = (torch.randn(r, 24, generator=g), torch.randn(40, r, generator=g))
        t.ensure_rank(r)
        t.write(slot, 1, "q_proj", *weights[slot], 0.5)
    assert t.rank == 16 and t.generation == generation + 1 and t.b["q_proj"].shape[:3] == (2, 20, 16)
    x = torch.randn(3, 24, generator=g)
    for slot, (a, b) in weights.items():
        got = (x @ t.a["q_proj"][1, slot]) @ t.b["q_proj"][1, slot]
        torch.testing.assert_close(got, 0.5 * (x @ a.t()) @ b.t(), atol=1e-4, rtol=1e-4)
        assert not t.a["q_proj"][1, slot, :, a.shape[0] :].any()  # zero-padded past its rank
    assert not t.a["q_proj"][0].any() and not t.a["q_proj"][1, 1:5].any()  # nothing else written
    t.clear_slot(13)
    assert not t.a["q_proj"][:, 13].any() and not t.b["q_proj"][:, 13].any() and t.slot_rank[13] == 0
    assert t.a["q_proj"][1, 6].any() and t.a["q_proj"][1, 19].any()  # its neighbours kept theirs
    with pytest.raises(ValueError, match="past the table's 20 slots"):
        t.write(20, 0, "q_proj", *weights[0], 1.0)


@needs_proc
def test_a_slot_takes_memory_when_its_adapter_is_written_not_before() -> None:
    """The whole budget is reserved at start, but a server pays only for the slots its adapters
    use: a 64-slot table at rank 64 (128 MiB) holds next to nothing until a slot is written, and
    then about that slot's block."""
    shapes = {"q_proj": (1024, 1024)}
    before = rss_bytes()
    t = LoraTable(shapes, 4, 64, 64, torch.float32, torch.device("cpu"), rank=64)
    assert t.buf.numel() * 4 == 64 * t.slot_stride * 4 == 64 * ((2 << 20) + SLOT_COLOR)
    assert rss_bytes() - before < 8 << 20
    g = torch.Generator().manual_seed(4)
    for layer in range(4):
        t.write(
            40, layer, "q_proj", torch.randn(64, 1024, generator=g), torch.randn(1024, 64, generator=g), 1.0
        )
    assert rss_bytes() - before < 16 << 20


def test_slot_blocks_round_to_huge_pages_on_cpu_only() -> None:
    """On CPU a slot of 2 MiB or more is whole huge pages plus one 4 KiB page, so slot s starts
    s pages past a huge page (the same element of different slots in different cache sets); on
    a device, where the table is allocated whole, each slot is only cache-line aligned (no
    padding paid per slot)."""
    shapes = {"q_proj": (1000, 1000)}  # 5 layers at rank 64: 2.44 MiB a slot
    cpu = LoraTable(shapes, 5, 3, 64, torch.float32, torch.device("cpu"), rank=64)
    dev = LoraTable(shapes, 5, 3, 64, torch.float32, torch.device("meta"), rank=64)
    used = 5 * (1000 * 64 + 64 * 1000)
    assert cpu.slot_stride * 4 == (4 << 20) + SLOT_COLOR and dev.slot_stride == used
    starts = [cpu.a["q_proj"][0, s].data_ptr() - cpu.buf.data_ptr() for s in range(3)]
    assert [p % (128 << 10) for p in starts] == [0, 4096, 8192]  # three sets of a 1 MiB 8-way L2
    assert dev.a["q_proj"].stride(1) == used and dev.buf.numel() == 3 * used
