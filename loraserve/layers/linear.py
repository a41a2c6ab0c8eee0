"""Dense projections whose weights may be prepacked for the CPU's GEMM library.

Why prepack: on CPU, `F.linear` hands a plain row-major weight to a GEMM that
has to re-block it on every call, and for the skinny inputs of decoding
(1–64 rows) it reaches only part of the memory bandwidth. oneDNN can keep the
weight in its own blocked layout, done once at load: on a 2-core EPYC the
SmolLM-135M projections ran 2.1x faster at 1 row, 1.8x at 32 rows and 1.1x
at 1,024 rows (bench/README.md has the figures). On CUDA, or where oneDNN is
missing or refuses the dtype, weights stay plain and `F.linear` is used: the
choice is made once, at start-up, by a probe that also checks the result.

A packed weight is opaque (no slicing, no reading it back), so everything
that needs the raw matrix — the tied input embedding, adapters' shapes — keeps
its own plain tensor; the packed copy is only ever used through `linear`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# oneDNN picks its blocking from a batch-size hint; every hint >= 32 measured the same
# from 1 to 1,024 rows, while a hint of 1 is 30% slower at 32 rows.
PACK_BATCH_HINT = 64
# oneDNN caches one compiled kernel per (shape, row count) — up to 1,024 of them, each
# with its own buffers. Fed every row count a server sees, RSS grew by GBs; so row
# counts are rounded up to buckets that keep the top 4 bits (at most 1/8 padding, 8
# buckets per doubling, under 100 up to 8,192 rows). Padding rows are nearly free
# where they are relatively many: small batches are memory-bound.
EXACT_ROWS = 15


def row_bucket(m: int) -> int:
    """Rows oneDNN actually computes for `m` rows."""
    if m <= EXACT_ROWS:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


@dataclass
class Linear:
    """y = x @ weight.T + bias, with `weight` either a plain [out, in] tensor or oneDNN-packed."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int
    packed: bool = False


@functools.cache
def _packing_works(dtype: torch.dtype, device_type: str) -> bool:
    """True when oneDNN packing is available here for `dtype` and gives F.linear's answer
    (probed once per process and dtype)."""
    if device_type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=gen)
        b = torch.randn(48, generator=gen)
        x = torch.randn(5, 40, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-4, rtol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return _packing_works(dtype, device.type)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True) -> Linear:
    """Wrap `weight` [out, in] (and `bias`), packing it when `pack` and the platform allows."""
    out_f, in_f = weight.shape
    if pack and packing_supported(weight.dtype, weight.device):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
        return Linear(packed, bias, out_f, in_f, packed=True)
    return Linear(weight, bias, out_f, in_f)


def linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    """x [..., in] -> [..., out]."""
    if not w.packed:
        return F.linear(x, w.weight, w.bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, w.out_features)
    b = row_bucket(m)
    if b != m:
        xp = x2.new_zeros(b, w.in_features)
        xp[:m] = x2
        y = torch.ops.mkldnn._linear_pointwise(xp, w.weight, w.bias, "none", [], "")[:m]
    else:
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), w.weight, w.bias, "none", [], "")
    return y.view(*lead, w.out_features)
