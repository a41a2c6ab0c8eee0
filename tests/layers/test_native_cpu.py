"""The native CPU kernels against their PyTorch formulations: multi-LoRA (wide ranks, odd
widths, blocking) and paged decode attention (GQA, batch 1, odd head sizes), and bad input;
each in both builds (`kernel`: the host's own and the AVX2 one, tests/layers/conftest.py)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from loraserve.layers import native_cpu
from loraserve.layers.linear import Linear, pack_panels
from loraserve.layers.lora import LoraTable
from loraserve.layers.lora_linear import LoraLinear
from loraserve.layers.ops import TorchOps
from tests.fixtures.native import ops_for


def test_kernel_matches_bmm_path_on_wide_ranks_odd_widths_and_interleaved_slots(kernel: ModuleType) -> None:
    """Rank 64 x 3 members (12 register chunks), widths that are not multiples of 16, a
    37-token segment (blocks of 12 or 6 plus a tail), one slot in two places, rows without adapters."""
    g = torch.Generator().manual_seed(0)
    slots, fin, outs, r = 5, 72, (100, 36, 36), 64
    a = torch.randn(slots, fin, len(outs) * r, generator=g)
    bs = [torch.randn(slots, r, o, generator=g) for o in outs]
    token_slots = [(0, 1, 3), (1, 2, 0), (3, 40, 1), (40, 41, 3), (41, 50, 4), (52, 53, 1)]
    x = torch.randn(53, fin, generator=g)
    results = []
    for k, ranks in ((None, None), (kernel, None), (kernel, torch.full((slots,), r))):
        fused = torch.randn(53, sum(outs), generator=torch.Generator().manual_seed(1))
        ys = [fused[:, :100], fused[:, 100:136], fused[:, 136:]]
        ops_for(k).lora(ys, x, a, bs, ops_for(k).lora_batch(token_slots), ranks)
        results.append(fused)
    torch.testing.assert_close(results[1], results[0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(results[2], results[0], atol=1e-3, rtol=1e-4)
    untouched = [2, 50, 51]  # rows outside every segment keep their values exactly
    assert torch.equal(results[1][untouched], results[0][untouched])


def test_kernel_reads_a_bf16_table_as_its_exact_fp32_widening(kernel: ModuleType) -> None:
    """A bf16 slot table (the default when serving bf16) must give what the fp32 kernel gives on
    the same values widened to fp32: row and block paths, masked tails (widths 100 and 36, rank
    20 chunks) and loaded ranks below the table's."""
    g = torch.Generator().manual_seed(3)
    slots, fin, outs, r = 4, 40, (100, 36), 24
    a = torch.randn(slots, fin, len(outs) * r, generator=g).bfloat16()
    bs = [torch.randn(slots, r, o, generator=g).bfloat16() for o in outs]
    x = torch.randn(30, fin, generator=g)
    token_slots = [(0, 1, 2), (1, 2, 0), (2, 13, 1), (13, 14, 3), (14, 30, 2)]
    for ranks in (None, torch.tensor([24, 20, 5, 0])):
        got, want = torch.zeros(30, sum(outs)), torch.zeros(30, sum(outs))
        for table, out in (((a, bs), got), ((a.float(), [b.float() for b in bs]), want)):
            ys = [out[:, :100], out[:, 100:]]
            kernel.lora_rows(x, *_rows_slots(token_slots), table[0], table[1], ys, ranks)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.abs().sum() > 0
    with pytest.raises(RuntimeError, match="dtype"):  # A and B must agree
        kernel.lora_rows(
            x, *_rows_slots(token_slots), a, [bs[0].float(), bs[1]], [got[:, :100], got[:, 100:]]
        )


