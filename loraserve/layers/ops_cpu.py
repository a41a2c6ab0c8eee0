"""`CpuNativeOps`: loraserve's own CPU kernels (layers/native_cpu.py) behind the `Ops` seam.

What they buy on the 135M shape (2-core EPYC, fp32, AVX-512 builds; bench/README.md has the
runs, and the AVX2 build's figures):
panel-packed projections 1.6-2x oneDNN at 1 row; the multi-LoRA row kernel
1.3x per decode step with 32 adapters and 2x per prefill over the padded
`bmm`; decode attention reads the paged cache in place instead of gathering
a copy; RMSNorm folds in the residual add; SwiGLU and rotary are one pass
each. Whatever a kernel cannot do (other dtypes, attention with a sliding
window or logit soft-capping) runs `TorchOps`' PyTorch path.

Decode-sized steps with adapters (up to 96 rows) run each projection and its LoRA as one call,
`panel_lora_linear` (`linear_lora`): every row's shrink/expand runs between two weight panels,
each panel fetching the next one into L2 as `panel_linear` does. It used to prefetch the next
rows' A and B as well, so that the adapter stream (~625 MB per step with 32 distinct rank-16
adapters on the 135M shape, more than the base weights) would overlap the FMA-bound panel loop.
On a 2-core Xeon with AMX it never did: at 32 distinct adapters the pass took the base GEMM plus
the LoRA-only pass, and the list cost each panel's k-steps, most of all when the adapters were
in cache. Without it (30 layers of the projections, AVX-512 / AVX2 build): 32 rows on 32
adapters 70.5 -> 66.6 / 91.1 -> 84.5 ms, on one adapter 54.7 -> 41.2 / 75.2 -> 57.1 ms, 8 rows
34.9 -> 29.0 / 45.6 -> 34.4 ms; 64 rows on 32 adapters 111 -> 114 / 145 -> 148 ms. The fused and
the two-pass path now measure the same there (within 1-6 % either way), at 1 thread too (32 rows
on 32 adapters 133.9 -> 119.4 ms against 120.4 two-pass). Engine decode step, 32 requests on 32
adapters: 119.3 -> 111.3 ms (AVX-512 build), 148.5 -> 132.7 ms (AVX2). The list once measured
faster on another host (one Sapphire Rapids core, 1 thread: 131-136 against 148 ms two-pass; a
2-core Zen 5 EPYC: 0.70 of base fused against 0.66 two-pass end to end, bench/kernel_builds.py);
not re-measured there without it. Since session 25, from 20 rows, each panel again fetches the
A and B of the rows that run right after it, but as a few spans walked at the rate those rows
need, spread over the panel's k-steps (csrc/gemm_lora_cpu.cpp `LoraPf`), not a list of lines in
bursts: on a 2-core Zen 4 EPYC, 32 rows on 32 adapters 57.7-59.8 -> 53.9-54.8 ms (AVX-512) and
54.2 -> 49.1 ms (AVX2), one adapter level; the Xeon was not there to measure it on.
`LORASERVE_FUSED_LORA=0` keeps the two separate passes (for comparisons).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from loraserve.layers import attention
from loraserve.layers.attention import AttentionMeta
from loraserve.layers.decode_stack import DecodeLayerSpec, DecodeStack, DecodeTop, single_decode_rows
from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.linear import Linear, pack_panels
from loraserve.layers.lora import LoraBatch
from loraserve.layers.native_cpu import env_on
from loraserve.layers.ops import TorchOps

# `panel_lora_linear` (csrc/gemm_lora_cpu.cpp) takes decode-sized inputs: one chunk of rows, whose
# LoRA rows run between the panels; bigger inputs (prefills) take `panel_linear_lora_rows`
# (csrc/lora_cpu.cpp), the GEMM with each work item's deltas added while it is in cache.
FUSED_LORA_MAX_ROWS = 96
FUSED_LORA_MAX_MEMBERS = 4
ENV_FUSED_LORA = "LORASERVE_FUSED_LORA"  # "0": always the two separate passes (for comparisons)
# "0": the decode stack never runs a step in one parallel region (for comparisons)
ENV_DECODE_REGION = "LORASERVE_DECODE_REGION"
# "0": the region's threads do not split adapter rows; one adds them (for comparisons)
ENV_REGION_LORA_SPLIT = "LORASERVE_REGION_LORA_SPLIT"


class CpuNativeOps(TorchOps):
    name = "cpu-native"

    def __init__(
        self, device: torch.device, dtype: torch.dtype, kernels: ModuleType, pack: bool = True
    ) -> None:
        super().__init__(device, dtype, pack)
        self.kernels = kernels
        self.panels = bool(kernels.panel_gemm_available())  # an AVX-512 or AVX2+FMA build
        self.fused_lora = self.panels and env_on(ENV_FUSED_LORA)

    def decode_reads(self, cache_dtype: torch.dtype) -> bool:
        """The cache dtypes the decode attention kernel reads (fp16 takes PyTorch's path).

        No probe of the library is needed: it is named after a hash of its sources
        (layers/native_cpu.py), so the loaded one always has every kernel this code calls."""
        return cache_dtype in (torch.float32, torch.bfloat16)

    def make_linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        if self.pack and self.panels and weight.dtype == torch.float32 and weight.device.type == "cpu":
            b = bias.contiguous() if bias is not None else None
            out_f, in_f = weight.shape
            return Linear(pack_panels(weight), b, out_f, in_f, layout="panel")
        return super().make_linear(weight, bias)

    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        if w.layout != "panel":
            return super().linear(x, w)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, w.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return self.kernels.panel_linear(x2, w.weight, w.out_features, w.bias).view(*lead, w.out_features)

    def embedding(self, ids: torch.Tensor, table: torch.Tensor | Linear) -> torch.Tensor:
        if isinstance(table, Linear) and table.layout == "panel":
            return self.kernels.panel_embedding(table.weight, ids, table.in_features)
        return super().embedding(ids, table)

    def can_share_embedding(self, lm_head: Linear) -> bool:
        return lm_head.layout in ("plain", "panel")

    def lora_batch(self, token_slots: list[tuple[int, int, int]]) -> LoraBatch | None:
        """Every adapter row goes to the row kernel, one call per group, grouped by sequence."""
        if not token_slots:
            return None
        rows = [r for s, e, _ in token_slots for r in range(s, e)]
        slots = [slot for s, e, slot in token_slots for _ in range(s, e)]
        return LoraBatch(
            rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            row_slots=torch.tensor(slots, dtype=torch.long, device=self.device),
        )

    def lora(
        self,
        ys: Sequence[torch.Tensor],
        x: torch.Tensor,
        a: torch.Tensor,
        bs: Sequence[torch.Tensor],
        lb: LoraBatch,
        slot_rank: torch.Tensor | None = None,
    ) -> None:
        if lb.rows is None:  # a batch laid out for the bmm path
            return super().lora(ys, x, a, bs, lb, slot_rank)
        self.kernels.lora_rows(x, lb.rows, lb.row_slots, a, list(bs), list(ys), slot_rank)

    def fuses_rows(self, x: torch.Tensor, lb: LoraBatch) -> bool:
        """Whether x and the batch's layout suit a fused base + LoRA pass at all (each backend's
        `linear_lora` then asks what its panels and table need)."""
        return (
            self.fused_lora
            and lb.rows is not None
            and x.dim() == 2
            and x.stride(-1) == 1
            and x.dtype == torch.float32
        )

    def linear_lora(
        self,
        x: torch.Tensor,
        w: Linear,
        a: torch.Tensor,
        bs: Sequence[torch.Tensor],
        lb: LoraBatch,
        slot_rank: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """`linear(x, w)` with every row's LoRA delta added (the members' outputs side by side),
        in one call; None where it does not apply (then the caller runs `linear` and `lora`).
        Decode sizes stream each row's adapter between two base panels (fp32 tables); prefill
        sizes add each work item's deltas onto its columns while they are in cache (fp32 or
        bf16 tables; csrc/lora_cpu.cpp `panel_linear_lora_rows` says why)."""
        if w.layout != "panel" or not self.fuses_rows(x, lb):
            return None
        args = (x, w.weight, w.out_features, w.bias, lb.rows, lb.row_slots, a, list(bs), slot_rank)
        if x.shape[0] > FUSED_LORA_MAX_ROWS:
            if a.dtype not in (torch.float32, torch.bfloat16):
                return None
            return self.kernels.panel_linear_lora_rows(*args)
        if a.dtype != torch.float32 or not 0 < len(bs) <= FUSED_LORA_MAX_MEMBERS:
            return None  # the decode pass reads fp32 tables, up to 4 members
        return self.kernels.panel_lora_linear(*args)

    def paged_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        if window is not None or softcap is not None or not self.decode_reads(k_cache.dtype):
            # the decode kernel does neither, nor an fp16 cache
            return super().paged_attention(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
        return attention.paged_attention(
            q,
            k,
            v,
            k_cache,
            v_cache,
            meta,
            scale,
            decode=self.kernels.paged_decode_attention,
            write=self.kernels.write_kv,
            prefill=self.kernels.prefill_attention if _kernel_layout(q, k, v) else None,
        )

    def rope_decode_attention(
        self,
        qkv: torch.Tensor,
        n_heads: int,
        n_kv: int,
        fb: ForwardBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        scale: float,
    ) -> torch.Tensor | None:
        """A decode step's attention of one layer in one native call (rotary, cache write, decode
        attention over the fused q|k|v output): [B, Hq * D], or None where the step is not only
        single-token rows (prefills, drafts) or the cache is one the kernel does not read. The
        caller (a model's attention without per-head norms, windows or soft-capping) then takes
        the separate ops."""
        meta = fb.attn
        k_cache, v_cache = kv_cache
        if (
            not single_decode_rows(fb, qkv.shape[0])
            or qkv.dtype != torch.float32
            or not self.decode_reads(k_cache.dtype)
        ):
            return None
        grp = meta.paged[0]
        return self.kernels.rope_decode_attention(
            qkv,
            n_heads,
            n_kv,
            fb.cos,
            fb.sin,
            k_cache,
            v_cache,
            meta.slot_mapping,
            grp.block_tables,
            grp.ctx_lens,
            scale,
        )

    # layouts `decode_stack` runs, each with the kernel it takes (csrc/decode_stack_cpu.cpp)
    stack_layouts: tuple[str, ...] = ("panel",)
    bf16_activations = False

    def decode_stack(
        self, layers: Sequence[DecodeLayerSpec], eps: float, top: DecodeTop | None = None
    ) -> DecodeStack | None:
        if self.dtype != torch.float32 or not layers:
            return None
        for spec in layers:
            if any(p.base.layout not in self.stack_layouts for p in spec.projections):
                return None
            if not self.decode_reads(spec.kv_cache[0].dtype):
                return None
        # the fused base + LoRA pass on the limits `linear_lora` applies
        fused_rows = FUSED_LORA_MAX_ROWS if self.fused_lora else 0
        native = self.kernels.DecodeStack(eps, self.bf16_activations, fused_rows, FUSED_LORA_MAX_MEMBERS)
        native.set_region(env_on(ENV_DECODE_REGION))
        native.set_lora_split(env_on(ENV_REGION_LORA_SPLIT))
        for spec in layers:
            args: list[object] = []
            for p in spec.projections:
                args += [p.base.weight, p.base.out_features, p.base.scale, p.base.bias]
            native.add_layer(
                *args,
                spec.post_norm,
                spec.next_norm,
                *spec.kv_cache,
                spec.n_heads,
                spec.n_kv_heads,
                spec.scale,
            )
        return DecodeStack(native, layers, None if top is None else self._decode_head(top, eps))

    def _decode_head(self, top: DecodeTop, eps: float) -> object | None:
        """The native `DecodeHead` (csrc/decode_steps.h) with the embedding and lm_head calls that
        `embedding` and `linear` make for these layouts; None where the lm_head is not one the
        stack reads, or a packed embedding is not the lm_head's own panels."""
        lm, embed = top.lm_head, top.embed
        if lm.layout not in self.stack_layouts or (isinstance(embed, Linear) and embed is not lm):
            return None
        packed = isinstance(embed, Linear)
        return self.kernels.DecodeHead(
            lm.weight if packed else embed,
            lm.scale if packed else None,
            packed,
            lm.in_features,
            self.dtype,
            top.in_norm,
            eps,
            top.rotary.cos,
            top.rotary.sin,
            lm.weight,
            lm.out_features,
            lm.scale,
            lm.bias,
            lm.layout != "panel",  # bf16 / int8 panels: lowp_panel_linear
            self.bf16_activations,
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Updates `x` in place (the residual stream, which the caller owns)."""
        return x, self.kernels.add_rms_norm_(x, delta, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor, inter: int) -> torch.Tensor:
        return self.kernels.silu_mul(gate_up)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.kernels.rotary(x, cos, sin)

    def argmax_logsumexp(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (
            scores.dtype != torch.float32
            or scores.dim() != 2
            or scores.stride(-1) != 1
            or scores.shape[1] == 0
        ):
            return super().argmax_logsumexp(scores)
        return self.kernels.argmax_logsumexp(scores)

    def draw(self, scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The native draw (csrc/logits_cpu.cpp `draw_rows`): the one a decode burst draws with,
        without torch's [B, V] softmax, cumsum and search (sums in double, masked tokens at zero
        mass, the same first-index-past-the-target rule)."""
        if (
            scores.dtype != torch.float32
            or scores.dim() != 2
            or scores.stride(-1) != 1
            or scores.shape[1] == 0
        ):
            return super().draw(scores, u)
        return self.kernels.draw_rows(scores, u.float())


def _kernel_layout(*xs: torch.Tensor) -> bool:
    """fp32 [T, H, D] with contiguous heads (rows any stride): what the native attention kernels read."""
    return all(x.dtype == torch.float32 and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] for x in xs)
