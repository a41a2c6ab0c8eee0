"""Shared tiny model + real PEFT adapters for the merge and export tests.

The oracle side reads the adapters' safetensors files directly (not through
our parser), so a parsing bug cannot hide a merging bug.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.fixtures.tiny_models import make_peft_adapter, make_tiny_model

RANK = 8
# Partly overlapping targets and different alphas, so union and first-config scale both matter.
ADAPTER_SPECS: dict[str, dict] = {
    "a1": dict(target_modules=("q_proj", "v_proj"), seed=1, lora_alpha=16),
    "a2": dict(target_modules=("q_proj", "k_proj", "o_proj"), seed=2, lora_alpha=32),
    "a3": dict(target_modules=("v_proj", "down_proj", "q_proj"), seed=3, lora_alpha=8),
}

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def build_assets(root: Path) -> tuple[Path, dict[str, Path]]:
    model_dir = make_tiny_model(root / "base", "llama", seed=0)
    adapters = {
        name: make_peft_adapter(model_dir, root / name, r=RANK, **kw) for name, kw in ADAPTER_SPECS.items()
    }
    adapters["r4"] = make_peft_adapter(model_dir, root / "r4", r=4, target_modules=("q_proj",), seed=4)
    return model_dir, adapters


def raw_lora_tensors(adapter_dir: Path) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """{(layer, module): {"A": tensor, "B": tensor}} straight from the PEFT file."""
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        m = _KEY.search(name)
        assert m is not None, name
        out.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t.float()
    return out