def _rows_slots(token_slots: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [t for s, e, _ in token_slots for t in range(s, e)]
    slots = [slot for s, e, slot in token_slots for _ in range(s, e)]
    return torch.tensor(rows), torch.tensor(slots)


def test_kernel_reads_only_each_slots_loaded_rank(kernel: ModuleType) -> None:
    """Slots of rank 3, 8, 21 and 0 (cleared) in a rank-32 table: with `slot_rank` the kernel
    skips the zero padding (and any garbage there, which this test plants) and gives the
    full-rank answer of the zero-padded table."""
    g = torch.Generator().manual_seed(3)
    fin, outs, r, ranks = 40, (24, 40), 32, [3, 8, 21, 0]
    a = torch.randn(4, fin, 2 * r, generator=g)
    bs = [torch.randn(4, r, o, generator=g) for o in outs]
    padded_a, padded_bs = a.clone(), [b.clone() for b in bs]
    for s, rs in enumerate(ranks):  # the honest table: zeros past each slot's rank
        for j in range(2):
            padded_a[s, :, j * r + rs : (j + 1) * r] = 0
            padded_bs[j][s, rs:] = 0
    token_slots = [(0, 1, 2), (1, 2, 0), (2, 12, 1), (12, 13, 3), (13, 33, 2)]
    x = torch.randn(33, fin, generator=g)
    results = []
    for aa, bb, ranks_t in ((padded_a, padded_bs, None), (a, bs, torch.tensor(ranks))):
        fused = torch.zeros(33, sum(outs))
        ops_for(kernel).lora(
            [fused[:, :24], fused[:, 24:]],
            x,
            aa,
            bb,
            ops_for(kernel).lora_batch(token_slots),
            ranks_t,
        )
        results.append(fused)
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(results[1][12], torch.zeros(sum(outs)))  # rank 0: untouched


def test_kernel_refuses_bad_operands_with_a_clear_error(kernel: ModuleType) -> None:
    x, a, b = torch.randn(4, 8), torch.randn(2, 8, 4), torch.randn(2, 4, 6)
    y = torch.zeros(4, 6)
    rows = torch.arange(4)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.lora_rows(x, rows, torch.tensor([0, 1, 2, 0]), a, [b], [y])
    with pytest.raises(RuntimeError, match="contiguous rows"):
        kernel.lora_rows(x.t(), rows, torch.zeros(4, dtype=torch.long), a, [b], [y])
    with pytest.raises(RuntimeError, match="float32"):
        kernel.lora_rows(x.double(), rows, torch.zeros(4, dtype=torch.long), a, [b], [y])
    zeros = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="1 to 4 B matrices"):  # the kernels' one table check
        kernel.lora_rows(x, rows, zeros, torch.randn(2, 8, 5), [torch.randn(2, 1, 6)] * 5, [y] * 5)
    with pytest.raises(RuntimeError, match="one entry per slot"):
        kernel.lora_rows(x, rows, zeros, a, [b], [y], torch.tensor([4, 4, 4]))
    with pytest.raises(RuntimeError, match="rows/slots mismatch"):
        kernel.lora_rows(x, rows, zeros[:3], a, [b], [y])
    assert torch.equal(y, torch.zeros(4, 6))  # refused before touching the output
    if not kernel.panel_gemm_available():
        return
    w = pack_panels(torch.randn(6, 8))
    with pytest.raises(RuntimeError, match="out of range"):  # the fused pass checks the same way
        kernel.panel_lora_linear(x, w, 6, None, rows, torch.tensor([0, 1, 2, 0]), a, [b], None)
    with pytest.raises(RuntimeError, match="a must be float32"):  # bf16 tables take lora_rows
        kernel.panel_lora_linear(x, w, 6, None, rows, zeros, a.bfloat16(), [b.bfloat16()], None)


@pytest.mark.parametrize("m", [1, 2, 11, 40])
def test_fused_panel_lora_linear_is_base_plus_each_rows_delta(kernel: ModuleType, m: int) -> None:
    """panel_lora_linear (decode sizes: each row's LoRA runs between the panels) against
    x @ W.T + b plus every row's delta: three members of odd widths (a partial last panel), slots
    of full, partial and zero rank (garbage planted past each rank), rows without an adapter, one
    slot on several rows; 1 and 2 rows take the streaming kernels, 11 and 40 the register blocks."""
    g = torch.Generator().manual_seed(5)
    fin, outs, r, slots = 72, (100, 36, 36), 16, 5
    ranks = torch.tensor([16, 5, 0, 16, 9])
    a = torch.randn(slots, fin, 3 * r, generator=g)
    bs = [torch.randn(slots, r, o, generator=g) for o in outs]
    n = sum(outs)
    wt, bias = torch.randn(n, fin, generator=g), torch.randn(n, generator=g)
    x = torch.randn(m, fin, generator=g)
    rows = [i for i in range(m) if i % 4 != 2]
    row_slots = [(3 * i) % slots for i in rows]
    want = x @ wt.t() + bias
    for i, s in zip(rows, row_slots, strict=True):
        rs = int(ranks[s])
        want[i] += torch.cat([(x[i] @ a[s, :, j * r : j * r + rs]) @ bs[j][s, :rs] for j in range(3)])
    got = kernel.panel_lora_linear(
        x, pack_panels(wt), n, bias, torch.tensor(rows), torch.tensor(row_slots), a, bs, ranks
    )
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    with pytest.raises(RuntimeError, match="cover"):  # the members must span the output
        kernel.panel_lora_linear(
            x, pack_panels(wt), n, None, torch.tensor(rows), torch.tensor(row_slots), a, bs[:1] * 3
        )


