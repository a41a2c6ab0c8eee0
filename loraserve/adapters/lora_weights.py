"""The in-memory form of a LoRA adapter that the engine consumes.

Everything upstream (sources, PEFT parsing, merging) produces a `LoraAdapter`;
everything downstream (the device slot table) only reads one. Tensors are
kept in PEFT's orientation so merging code can follow PEFT/LoRAX formulas
literally: A is ``[r, in_features]``, B is ``[out_features, r]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loraserve.adapters.errors import AdapterError

if TYPE_CHECKING:  # medusa_format imports this module
    from loraserve.adapters.medusa_format import MedusaHeads

LORA_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


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
    modules: dict[tuple[int, str], LoraModuleWeights]  # (layer index, module name)
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
