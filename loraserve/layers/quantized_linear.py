"""Low-precision dense weights: bf16, and int8 weight-only with per-output-channel scales.

What the model is, whatever runs it: a bf16 weight is the checkpoint's matrix rounded to bf16;
an int8 weight is `q * scale[:, None]` with `scale = max|row| / 127` and `q = round(row / scale)`
(symmetric, one fp32 scale per output channel, quantised once at load). Activations, sums,
norms, the KV cache and the logits stay fp32 on CPU (`layers/precision.py` says why), so the
reference (`TorchOps`: `F.linear` on the matrix converted per call) and the native kernel
(`csrc/gemm_lowp_cpu.cpp`: converted in registers) compute the same numbers up to fp32
summation order — except on AMX or AVX512_BF16 CPUs: bf16 batches of `AMX_MIN_ROWS` rows or
more round the activations to bf16 for the tile multiplies or vdpbf16ps (as oneDNN and
transformers do), as do int8 batches of a model served `--dtype bfloat16 --quantize int8` (int8
weights are exact in bf16, so only the activations round, and a column's scale multiplies its
fp32 sum); int8 batches served with fp32 activations (the default) of `AMX_MIN_ROWS_INT8` rows or
more on AMX split them into two bf16 parts, x = hi + lo, exact to 2^-16 of each value, within
the int8 oracle's tolerance; and int8 panels with fp32 activations on AVX512-VNNI + VBMI CPUs
(`csrc/gemm_int8dp_cpu.cpp`, any row count without AMX) scale each activation row to 24-bit
integers, within 2^-24 of its largest value, for integer dot products.

Layouts, each read only by the backend that made it (layers/linear.py's `Linear.layout`):
- "bf16" [out, in] bf16 and "int8" [out, in] int8 + `scale` [out]: plain, for `TorchOps`;
- "bf16-panel" [ceil(out/32), ceil(in/2), 32, 2] and "int8-panel" [ceil(out/32), in, 32] +
  `scale` [ceil(out/32) * 32]: 32-column panels like the fp32 ones (layers/linear.py), for the
  native kernel. bf16 keeps each column's two k-steps side by side in one 32-bit lane, so a
  shift or a mask turns a loaded register into fp32 values (vdpbf16ps reads the same layout).

Why our kernel and not oneDNN's bf16 GEMM (`F.linear` on bf16 tensors, the activations rounded
per call): per projection of the 135M shape, 1 thread pinned to one core of a 2-core Sapphire
Rapids VM (avx512_bf16, AMX), the other core busy with another session, best of up to 30 calls
cycling 8 copies of the weights so they come from L3 (`python -m bench.lowp --kernels`), us per
call, before -> after this revision of csrc/gemm_lowp_cpu.cpp:

| rows | gate_up 3072x576: oneDNN bf16 | ours bf16 | ours int8 | lm_head 49152x576: oneDNN | ours bf16 | ours int8 |
|---|---|---|---|---|---|---|
| 1 | 269 | 122 -> 125 | 70 -> 63 | 4,510 | 1,971 -> 1,942 | 1,037 -> 979 |
| 4 | 293 | 138 -> 145 | 126 -> 121 | 4,848 | 2,435 -> 2,484 | 1,927 -> 1,895 |
| 8 | 297 | 148 -> 151 (AMX) | 214 -> 172 (AMX) | 4,747 | 2,309 -> 2,275 | 3,523 -> 2,476 |
| 32 | 349 | 227 -> 187 | 790 -> 305 | 7,266 | 3,543 -> 3,175 | 13,936 -> 5,167 |
| 128 | 680 | 700 -> 546 | 3,271 -> 863 | | | |

What changed: AMX runs 2 x 2 tiles (32 rows x 32 columns: four tile multiplies per four tile
loads, against two per three) over chunks of rows whose bf16 copy stays in L2; int8 takes AMX
from `AMX_MIN_ROWS_INT8` rows (before: the FMA kernel at every size, converting each weight
once per 12 rows); the register blocks no longer spill (one broadcast live at a time); and
the 1-row stream prefetches 4 KB ahead. At one row the weights come from DRAM in a real
decode step (the model is 135-270 MB): all 121 projections of a token, kernel calls only
(batch-1 read bandwidth of this box: 12.7 GB/s by `torch.sum`): int8 14.2 -> 9.3-10.4 ms
(9.5 -> 13-14.5 GB/s), bf16 23.7 -> 21.1 ms (11.3 -> 12.8 GB/s).

End to end on the real SmolLM2-135M-Instruct (`python -m bench.lowp --model
bench/.cache/llamacpp/hf-base --rounds 2`, same box, 1 thread; llama.cpp: `llama-bench -t 1
-p 128 -n 64 -r 3` on the F32 / BF16 / Q8_0 GGUFs just before and after ours, Q8_0 with
`--repack 0`: its AMX repacking dies of SIGILL on this VM), before -> after:

| weights | batch-1 decode tok/s | llama.cpp tg64 | 128-token prompt ms (tok/s) | llama.cpp pp128 tok/s | 32 requests tok/s |
|---|---|---|---|---|---|
| fp32 | 23.0 -> 22.3 (not this file) | 21.6-21.7 | 80 -> 86 | 397-398 | 187 -> 177 |
| bf16 | 34.3 -> 40.1 (1.24x) | 31.8-32.4 | 37 -> 36 (3,560; 10.6x) | 331-334 | 374 -> 377 |
| int8 | 50.5 -> 63.6 (1.39x) | 44.8-45.8 | 51 -> 30 (4,270; 12x) | 350-351 | 231 -> 376 |

Of the weight-read roofline (14.0 GB/s by `torch.sum` in that run; 12.3-14.0 over the day):
bf16 77%, int8 61%.
A batch-1 int8 step (16.6 ms in a profile of the same run) is 12.2 ms of projections, 1.2 ms
of attention, 0.3 ms of other kernels and 2.8 ms of Python and framework work outside the
kernels; at 32 requests (73.6 ms a step) attention (29 ms) is as long as the projections.
One copy of the weights serves both the FMA and the AMX paths (oneDNN would need a second,
opaque one). vdpbf16ps alone (avx512_bf16 without AMX) is not used: the FMA kernel serves those
CPUs, and without AMX many rows convert each panel once into an fp32 scratch copy for an fp32
register-blocked kernel.

The AVX2 build's int8 panels are the exception since session 30: from 4 rows they run blocks of
up to 6 rows over half a panel, converted in registers at every row count, so each converted
weight register serves up to 6 FMAs (the 3-row blocks over a whole panel had spilled a register
in the loop, and served 3). 2-core Zen 4 EPYC, AVX2 build, `python -m bench.lowp --kernels`, us
per call, int8, before -> after: gate_up 3072x576 4 / 8 / 32 rows 91 / 257 / 580 -> 77 / 150 /
526, down 576x1536 46 / 130 / 283 -> 39-42 / 75-78 / 263; engine decode of 8 requests (SmolLM2,
2 threads, in-process, alternated) 278-305 -> 410-441 tok/s, 4 requests 317-396 -> 389-410.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve.host_allocator import zeros_on_huge_pages
from loraserve.layers.linear import PANEL, Linear

INT8_MAX = 127.0
LOWP_PLAIN = ("bf16", "int8")  # TorchOps' layouts
LOWP_PANELS = ("bf16-panel", "int8-panel")  # the native kernel's
PACK_CHUNK_BYTES = 32 << 20  # fp32 rows packed at a time (pack_lowp_panels)
# bf16 panels with this many rows or more run AMX where the CPU has it (kAmxMinRows in
# csrc/lowp_panel.h; csrc/gemm_amx_cpu.cpp), with the activations rounded to bf16
AMX_MIN_ROWS = 8
# int8 panels from this many rows (kAmxMinRowsInt8): converted to bf16 (exactly) for the tiles,
# the activations split in two bf16 parts (hi + lo), so they keep 16 bits of mantissa
AMX_MIN_ROWS_INT8 = 6


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q [out, in] int8, scale [out] fp32), weight ≈ q * scale.

    An all-zero row gets scale 1 (its q is all zero either way), so nothing divides by zero."""
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize(w: Linear) -> torch.Tensor:
    """The fp32 [out, in] matrix a low-precision `Linear` computes with (the oracle's weights)."""
    if w.layout in ("bf16", "int8"):
        plain = w.weight.float()
        return plain * w.scale[:, None] if w.scale is not None else plain
    rows = panel_rows_lowp(w, torch.arange(w.out_features))
    return rows


