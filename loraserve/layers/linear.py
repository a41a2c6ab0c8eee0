"""Dense projections whose weights may be prepacked for a CPU GEMM.

Why prepack: on CPU, `F.linear` hands a plain row-major weight to a GEMM that
has to re-block it on every call, and for the skinny inputs of decoding
(1-64 rows) it reaches only part of the memory bandwidth. Two packed layouts,
chosen once at start-up, best first:

- **panels** (`csrc/gemm_cpu.cpp`, native kernels built with AVX-512): the
  weight as 32-column panels that one row streams at memory speed and 12 rows
  share in registers. On a 2-core EPYC against oneDNN's packed weights: 1.6-2x
  per projection at 1 row, 1.2-1.5x at 32 rows, within ~5% at 4,096 rows.
  A panel tensor is plain memory with a fixed shape, so it needs no per-row
  -count kernel cache.
- **oneDNN** (`torch.ops.mkldnn`): against `F.linear`, 2.1x at 1 row, 1.8x at
  32 rows, 1.1x at 1,024 rows. Its packed weight is opaque, and it compiles one
  kernel per (shape, row count), so row counts are bucketed (`row_bucket`).

On CUDA, or where neither is available, weights stay plain and `F.linear` is
used. Anything that needs the raw matrix keeps its own plain tensor, except a
tied input embedding, which reads its rows out of the panels (`panel_rows`, and the native
kernel `panel_embedding` that returns the same values);
oneDNN's opaque copy is only ever used through `linear`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.host_allocator import zeros_on_huge_pages

# oneDNN picks its blocking from a batch-size hint; every hint >= 32 measured the same
# from 1 to 1,024 rows, while a hint of 1 is 30% slower at 32 rows.
PACK_BATCH_HINT = 64
# oneDNN caches one compiled kernel per (shape, row count) — up to 1,024 of them, each
# with its own buffers. Fed every row count a server sees, RSS grew by GBs; so row
# counts are rounded up to buckets that keep the top 4 bits (at most 1/8 padding, 8
# buckets per doubling, under 100 up to 8,192 rows). Padding rows are nearly free
# where they are relatively many: small batches are memory-bound.
EXACT_ROWS = 15
PANEL = 32  # output columns per panel (csrc/gemm_cpu.cpp)


def row_bucket(m: int) -> int:
    """Rows oneDNN actually computes for `m` rows."""
    if m <= EXACT_ROWS:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


@dataclass
class Linear:
    """y = x @ weight.T + bias; `layout` says what `weight` holds: "plain" [out, in],
    "onednn" (opaque packed) or "panel" ([ceil(out / 32), in, 32]); low-precision ones ("bf16",
    "int8", "bf16-panel", "int8-panel", layers/quantized_linear.py) also carry `scale`, the int8
    weights' per-output-channel fp32 scales. Only the `Ops` backend that made a layout runs it
    (layers/ops.py)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int
    layout: str = "plain"
    scale: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.layout != "plain"


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


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [ceil(out / 32), in, 32], zero-padded columns, on huge pages: a decode
    step streams every panel once, so TLB misses would be paid on every 4 KiB otherwise."""
    out_f, in_f = weight.shape
    p = -(-out_f // PANEL)
    packed = zeros_on_huge_pages((p, in_f, PANEL), weight.dtype, weight.device, pooled=True)
    full = out_f // PANEL
    if full:
        packed[:full].copy_(weight[: full * PANEL].view(full, PANEL, in_f).transpose(1, 2))
    if out_f > full * PANEL:
        packed[full, :, : out_f - full * PANEL].copy_(weight[full * PANEL :].t())
    return packed


def panel_rows(w: Linear, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of the [out, in] matrix that `w` holds as panels (column idx % 32 of panel
    idx // 32): a tied input embedding reads its rows from the packed lm_head, so the
    vocabulary matrix, a small model's biggest tensor, is not kept twice."""
    return w.weight[idx // PANEL, :, idx % PANEL]


def pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's opaque packed copy of `weight` [out, in] (see `packing_supported`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)


def onednn_linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    """x [..., in] -> [..., out] through oneDNN, rows padded up to their `row_bucket`."""
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