def test_lora_linear_fuses_decode_and_prefill_sizes_and_agrees_with_two_passes(kernel: ModuleType) -> None:
    """A q/k/v LoraLinear on the native backend: up to 96 rows the decode-sized fused call, a
    prefill-sized input the prefill one, the fused path switched off panel_linear + lora_rows;
    all give the same answer."""
    g = torch.Generator().manual_seed(6)
    ops = ops_for(kernel)
    shapes = {"q": (24, 40), "k": (24, 8), "v": (24, 8)}
    table = LoraTable(
        shapes, 1, 4, 16, torch.float32, torch.device("cpu"), rank=8, groups={"qkv": ("q", "k", "v")}
    )
    for slot in range(3):
        for m, (fin, fout) in shapes.items():
            table.write(slot, 0, m, torch.randn(8, fin, generator=g), torch.randn(fout, 8, generator=g), 0.5)
    base = ops.make_linear(torch.randn(56, 24, generator=g))
    assert base.layout == "panel"
    lin = LoraLinear(base, ops, table, 0, "qkv", [(m, shapes[m][1]) for m in "qkv"])
    a, bs = table.a_layers["qkv"][0], [table.b_layers[m][0] for m in "qkv"]
    for tokens in (5, 120):
        x = torch.randn(tokens, 24, generator=g)
        lb = ops.lora_batch([(0, 1, 2), (1, 2, 0), (3, tokens, 1)])
        assert ops.linear_lora(x, base, a, bs, lb, table.slot_rank) is not None
        fused = lin(x, lb)
        ops.fused_lora = False
        try:
            two = lin(x, lb)
        finally:
            ops.fused_lora = True
        torch.testing.assert_close(fused, two, atol=1e-4, rtol=1e-4)


def test_kernel_is_only_offered_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native_cpu.cpu_kernels(torch.device("cpu"), torch.bfloat16) is None
    assert native_cpu.cpu_kernels(torch.device("meta"), torch.float32) is None
    monkeypatch.setenv(native_cpu.ENV_SWITCH, "0")
    assert not native_cpu.enabled()
    monkeypatch.setenv(native_cpu.ENV_SWITCH, "1")
    assert native_cpu.enabled()


