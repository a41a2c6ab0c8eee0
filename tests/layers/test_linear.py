"""Packed projections (oneDNN's layout through `TorchOps`, our panels through `CpuNativeOps`)
against F.linear, across the row counts a server produces."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from loraserve.layers.linear import EXACT_ROWS, PANEL, Linear, pack_panels, packing_supported, row_bucket
from loraserve.layers.ops import TorchOps
from loraserve.layers.ops_cpu import CpuNativeOps
from tests.fixtures.native import BUILDS, panel_kernels_or_skip

CPU = torch.device("cpu")


@dataclass
class Bound:
    """A weight in the layout a backend chose, with the backend that runs it."""

    ops: TorchOps
    lin: Linear

    def __getattr__(self, name: str) -> object:
        return getattr(self.lin, name)


def make_linear(
    w: torch.Tensor, b: torch.Tensor | None = None, pack: bool = True, kernels: ModuleType | None = None
) -> Bound:
    ops = CpuNativeOps(CPU, w.dtype, kernels, pack) if kernels is not None else TorchOps(CPU, w.dtype, pack)
    return Bound(ops, ops.make_linear(w, b))


def linear(x: torch.Tensor, w: Bound) -> torch.Tensor:
    return w.ops.linear(x, w.lin)


needs_packing = pytest.mark.skipif(not packing_supported(torch.float32, CPU), reason="no oneDNN here")


@needs_packing
@pytest.mark.parametrize("rows", [1, 2, 5, 15, 16, 17, 33, 64, 65, 100, 256, 257, 600, 4100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_matches_f_linear(rows: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g)
    b = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(rows, 80, generator=g)
    lin = make_linear(w.clone(), b)
    assert lin.layout == "onednn"
    got = linear(x, lin)
    assert got.shape == (rows, 96) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@needs_packing
def test_packed_keeps_leading_dims_and_handles_no_rows() -> None:
    w = torch.randn(24, 16)
    lin = make_linear(w.clone())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(linear(x, lin), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert linear(torch.zeros(0, 16), lin).shape == (0, 24)


def test_unpacked_is_plain_f_linear() -> None:
    w, x = torch.randn(8, 4), torch.randn(3, 4)
    lin = make_linear(w, pack=False)
    assert not lin.packed and lin.weight is w
    assert torch.equal(linear(x, lin), F.linear(x, w))


def test_row_buckets_are_few_and_cover_every_count() -> None:
    """The bound on oneDNN's kernel cache: every row count maps onto one of a few sizes."""
    counts = range(1, 8193)
    buckets = {row_bucket(m) for m in counts}
    assert len(buckets) < 100
    assert all(m <= row_bucket(m) <= m * 1.125 for m in counts)
    assert all(row_bucket(m) == m for m in range(1, EXACT_ROWS + 1))  # where decoding lives
    assert all(row_bucket(b) == b for b in buckets)


@pytest.fixture(params=BUILDS)
def panel_kernels(request: pytest.FixtureRequest) -> ModuleType:
    """The panel GEMM of each build: AVX-512 (12 x 32 and 6 x 64 register blocks) and AVX2 (6 x 16)."""
    return panel_kernels_or_skip(request.param)


def test_panels_hold_the_weight_columnwise_zero_padded() -> None:
    w = torch.arange(70 * 3, dtype=torch.float32).view(70, 3)
    p = pack_panels(w)
    assert p.shape == (3, 3, PANEL)
    for n in range(70):
        assert torch.equal(p[n // PANEL, :, n % PANEL], w[n])
    assert not p[2, :, 70 - 64 :].any()


# rows: one-row streaming, every register-block height, uneven splits, several row chunks;
# (12 x 32 blocks; 6 x 64 over 96 rows, with leftover rows; AVX2: 2 x 32, 3-6 x 16), outs: whole
# panels in pairs, an odd panel count, a partial last panel (both halves, paired or not; AVX2: 6,
# 8, 17 and 24 columns of 32), less than one panel
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 11, 12, 13, 24, 32, 37, 64, 96, 97, 101, 250])
@pytest.mark.parametrize("out_f,in_f", [(96, 80), (128, 16), (70, 7), (17, 1), (40, 33), (120, 9)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_panel_matches_f_linear(panel_kernels, rows: int, out_f: int, in_f: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 7 + out_f)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if with_bias else None
    x = torch.randn(rows, in_f, generator=g)
    lin = make_linear(w.clone(), b, kernels=panel_kernels)
    assert lin.layout == "panel"
    got = linear(x, lin)
    assert got.shape == (rows, out_f) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_panel_reads_strided_rows_and_keeps_leading_dims(panel_kernels) -> None:
    """Inputs are often column slices of a fused output (q of q|k|v): rows with a stride."""
    w, b = torch.randn(48, 16), torch.randn(48)
    lin = make_linear(w.clone(), b, kernels=panel_kernels)
    wide = torch.randn(13, 40)
    x = wide[:, 8:24]
    assert x.stride() == (40, 1)
    torch.testing.assert_close(linear(x, lin), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(3, 5, 16)
    torch.testing.assert_close(linear(x3, lin), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)
    xt = torch.randn(16, 6).t()  # column-major: copied to rows first
    torch.testing.assert_close(linear(xt, lin), F.linear(xt, w, b), rtol=1e-5, atol=1e-5)


def test_panel_refuses_mismatched_operands(panel_kernels) -> None:
    p = pack_panels(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="columns"):
        panel_kernels.panel_linear(torch.randn(2, 15), p, 40, None)
    with pytest.raises(RuntimeError, match="panels"):
        panel_kernels.panel_linear(torch.randn(2, 16), p, 65, None)
    with pytest.raises(RuntimeError, match="bias"):
        panel_kernels.panel_linear(torch.randn(2, 16), p, 40, torch.randn(39))


def test_without_kernels_or_packing_choices_fall_back() -> None:
    w = torch.randn(8, 4)
    assert make_linear(w, kernels=None).layout in ("onednn", "plain")
    assert make_linear(w, pack=False, kernels=None).layout == "plain"
    assert make_linear(w.double(), kernels=None).layout == "plain"


def test_panel_walks_big_weights_panel_major(panel_kernels) -> None:
    """Weights over the kernel's L3 budget (8 MiB: an lm_head) take the other loop order."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8224, 260, generator=g)  # 8.2 MiB, 257 panels, several row chunks
    x = torch.randn(100, 260, generator=g)
    lin = make_linear(w.clone(), kernels=panel_kernels)
    torch.testing.assert_close(linear(x, lin), F.linear(x, w), rtol=1e-5, atol=1e-4)
