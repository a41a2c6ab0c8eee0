"""Packed (oneDNN) projections against F.linear, across the row counts a server produces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraserve.layers.linear import EXACT_ROWS, linear, make_linear, packing_supported, row_bucket

CPU = torch.device("cpu")
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
    assert lin.packed
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