def _reference_decode(q, k_cache, v_cache, tables, lens, scale):
    """Per sequence: gather its positions through the block table, repeat KV heads, SDPA."""
    hq, hkv = q.shape[1], k_cache.shape[2]
    out = []
    for b, n in enumerate(lens):
        k = k_cache[tables[b]].flatten(0, 1)[:n].repeat_interleave(hq // hkv, 1).transpose(0, 1)
        v = v_cache[tables[b]].flatten(0, 1)[:n].repeat_interleave(hq // hkv, 1).transpose(0, 1)
        out.append(torch.nn.functional.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, scale=scale))
    return torch.stack(out).squeeze(2)


@pytest.mark.parametrize(
    ("batch", "hq", "hkv", "d"),
    # batch-1 split, GQA, MHA, odd D; register paths: 8 rows per KV head (blocks + a tail), D = 128
    # (AVX2: 16 vectors a row, V passes in chunks) with 2 and 3 rows per KV head
    [
        (1, 9, 3, 64),
        (5, 9, 3, 64),
        (3, 4, 4, 32),
        (4, 6, 2, 40),
        (5, 8, 1, 64),
        (4, 4, 2, 128),
        (3, 6, 2, 128),
    ],
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_matches_sdpa_on_gathered_context(
    kernel: ModuleType, batch: int, hq: int, hkv: int, d: int, cache_dtype: torch.dtype
) -> None:
    """A bf16 cache is read as its exact fp32 widening: the reference gets the widened copy, so
    the tolerance stays fp32's."""
    g = torch.Generator().manual_seed(batch + d)
    blocks, bs = 40, 4
    k_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(cache_dtype)
    lens = [1, 13, 32, 7, 30][:batch]
    tables = torch.stack([torch.randperm(blocks, generator=g)[:8] for _ in range(batch)])
    # q as the model passes it: a head slice of the rotated q|k tensor (strided rows)
    qk = torch.randn(batch, hq + hkv, d, generator=g)
    q = qk[:, :hq]
    got = kernel.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens), 0.3)
    assert got.dtype == torch.float32
    want = _reference_decode(q, k_cache.float(), v_cache.float(), tables, lens, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("threads", "lens", "hq", "hkv", "d"),
    # fewer sequences than threads and 64+ positions: the context is split into parts merged by their
    # score maxima; (8, [3, 300]): 4 parts each, so the 3-position sequence has empty parts
    [(2, [100], 9, 3, 64), (4, [257], 9, 3, 64), (8, [3, 300], 8, 2, 128), (3, [64, 65], 4, 4, 32)],
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_splits_long_contexts_over_idle_threads(
    kernel: ModuleType, threads: int, lens: list[int], hq: int, hkv: int, d: int, cache_dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(sum(lens) + d)
    blocks, bs = 100, 4
    k_cache = (torch.randn(blocks, bs, hkv, d, generator=g) * 2).to(cache_dtype)
    v_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(cache_dtype)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:80] for _ in lens])
    q = torch.randn(len(lens), hq, d, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens), 0.3)
    finally:
        torch.set_num_threads(old)
    want = _reference_decode(q, k_cache.float(), v_cache.float(), tables, lens, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_paged_decode_attention_refuses_lengths_and_blocks_outside_the_cache(kernel: ModuleType) -> None:
    k_cache = torch.zeros(4, 2, 1, 16)
    q = torch.zeros(1, 1, 16)
    with pytest.raises(RuntimeError, match="context length"):
        kernel.paged_decode_attention(q, k_cache, k_cache, torch.tensor([[0, 1]]), torch.tensor([5]), 1.0)
    with pytest.raises(RuntimeError, match="block id"):
        kernel.paged_decode_attention(q, k_cache, k_cache, torch.tensor([[0, 9]]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        kernel.paged_decode_attention(
            q, k_cache, k_cache.bfloat16(), torch.tensor([[0, 1]]), torch.tensor([3]), 1.0
        )
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        half = k_cache.half()
        kernel.paged_decode_attention(q, half, half, torch.tensor([[0, 1]]), torch.tensor([3]), 1.0)


@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 576 takes the parallel path
def test_rms_norm_kernels_match_torch_and_update_the_residual_in_place(kernel: ModuleType, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x, delta, w = torch.randn(rows, 576, generator=g), torch.randn(rows, 576, generator=g), torch.randn(576)
    want = torch.nn.functional.rms_norm(x, (576,), w, 1e-5)
    torch.testing.assert_close(kernel.rms_norm(x, w, 1e-5), want, atol=1e-5, rtol=1e-5)
    residual = x.clone()
    y = kernel.add_rms_norm_(residual, delta, w, 1e-6)
    torch.testing.assert_close(residual, x + delta, atol=0, rtol=0)
    torch.testing.assert_close(
        y, torch.nn.functional.rms_norm(x + delta, (576,), w, 1e-6), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("rows", [1, 5, 200])  # 200 x 1539 takes the parallel path
def test_silu_mul_and_rotary_kernels_match_their_pytorch_twins(kernel: ModuleType, rows: int) -> None:
    from loraserve.layers.activation import silu_mul
    from loraserve.layers.rotary import apply_rotary

    g = torch.Generator().manual_seed(rows)
    inter = 1539  # whole vectors of 16 (8 with AVX2) and a scalar tail
    gu = torch.randn(rows, 2 * inter, generator=g) * 8  # wide range: both branches of silu, large |x|
    torch.testing.assert_close(ops_for(kernel).silu_mul(gu, inter), silu_mul(gu, inter), atol=1e-5, rtol=1e-5)
    qkv = torch.randn(rows, (9 + 3 + 3) * 64, generator=g)
    x = qkv[:, : 12 * 64].view(rows, 12, 64)  # q|k heads of a fused q|k|v output: strided rows
    angles = torch.rand(rows, 32, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    torch.testing.assert_close(
        ops_for(kernel).rotary(x, cos, sin), apply_rotary(x, cos, sin), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("vocab", [1, 37, 49152])  # a lone entry, a scalar tail, the SmolLM2 vocabulary
def test_argmax_logsumexp_kernel_matches_torch_first_max_and_flags_non_finite_rows(
    kernel: ModuleType, vocab: int
) -> None:
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g) * 10
    x[1] = x[1].round()  # many ties: the first index of the max must win
    x[1, vocab // 2 :] = x[1].max()
    x[2, vocab // 3] = float("nan")  # never the max; the row is flagged
    x[3, : vocab - 1] = float("-inf")  # a grammar mask: -inf entries are allowed, but not finite
    x[4, -1] = float("inf")
    rows = x[:, :]  # the kernel also reads rows of a wider buffer
    wide = torch.full((6, vocab + 5), 7.0)
    wide[:, :vocab] = x
    for scores in (rows, wide[:, :vocab]):
        arg, lse, finite = ops_for(kernel).argmax_logsumexp(scores)
        assert arg.dtype == torch.int64 and lse.dtype == torch.float32 and finite.dtype == torch.bool
        want_arg, want_lse, want_finite = TorchOps.argmax_logsumexp(scores)
        assert finite.tolist() == want_finite.tolist()
        ok = [0, 1, 3, 5] if vocab > 1 else [0, 1, 5]
        assert arg[ok].tolist() == want_arg[ok].tolist()
        torch.testing.assert_close(lse[ok], want_lse[ok], atol=1e-5, rtol=1e-6)
        if vocab > 1:
            assert int(arg[2]) == int(torch.nan_to_num(scores[2], nan=-1e9).argmax())
    assert ops_for(kernel).argmax_logsumexp(torch.zeros(0, 5))[0].shape == (0,)


@pytest.mark.parametrize("vocab", [1, 37, 49152])
def test_draw_kernel_picks_the_first_token_past_each_rows_uniform(kernel: ModuleType, vocab: int) -> None:
    """The native draw is PyTorch's (softmax, cumsum, searchsorted right) up to the sums' rounding:
    the same token wherever the uniform is not within rounding of a CDF step, never a masked
    (-inf) token, the first token with mass at u = 0 and the last at u -> 1."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(64, vocab, generator=g) * 3
    x[::3, : vocab // 2] = float("-inf")  # truncated rows (top-k / top-p masks)
    u = torch.rand(64, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2**-24
    got = ops_for(kernel).draw(x, u)
    assert got.dtype == torch.int64 and got.shape == (64,)
    want = TorchOps.draw(x, u)
    assert (got == want).float().mean() >= 0.95 and (got == want)[:2].all()
    assert torch.isfinite(x.gather(1, got[:, None])).all()
    # where they differ, the uniform sits on a step of the CDF, to rounding
    cdf = torch.softmax(x.double(), dim=-1).cumsum(-1)
    for r in (got != want).nonzero().flatten().tolist():
        assert abs(float(cdf[r, min(int(got[r]), int(want[r]))]) - float(u[r])) < 1e-5
    # one token with all the mass: always it
    lone = torch.full((3, vocab), float("-inf"))
    lone[:, vocab // 2] = 0.5
    assert ops_for(kernel).draw(lone, torch.tensor([0.0, 0.5, 0.999])).tolist() == [vocab // 2] * 3
    # a wider buffer's rows, as the engine's logits views are
    wide = torch.full((64, vocab + 5), 7.0)
    wide[:, :vocab] = x
    assert torch.equal(ops_for(kernel).draw(wide[:, :vocab], u), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_kernel_writes_what_pytorch_writes(kernel: ModuleType, dtype: torch.dtype) -> None:
    """Views into a fused q|k|v output (strided rows), bf16 rounded to nearest even as `.to` does,
    NaN kept NaN, and a slot outside the cache refused before anything is written."""
    from loraserve.layers.attention import write_kv

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, (9 + 3 + 3) * 64, generator=g) * 100
    qkv[2, 9 * 64 + 7] = float("nan")
    k, v = qkv[:, 9 * 64 : 12 * 64].view(5, 3, 64), qkv[:, 12 * 64 :].view(5, 3, 64)
    slots = torch.tensor([0, 17, 5, 63, 31])
    want_k, want_v = torch.zeros(4, 16, 3, 64, dtype=dtype), torch.zeros(4, 16, 3, 64, dtype=dtype)
    write_kv(want_k, want_v, k, v, slots)
    got_k, got_v = torch.zeros_like(want_k), torch.zeros_like(want_v)
    kernel.write_kv(got_k, got_v, k, v, slots)
    # bit-exact but for the NaN's payload (PyTorch's vector conversion may set its sign)
    torch.testing.assert_close(got_k, want_k, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(got_v, want_v)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernel.write_kv(got_k, got_v, k, v, torch.tensor([0, 1, 2, 3, 64]))
    with pytest.raises(RuntimeError, match="contiguous heads"):
        kernel.write_kv(got_k, got_v, k.transpose(1, 2).contiguous().transpose(1, 2), v, slots)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_rope_decode_attention_is_rotary_cache_write_and_decode_in_one_call(
    kernel: ModuleType, cache_dtype: torch.dtype
) -> None:
    """The one-call decode attention equals its three kernels' PyTorch twins: rotary on q and k of
    the fused q|k|v rows, the rotated k and plain v written to their slots, then attention over
    each context (which includes the new token)."""
    from loraserve.layers.attention import write_kv
    from loraserve.layers.rotary import apply_rotary

    g = torch.Generator().manual_seed(7)
    hq, hkv, d, blocks, bs = 9, 3, 64, 40, 4
    lens = [1, 6, 37]
    k_cache = (torch.randn(blocks, bs, hkv, d, generator=g)).to(cache_dtype)
    v_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(cache_dtype)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:10] for _ in lens])
    slots = torch.tensor([int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)])
    qkv = torch.randn(len(lens), (hq + 2 * hkv) * d, generator=g)
    angles = torch.rand(len(lens), d // 2, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    qk = apply_rotary(qkv[:, : (hq + hkv) * d].view(len(lens), hq + hkv, d), cos, sin)
    write_kv(want_k, want_v, qk[:, hq:], qkv[:, (hq + hkv) * d :].view(len(lens), hkv, d), slots)
    want = _reference_decode(qk[:, :hq], want_k.float(), want_v.float(), tables, lens, 0.125)
    got = kernel.rope_decode_attention(
        qkv, hq, hkv, cos, sin, k_cache, v_cache, slots, tables, torch.tensor(lens), 0.125
    )
    assert got.shape == (len(lens), hq * d)
    torch.testing.assert_close(k_cache, want_k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)
    torch.testing.assert_close(got.view(len(lens), hq, d), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="qkv must be"):
        kernel.rope_decode_attention(
            qkv[:, 1:], hq, hkv, cos, sin, k_cache, v_cache, slots, tables, torch.tensor(lens), 1.0
        )
    before = k_cache.clone()
    with pytest.raises(RuntimeError, match="cache holds 3 KV heads, qkv 2"):  # same width, other split
        kernel.rope_decode_attention(
            qkv, 11, 2, cos, sin, k_cache, v_cache, slots, tables, torch.tensor(lens), 1.0
        )
    with pytest.raises(RuntimeError, match="k_cache/v_cache must be contiguous"):  # not an index error
        flat = k_cache.view(blocks * bs, hkv, d)
        kernel.rope_decode_attention(
            qkv, hq, hkv, cos, sin, flat, flat, slots, tables, torch.tensor(lens), 1.0
        )
    with pytest.raises(RuntimeError, match="slot out of range"):
        bad = torch.tensor([0, 1, blocks * bs])
        kernel.rope_decode_attention(
            qkv, hq, hkv, cos, sin, k_cache, v_cache, bad, tables, torch.tensor(lens), 1.0
        )
    assert torch.equal(k_cache, before)  # refused before anything was written


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_panel_embedding_reads_exactly_the_rows_pythons_gather_reads(kernel: ModuleType, fmt: str) -> None:
    """Rows of a tied embedding out of the packed lm_head (all three panel layouts, odd K for
    bf16's k-pairs, a partial last panel): bit for bit the values PyTorch's indexing gives."""
    from loraserve.layers.linear import panel_rows
    from loraserve.layers.quantized_linear import pack_lowp_panels, panel_rows_lowp

    g = torch.Generator().manual_seed(11)
    for vocab, k in [(100, 24), (70, 33), (49152 // 64, 576)]:
        w = torch.randn(vocab, k, generator=g)
        ids = torch.tensor([0, 31, 32, vocab - 1, 5, 5, vocab // 2])
        if fmt == "fp32":
            lin = Linear(pack_panels(w), None, vocab, k, layout="panel")
            want = panel_rows(lin, ids)
            got = kernel.panel_embedding(lin.weight, ids, k)
        else:
            lin = pack_lowp_panels(w, None, fmt)
            want = panel_rows_lowp(lin, ids)
            got = kernel.panel_embedding(lin.weight, ids, k, lin.scale)
        assert got.dtype == torch.float32 and got.shape == (len(ids), k)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="token id out of range"):
        kernel.panel_embedding(pack_panels(torch.randn(40, 8)), torch.tensor([64]), 8)
    with pytest.raises(RuntimeError, match="scale"):
        lin = pack_lowp_panels(torch.randn(40, 8), None, "int8")
        kernel.panel_embedding(lin.weight, torch.tensor([1]), 8)
