"""Model architectures. One module per family; `load_model` picks by `architectures[0]`."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from loraserve.models.config import ModelConfig
from loraserve.models.llama import LlamaModel

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaModel,
    "MistralForCausalLM": LlamaModel,
    "Qwen2ForCausalLM": LlamaModel,
}


def load_model(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    pack: bool = True,
    kernels: ModuleType | None = None,
) -> LlamaModel:
    """`kernels`: the native CPU module, whose GEMM then takes the dense weights (layers/linear.py)."""
    return ARCHITECTURES[cfg.architecture].from_pretrained(path, cfg, dtype, device, pack, kernels)
