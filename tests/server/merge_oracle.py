"""Independent expectations for `merged_adapters`: PEFT's merge utilities and transformers+peft.

The expected merge reads the adapters' safetensors directly and runs
`peft.utils.merge_utils` on each side (A, B) with the raw weights, exactly as
LoRAX does; the result is written as a plain PEFT directory carrying the first
adapter's config, so the server can serve it as an ordinary `adapter_id` and
PEFT can load it too. Nothing here goes through loraserve's merge code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft.utils import merge_utils
from safetensors.torch import save_file

from tests.adapters.merge_fixtures import raw_lora_tensors

_MLP = ("gate_proj", "up_proj", "down_proj")
_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft_key(layer: int, module: str, side: str) -> str:
    block = "mlp" if module in _MLP else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{side}.weight"


def _merge_side(tensors: list[torch.Tensor], weights: torch.Tensor, strategy: str, density: float, sign: str):
    if strategy == "linear":
        return merge_utils.task_arithmetic(tensors, weights)
    if strategy == "ties":
        return merge_utils.ties(tensors, weights, density, sign)
    raise ValueError(f"no deterministic oracle for {strategy}")


def write_oracle_merge(
    adapter_dirs: list[Path],
    weights: list[float],
    out: Path,
    strategy: str = "linear",
    density: float = 1.0,
    sign: str = "total",
) -> Path:
    """The LoRAX-semantics merge as a PEFT directory (first adapter's config, union of targets)."""
    raws = [raw_lora_tensors(d) for d in adapter_dirs]
    slots = sorted({s for r in raws for s in r})
    tensors: dict[str, torch.Tensor] = {}
    for layer, module in slots:
        idx = [i for i, r in enumerate(raws) if (layer, module) in r]
        w = torch.tensor([weights[i] for i in idx], dtype=torch.float32)
        for side in ("A", "B"):
            parts = [raws[i][(layer, module)][side] for i in idx]
            merged = _merge_side(parts, w, strategy, density, sign)
            tensors[_peft_key(layer, module, side)] = merged.contiguous()
    config = json.loads((adapter_dirs[0] / "adapter_config.json").read_text())
    config["target_modules"] = [m for m in _ORDER if any(mod == m for _, mod in slots)]
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def peft_greedy(model_dir: Path, adapter_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation of `prompt_ids` by transformers + PEFT, without a KV cache."""
    from peft import PeftModel

    from tests.fixtures.tiny_models import load_hf_model

    model = PeftModel.from_pretrained(load_hf_model(model_dir), str(adapter_dir)).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]
