"""A projection with its adapters: the base matmul plus every row's own LoRA delta.

Bound at construction to its layer and group of the LoRA slot table, so the
model's forward reads `y = self.qkv(x, lora_batch)` like a plain transformer,
and nothing in the model knows the table's layout. The table's tensors are
looked up at call time, not captured, because the table re-allocates them
when an adapter of a larger rank first arrives (`LoraTable.ensure_rank`).
"""

from __future__ import annotations

import torch

from loraserve.layers.linear import Linear
from loraserve.layers.lora import LoraBatch, LoraTable
from loraserve.layers.ops import TorchOps


class LoraLinear:
    def __init__(
        self,
        base: Linear,
        ops: TorchOps,
        table: LoraTable | None,
        layer: int,
        group: str,
        members: list[tuple[str, int]],
    ) -> None:
        """members: (module name, output columns) of each projection fused in `base`, in order."""
        self.base, self.ops, self.table, self.layer, self.group = base, ops, table, layer, group
        # the backend's fused base + LoRA pass, where it has one (CpuNativeOps.linear_lora)
        self.fused = getattr(ops, "linear_lora", None)
        self.names = [name for name, _ in members]
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for _, width in members:
            self.bounds.append((start, start + width))
            start += width
        if start != base.out_features:
            raise ValueError(f"{group}: members cover {start} of {base.out_features} output columns")

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def __call__(self, x: torch.Tensor, lb: LoraBatch | None) -> torch.Tensor:
        if lb is None or self.table is None:
            return self.ops.linear(x, self.base)
        t, i = self.table, self.layer
        a, bs = t.a_layers[self.group][i], [t.b_layers[name][i] for name in self.names]
        if self.fused is not None:
            y = self.fused(x, self.base, a, bs, lb, t.slot_rank)
            if y is not None:
                return y
        y = self.ops.linear(x, self.base)
        ys = [y if (s, e) == (0, y.shape[-1]) else y[:, s:e] for s, e in self.bounds]
        self.ops.lora(ys, x, a, bs, lb, t.slot_rank)
        return y
