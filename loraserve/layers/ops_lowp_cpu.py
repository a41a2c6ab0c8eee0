"""`LowpCpuOps`: the native CPU backend with bf16 or int8 weights (`--dtype bfloat16`,
`--quantize int8`) or a LoRA table in another dtype than the activations (`--adapter-dtype`).

Projections run `lowp_panel_linear` (csrc/gemm_lowp_cpu.cpp) over panels packed once at load
(layers/quantized_linear.py): at decode sizes the weights are converted to fp32 in registers;
from AMX_MIN_ROWS (bf16) / AMX_MIN_ROWS_INT8 (int8) rows on AMX CPUs they run as bf16 tiles, and
on AVX512_BF16 CPUs bf16 panels (and int8 ones of a `--dtype bfloat16` model) as vdpbf16ps from
AMX_MIN_ROWS (quantized_linear.py says what that does to the activations). Outputs stay fp32, so every other
native kernel (attention, norms, LoRA, rotary) runs unchanged.
The native LoRA kernel reads an fp32 or a bf16 slot table (bf16 widened to fp32 in registers,
fp32 sums). Decode steps of many rows run each row's LoRA between the panels
(`lowp_panel_lora_linear`, csrc/gemm_lowp_lora_cpu.cpp) where the build computes them panel by
panel (`lowp_lora_fuses`: AVX2 machines, AVX-512 ones without VNNI), as the fp32 panels do.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from loraserve.layers.linear import Linear
from loraserve.layers.lora import LoraBatch
from loraserve.layers.ops import TorchOps
from loraserve.layers.ops_cpu import FUSED_LORA_MAX_MEMBERS, CpuNativeOps
from loraserve.layers.quantized_linear import LOWP_PANELS, pack_lowp_panels


class LowpCpuOps(CpuNativeOps):
    name = "cpu-native-lowp"
    stack_layouts = ("panel", *LOWP_PANELS)

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        kernels: ModuleType,
        pack: bool = True,
        weights: str = "plain",
        adapter_dtype: torch.dtype | None = None,
        bf16_activations: bool = False,
    ) -> None:
        super().__init__(device, dtype, kernels, pack)
        self.weights, self.adapter_dtype = weights, adapter_dtype or dtype
        # int8 panels of a bf16 model (`--dtype bfloat16 --quantize int8`) multiply bf16-rounded
        # activations from as many rows as bf16 panels do (vdpbf16ps or AMX: twice the fp32 FMA's
        # multiply-adds where prefill and many-row decode are compute-bound); fp32 otherwise
        self.bf16_activations = bf16_activations
        # the native LoRA kernel reads fp32 and bf16 tables (bf16 widened in registers); a table
        # in any other dtype takes PyTorch's layout
        self.native_lora = self.adapter_dtype in (dtype, torch.bfloat16)

    def make_linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        if self.weights == "plain":
            return super().make_linear(weight, bias)
        if self.pack and weight.device.type == "cpu":
            return pack_lowp_panels(weight, bias, self.weights)
        return TorchOps.make_linear(self, weight, bias)  # never CpuNativeOps' fp32 panels

    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        if w.layout not in LOWP_PANELS:
            return super().linear(x, w)
        if x.dim() == 2 and x.stride(-1) == 1:  # every projection of a step: no reshape, no view
            return self.kernels.lowp_panel_linear(
                x, w.weight, w.out_features, w.scale, w.bias, self.bf16_activations
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, w.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = self.kernels.lowp_panel_linear(
            x2, w.weight, w.out_features, w.scale, w.bias, self.bf16_activations
        )
        return y.view(*lead, w.out_features)

    def linear_lora(
        self,
        x: torch.Tensor,
        w: Linear,
        a: torch.Tensor,
        bs: Sequence[torch.Tensor],
        lb: LoraBatch,
        slot_rank: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """bf16 / int8 panels: `linear(x, w)` with every row's LoRA delta, each row's adapter
        fetched and run between two panels, where the kernel says the rows take that pass
        (`lowp_lora_fuses`, the decode stack asks the same); None elsewhere (the caller then
        runs `linear` and `lora`)."""
        if w.layout not in LOWP_PANELS:
            return super().linear_lora(x, w, a, bs, lb, slot_rank)
        if (
            not self.fuses_rows(x, lb)
            or a.dtype not in (torch.float32, torch.bfloat16)
            or not 0 < len(bs) <= FUSED_LORA_MAX_MEMBERS
            or not self.kernels.lowp_lora_fuses(
                x.shape[0], x.shape[1], w.weight.dtype == torch.bfloat16, self.bf16_activations
            )
        ):
            return None
        return self.kernels.lowp_panel_lora_linear(
            x,
            w.weight,
            w.out_features,
            w.scale,
            w.bias,
            self.bf16_activations,
            lb.rows,
            lb.row_slots,
            a,
            list(bs),
            slot_rank,
        )

    def embedding(self, ids: torch.Tensor, table: torch.Tensor | Linear) -> torch.Tensor:
        if isinstance(table, Linear) and table.layout in LOWP_PANELS:
            return self.kernels.panel_embedding(table.weight, ids, table.in_features, table.scale)
        return super().embedding(ids, table)

    def can_share_embedding(self, lm_head: Linear) -> bool:
        return lm_head.layout in LOWP_PANELS or super().can_share_embedding(lm_head)

    def lora_batch(self, token_slots: list[tuple[int, int, int]]) -> LoraBatch | None:
        if not self.native_lora:
            return TorchOps.lora_batch(self, token_slots)
        return super().lora_batch(token_slots)
