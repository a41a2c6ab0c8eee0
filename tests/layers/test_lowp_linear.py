"""Low-precision projections (bf16, int8 weight-only): the quantiser, and every backend's GEMM
(PyTorch, the native kernel in its host and AVX2 builds) against fp32 `F.linear` on the
dequantised matrix: each must compute exactly the quantised model, up to fp32 summation order."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from loraserve.layers.lora import LoraBatch
from loraserve.layers.ops import TorchOps
from loraserve.layers.ops_lowp_cpu import LowpCpuOps
from loraserve.layers.quantized_linear import AMX_MIN_ROWS, dequantize, quantize_int8
from tests.fixtures import native as native_fixture

CPU = torch.device("cpu")
# the fp32 kernels' builds (host, AVX2) where the fixture knows them
BUILDS = getattr(native_fixture, "BUILDS", ("native",))
# (out, in): a partial last panel, odd K (bf16 pairs), one panel, the 135M shape's down_proj
SHAPES = [(70, 33), (32, 64), (48, 7), (576, 1536)]
# every path: 1-row stream, in-register blocks, AMX from AMX_MIN_ROWS_INT8 (6) / AMX_MIN_ROWS (8)
# rows, 32-row tile pairs and a 16-row tail, the AVX2 build's in-register limits (8 int8, 16 bf16)
# and fp32-scratch path, and int8 AMX chunks of rows (200 rows at K = 1536)
ROWS = [1, 2, 5, 6, 13, 17, 40, 100, 200]


def backend(kind: str, fmt: str) -> TorchOps:
    if kind == "torch":
        return TorchOps(CPU, torch.float32, weights=fmt)
    march = kind.split(":", 1)[1]
    kernels: ModuleType = (
        native_fixture.native_kernel_or_skip(march)
        if march != "native"
        else native_fixture.native_kernel_or_skip()
    )
    return LowpCpuOps(CPU, torch.float32, kernels, weights=fmt)


BACKENDS = ["torch", *(f"native:{m}" for m in BUILDS)]


def test_int8_quantiser_is_per_channel_symmetric() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=gen) * torch.logspace(-3, 1, 40)[:, None]
    w[7] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(40) != 7], torch.full((39,), 127, dtype=torch.int8))
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all()), "rounding error over half a step"
    assert bool((q[7] == 0).all())


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_lowp_linear_computes_the_dequantised_matrix(kind: str, fmt: str) -> None:
    ops = backend(kind, fmt)
    # AMX and AVX512_BF16's vdpbf16ps (lowp_gemm_isa "avx512+bf16dp") multiply bf16 activations
    isa = "" if kind == "torch" else ops.kernels.lowp_gemm_isa()
    amx = fmt == "bf16" and ("amx" in isa or "bf16dp" in isa)
    gen = torch.Generator().manual_seed(1)
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
        b = torch.randn(out_f, generator=gen)
        for bias in (None, b):
            lin = ops.make_linear(w, bias)
            if kind != "torch":
                assert lin.layout == f"{fmt}-panel"
            deq = dequantize(lin)
            assert deq.shape == (out_f, in_f)
            # the format's rounding really happened (not an fp32 copy), and only that much of it
            step = 2**-8 if fmt == "bf16" else 1 / 127
            rel = (deq - w).abs().amax(dim=1) / w.abs().amax(dim=1)
            assert 0 < float(rel.max()) <= step
            for m in ROWS:
                x = torch.randn(m, in_f, generator=gen)
                y = ops.linear(x, lin)
                # from AMX_MIN_ROWS rows on those paths round x to bf16 first
                xr = x.bfloat16().double() if amx and m >= AMX_MIN_ROWS else x.double()
                ref = F.linear(xr, deq.double(), None if bias is None else bias.double()).float()
                torch.testing.assert_close(y, ref, atol=2e-5 * in_f**0.5, rtol=1e-5)


@pytest.mark.parametrize("march", BUILDS)
def test_int8_panels_of_a_bf16_model_round_only_the_activations(march: str) -> None:
    """`--dtype bfloat16 --quantize int8`: from AMX_MIN_ROWS rows, where the build has bf16 dot
    products, the int8 weights (exact in bf16) multiply bf16-rounded activations and nothing else
    rounds; below that, and on builds without them (AVX2), activations stay fp32."""
    kernels = (
        native_fixture.native_kernel_or_skip(march)
        if march != "native"
        else native_fixture.native_kernel_or_skip()
    )
    ops = LowpCpuOps(CPU, torch.float32, kernels, weights="int8", bf16_activations=True)
    isa = kernels.lowp_gemm_isa()
    rounds = "amx" in isa or "bf16dp" in isa
    gen = torch.Generator().manual_seed(3)
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
        b = torch.randn(out_f, generator=gen)
        lin = ops.make_linear(w, b)
        deq = dequantize(lin).double()
        for m in ROWS:
            x = torch.randn(m, in_f, generator=gen) * 3
            y = ops.linear(x, lin)
            rounded = rounds and m >= AMX_MIN_ROWS
            xr = x.bfloat16().double() if rounded else x.double()
            ref = F.linear(xr, deq, b.double()).float()
            torch.testing.assert_close(y, ref, atol=2e-5 * in_f**0.5, rtol=1e-5)
            if rounded and in_f > 8:  # the rounding really happened: fp32 activations differ by more
                full = F.linear(x.double(), deq, b.double()).float()
                assert float((y - full).abs().max()) > 1e-3


@pytest.mark.parametrize("march", BUILDS)
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_one_row_streams_give_the_same_bits_under_every_prefetch_hint(march: str, fmt: str) -> None:
    """The hint of the one-row weight streams (csrc/row_prefetch.h: T1 on Intel, T0 on AMD, none
    in Zen 4's AVX-512 build) only moves lines between caches: each mode's product is the same to the bit, and the
    mode a benchmark sets is the one the kernels then run."""
    ops = backend(f"native:{march}", fmt)
    kernels = ops.kernels
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(96, 1536, generator=gen) / 40
    lin = ops.make_linear(w, None)
    x = torch.randn(1, 1536, generator=gen)
    chosen = kernels.row_prefetch()
    try:
        outs = []
        for mode in (0, 1, 2):
            kernels.set_row_prefetch(mode)
            assert kernels.row_prefetch() == mode
            outs.append(ops.linear(x, lin))
    finally:
        kernels.set_row_prefetch(chosen)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    ref = F.linear(x.double(), dequantize(lin).double()).float()
    torch.testing.assert_close(outs[0], ref, atol=2e-5 * 1536**0.5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="row prefetch mode"):
        kernels.set_row_prefetch(3)


@pytest.mark.parametrize("march", BUILDS)
def test_one_int8_row_gives_each_panel_its_lone_bits_however_the_threads_pair_them(march: str) -> None:
    """One row of int8 panels streams two panels at once, one from each half of a thread's range
    (csrc/lowp_kernels.h int8_row_range), so which panels pair depends on the thread count: every
    panel's sums must be the ones it gets alone, for any split, odd ranges and a partial last panel
    included."""
    ops = backend(f"native:{march}", "int8")
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(13 * 32 - 5, 576, generator=gen) / 24
    b = torch.randn(w.shape[0], generator=gen)
    lin = ops.make_linear(w, b)
    x = torch.randn(1, 576, generator=gen)
    # each panel alone: a weight of its own 32 rows (one panel, nothing to pair it with)
    alone = torch.cat(
        [ops.linear(x, ops.make_linear(w[r : r + 32], b[r : r + 32])) for r in range(0, w.shape[0], 32)],
        dim=1,
    )
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            assert torch.equal(ops.linear(x, lin), alone), f"{threads} threads"
    finally:
        torch.set_num_threads(old)
    ref = F.linear(x.double(), dequantize(lin).double(), b.double()).float()
    torch.testing.assert_close(alone, ref, atol=2e-5 * 576**0.5, rtol=1e-5)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_tied_embedding_rows_read_from_the_lowp_lm_head(kind: str, fmt: str) -> None:
    ops = backend(kind, fmt)
    w = torch.randn(100, 24, generator=torch.Generator().manual_seed(2))
    head = ops.make_linear(w)
    assert ops.can_share_embedding(head)
    ids = torch.tensor([0, 31, 32, 99, 5, 5])
    rows = ops.embedding(ids, head)
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, dequantize(head)[ids], atol=0, rtol=0)


def test_native_kernel_rejects_mismatched_operands() -> None:
    ops = backend("native:native", "int8")
    lin = ops.make_linear(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="scale"):
        ops.kernels.lowp_panel_linear(torch.randn(2, 16), lin.weight, 40, None, None)
    with pytest.raises(RuntimeError, match="K = 17"):
        ops.kernels.lowp_panel_linear(torch.randn(2, 17), lin.weight, 40, lin.scale, None)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def test_host_build_takes_integer_dot_products_where_the_cpu_has_them() -> None:
    """The int8dp path (csrc/gemm_int8dp_cpu.cpp) must really be the one the tests above check on
    a host with AVX512-VNNI and AVX512-VBMI, not silently left out of the build."""
    kernels = native_fixture.native_kernel_or_skip()
    if not {"avx512_vnni", "avx512vbmi"} <= _cpu_flags() or kernels.simd_bits() != 512:
        pytest.skip("this host's build has no AVX512-VNNI/VBMI")
    assert "int8dp" in kernels.lowp_gemm_isa()


@pytest.mark.parametrize("march", BUILDS)
def test_int8_keeps_fp32_activations_through_outliers_and_edge_rows(march: str) -> None:
    """int8 panels with fp32 activations: the int8dp path scales each row to 24-bit integers under
    its largest value, so a row with a 1000x outlier must still meet the fp32 tolerance; an
    all-zero row gives the bias exactly; a non-finite activation gives non-finite outputs; and a
    K past the int32 sums' limit (65,536) still computes (on the FMA path)."""
    kernels = (
        native_fixture.native_kernel_or_skip(march)
        if march != "native"
        else native_fixture.native_kernel_or_skip()
    )
    ops = LowpCpuOps(CPU, torch.float32, kernels, weights="int8")
    gen = torch.Generator().manual_seed(4)
    for out_f, in_f in [(96, 1536), (40, 70_001)]:
        w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
        b = torch.randn(out_f, generator=gen)
        lin = ops.make_linear(w, b)
        deq = dequantize(lin).double()
        for m in (1, 3, 7):
            x = torch.randn(m, in_f, generator=gen)
            x[0, 5] = 1000.0
            x[-1] = 0.0
            y = ops.linear(x, lin)
            ref = F.linear(x.double(), deq, b.double()).float()
            torch.testing.assert_close(y, ref, atol=2e-5 * in_f**0.5, rtol=1e-5)
            torch.testing.assert_close(y[-1], b, atol=0, rtol=0)
        if in_f > 5000:
            continue
        x = torch.randn(2, in_f, generator=gen)
        x[0, 3] = float("inf")
        y = ops.linear(x, lin)
        assert not bool(torch.isfinite(y[0]).any())
        torch.testing.assert_close(
            y[1], F.linear(x[1:].double(), deq, b.double()).float()[0], atol=1e-3, rtol=1e-5
        )


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_packing_in_chunks_is_packing_at_once(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pack_lowp_panels packs PACK_CHUNK_BYTES of rows at a time (to bound load-time memory):
    chunks of two panels, the last one padded, give the bytes one chunk does."""
    from loraserve.layers import quantized_linear as ql

    w = torch.randn(170, 33)  # 6 panels, the last with 10 rows
    whole = ql.pack_lowp_panels(w, None, fmt)
    monkeypatch.setattr(ql, "PACK_CHUNK_BYTES", 2 * ql.PANEL * 33 * 4)
    chunked = ql.pack_lowp_panels(w, None, fmt)
    assert torch.equal(chunked.weight.view(torch.uint8), whole.weight.view(torch.uint8))
    if fmt == "int8":
        assert torch.equal(chunked.scale, whole.scale)
    torch.testing.assert_close(dequantize(chunked), dequantize(whole), rtol=0, atol=0)


@pytest.mark.parametrize("march", BUILDS)
@pytest.mark.parametrize("fmt", ["int8", "bf16"])
@pytest.mark.parametrize("table", [torch.float32, torch.bfloat16])
def test_fused_lora_pass_over_lowp_panels_adds_each_rows_delta(
    march: str, fmt: str, table: torch.dtype
) -> None:
    """lowp_panel_lora_linear (each row's shrink between two panels, its A fetched by the panel
    before; each delta added onto its thread's columns after them): the rows without an adapter
    are lowp_panel_linear's bit for bit, the others that plus their delta on the dequantised
    matrix (three members of odd widths, the first split between two threads' columns, a partial last
    panel, slots of full, partial and zero rank, one slot on several rows). It runs from 20 to 96
    rows where the build computes the panels one by one (the AVX2 build: always), is refused
    elsewhere, and LowpCpuOps.linear_lora takes it exactly there."""
    kernels = (
        native_fixture.native_kernel_or_skip(march)
        if march != "native"
        else native_fixture.native_kernel_or_skip()
    )
    ops = LowpCpuOps(CPU, torch.float32, kernels, weights=fmt)
    g = torch.Generator().manual_seed(7)
    fin, outs, r, slots = 72, (100, 36, 36), 16, 5
    ranks = torch.tensor([16, 5, 0, 16, 9])
    a = (torch.randn(slots, fin, 3 * r, generator=g) / 4).to(table)
    bs = [(torch.randn(slots, r, o, generator=g) / 4).to(table) for o in outs]
    n = sum(outs)
    lin = ops.make_linear(torch.randn(n, fin, generator=g) / fin**0.5, torch.randn(n, generator=g))
    assert lin.layout == f"{fmt}-panel"
    fused = []
    for m in (8, 19, 20, 33, 96, 97):
        x = torch.randn(m, fin, generator=g)
        rows = [i for i in range(m) if i % 4 != 2]
        row_slots = [(3 * i) % slots for i in rows]
        lb = LoraBatch(rows=torch.tensor(rows), row_slots=torch.tensor(row_slots))
        args = (lb.rows, lb.row_slots, a, bs, ranks)
        fuses = kernels.lowp_lora_fuses(m, fin, fmt == "bf16", False)
        assert not fuses or 20 <= m <= 96
        if not fuses:
            assert ops.linear_lora(x, lin, a, bs, lb, ranks) is None  # the caller runs two passes
            with pytest.raises(RuntimeError, match="lowp_lora_fuses"):
                kernels.lowp_panel_lora_linear(x, lin.weight, n, lin.scale, lin.bias, False, *args)
            continue
        fused.append(m)
        got = kernels.lowp_panel_lora_linear(x, lin.weight, n, lin.scale, lin.bias, False, *args)
        assert torch.equal(ops.linear_lora(x, lin, a, bs, lb, ranks), got)
        base = kernels.lowp_panel_linear(x, lin.weight, n, lin.scale, lin.bias, False)
        plain = [i for i in range(m) if i % 4 == 2]
        assert torch.equal(got[plain], base[plain])
        want = x @ dequantize(lin).t() + lin.bias
        for i, s in zip(rows, row_slots, strict=True):
            rs = int(ranks[s])
            want[i] += torch.cat(
                [(x[i] @ a[s, :, j * r : j * r + rs].float()) @ bs[j][s, :rs].float() for j in range(3)]
            )
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    if kernels.simd_bits() == 256:
        assert fused == [20, 33, 96]  # the AVX2 build computes every one of these panel by panel