def make_plain(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> Linear:
    """`TorchOps`' layouts: the matrix as it will be computed with, unpacked."""
    out_f, in_f = weight.shape
    if fmt == "int8":
        q, scale = quantize_int8(weight)
        return Linear(q, bias, out_f, in_f, layout="int8", scale=scale)
    return Linear(weight.to(torch.bfloat16).contiguous(), bias, out_f, in_f, layout="bf16")


def plain_linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    """Reference math for "bf16"/"int8": the matrix converted to x's dtype for this call (a
    transient copy: this is the fallback, the native kernel never materialises it)."""
    if w.layout == "int8":
        y = F.linear(x, w.weight.to(x.dtype)) * w.scale.to(x.dtype)
        return y + w.bias if w.bias is not None else y
    return F.linear(x, w.weight.to(x.dtype), w.bias)


def pack_lowp_panels(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> Linear:
    """The native kernel's layouts ("bf16-panel" / "int8-panel") of `weight` [out, in].

    Packed PACK_CHUNK_BYTES of rows at a time: padding, rounding and quantising a whole matrix at
    once took ~3 fp32 copies of it beside the loaded one (a ~1B model's 400 MB lm_head: 1.2 GB of
    temporaries at load); a row's values do not depend on the others, so the result is the same."""
    out_f, in_f = weight.shape
    p = -(-out_f // PANEL)
    b = bias.float().contiguous() if bias is not None else None
    step = max(1, PACK_CHUNK_BYTES // (PANEL * in_f * 4))  # panels a chunk
    if fmt == "int8":
        packed = zeros_on_huge_pages((p, in_f, PANEL), torch.int8, weight.device, pooled=True)
        scale = torch.ones(p * PANEL, dtype=torch.float32, device=weight.device)
        for p0 in range(0, p, step):
            cols = _padded_rows(weight, p0, min(p, p0 + step))
            q, s = quantize_int8(cols)
            n = cols.shape[0] // PANEL
            scale[p0 * PANEL : (p0 + n) * PANEL] = s
            packed[p0 : p0 + n].copy_(q.view(n, PANEL, in_f).transpose(1, 2))
        return Linear(packed, b, out_f, in_f, layout="int8-panel", scale=scale)
    k2 = -(-in_f // 2)
    packed = zeros_on_huge_pages((p, k2, PANEL, 2), torch.bfloat16, weight.device, pooled=True)
    for p0 in range(0, p, step):
        cols = _padded_rows(weight, p0, min(p, p0 + step))
        n = cols.shape[0] // PANEL
        src = torch.zeros(n * PANEL, 2 * k2, dtype=torch.bfloat16, device=weight.device)
        src[:, :in_f] = cols.to(torch.bfloat16)
        # [n*32, 2*k2] -> [n, 32, k2, 2] -> [n, k2, 32, 2]
        packed[p0 : p0 + n].copy_(src.view(n, PANEL, k2, 2).permute(0, 2, 1, 3))
    return Linear(packed, b, out_f, in_f, layout="bf16-panel")


def _padded_rows(weight: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
    """Rows of panels p0..p1 of `weight`, zero rows past its end: a view where none are needed."""
    r0, r1 = p0 * PANEL, p1 * PANEL
    if r1 <= weight.shape[0]:
        return weight[r0:r1]
    cols = torch.zeros(r1 - r0, weight.shape[1], dtype=weight.dtype, device=weight.device)
    cols[: weight.shape[0] - r0] = weight[r0:]
    return cols


def panel_rows_lowp(w: Linear, idx: torch.Tensor) -> torch.Tensor:
    """fp32 rows `idx` of the matrix a lowp panel `Linear` holds: a tied input embedding reads
    them out of the packed lm_head (the same values the lm_head computes with)."""
    p, c = idx // PANEL, idx % PANEL
    if w.layout == "int8-panel":
        return w.weight[p, :, c].float() * w.scale[idx].unsqueeze(-1)
    rows = w.weight[p, :, c, :]  # [..., k2, 2]
    return rows.reshape(*rows.shape[:-2], -1)[..., : w.in_features].float()


def plain_rows(w: Linear, idx: torch.Tensor) -> torch.Tensor:
    """fp32 rows `idx` of a plain "bf16"/"int8" `Linear` (a tied embedding under `TorchOps`)."""
    rows = w.weight[idx].float()
    return rows * w.scale[idx].unsqueeze(-1) if w.scale is not None else rows
