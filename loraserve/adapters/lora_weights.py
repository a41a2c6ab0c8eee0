"""The plain data types of an adapter in memory: `LoraModuleWeights`, `LoraAdapter`, `MedusaHeads`.

Everything upstream (sources, the PEFT and Medusa parsers, merging) produces a
`LoraAdapter`; everything downstream (the engine's slot table, the Medusa
layer) only reads one. This module imports no parser, so parsers, engine and
layers can all depend on it without import cycles. LoRA tensors are kept in
PEFT's orientation so merging code can follow PEFT/LoRAX formulas literally:
A is ``[r, in_features]``, B is ``[out_features, r]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from loraserve.adapters.errors import AdapterError


@dataclass
class LoraModuleWeights:
    """One targeted linear layer: delta(x) = scale * (x @ A.T) @ B.T."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class MedusaHeads:
    """Validated Medusa heads in host memory; the engine moves them with `to()`.

    Tensors are stacked over heads so every head runs in one batched matmul:
    `weight[k, j]` is block `j` of head `k` in `nn.Linear` orientation
    (`y = x @ weight.T + bias`).
    """

    key: str
    num_heads: int
    num_layers: int
    version: int  # as declared in config.json (LoRAX: per-request heads must be >= 2)
    weight: torch.Tensor  # [num_heads, num_layers, H, H]
    bias: torch.Tensor  # [num_heads, num_layers, H]
    proj: torch.Tensor | None = None  # [num_heads, V, H] per-head vocab projection (v1); None: base lm_head
    base_model_name: str | None = None
    config: dict = field(default_factory=dict)  # the raw config.json

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[-1])

    @property
    def uses_base_lm_head(self) -> bool:
        """True for v2-style heads: drafts come from the (LoRA-free) base `lm_head`."""
        return self.proj is None

    @property
    def nbytes(self) -> int:
        extra = self.proj.nbytes if self.proj is not None else 0
        return self.weight.nbytes + self.bias.nbytes + extra

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MedusaHeads:
        """A copy on `device` (and `dtype`), e.g. once when the engine activates the heads."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        return replace(
            self,
            weight=move(self.weight),
            bias=move(self.bias),
            proj=None if self.proj is None else move(self.proj),
        )


@dataclass
class LoraAdapter:
    """A validated adapter held in host memory, ready to copy into a device slot.

    `key` identifies the exact weights (source, id, resolved revision), so two
    requests naming the same adapter share one cache entry and one slot.
    `medusa` holds speculative heads shipped with the adapter; a Medusa-only
    adapter has no LoRA `modules` (rank 0) and must not take a LoRA slot.
    """

    key: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules: dict[tuple[int, str], LoraModuleWeights]  # (layer index, module name, e.g. "q_proj")
    base_model_name: str | None = None
    config: dict = field(default_factory=dict)  # the raw adapter_config.json
    medusa: MedusaHeads | None = None

    def __post_init__(self) -> None:
        if not self.modules and self.medusa is None:
            raise AdapterError("adapter holds neither LoRA weights nor Medusa heads")

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        lora = sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())
        return lora + (self.medusa.nbytes if self.medusa is not None else 0)
