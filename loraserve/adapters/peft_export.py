"""Write a `LoraAdapter` back out as a PEFT LoRA directory.

Used to hand merged adapters to reference implementations (PEFT +
transformers) in end-to-end tests, and to let operators inspect what a merge
produced. The directory loads with `PeftModel.from_pretrained` and with our own
`parse_peft_adapter`, and both apply exactly the per-module scales the adapter
carries.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from safetensors.torch import save_file

from loraserve.adapters.lora_weights import LORA_MODULES, LoraAdapter
from loraserve.adapters.peft_format import CONFIG_FILE, SAFETENSORS_FILE

_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")

# Config keys that would make PEFT build something other than plain LoRA on these tensors.
_DROPPED_KEYS = ("layers_to_transform", "layers_pattern", "modules_to_save", "layer_replication")


def module_path(layer: int, module: str) -> str:
    """The module's name inside a Llama-family `*ForCausalLM` (what PEFT patterns match)."""
    block = "mlp" if module in _MLP_MODULES else "self_attn"
    return f"model.layers.{layer}.{block}.{module}"


def peft_config_for(adapter: LoraAdapter) -> dict:
    """An adapter_config.json that reproduces each module's rank and scale under PEFT.

    Modules whose rank or scale differ from the config-level ones get
    `rank_pattern` / `alpha_pattern` entries keyed by their full path.
    `init_lora_weights` is forced on so a (layer, module) the checkpoint lacks
    gets PEFT's zero `lora_B` and stays a no-op instead of random noise.
    """
    cfg = copy.deepcopy(adapter.config)
    for k in _DROPPED_KEYS:
        cfg.pop(k, None)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for (layer, module), w in sorted(adapter.modules.items()):
        path = module_path(layer, module)
        if w.rank != adapter.rank:
            rank_pattern[path] = w.rank
        denom = math.sqrt(w.rank) if adapter.use_rslora else w.rank
        default_scale = adapter.alpha / denom
        if not math.isclose(w.scale, default_scale, rel_tol=1e-12, abs_tol=0.0):
            alpha_pattern[path] = w.scale * denom
    targets = [m for m in LORA_MODULES if any(mod == m for _, mod in adapter.modules)]
    cfg.update(
        peft_type="LORA",
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
        fan_in_fan_out=False,
        bias="none",
        use_dora=False,
        lora_dropout=0.0,
    )
    cfg.setdefault("task_type", "CAUSAL_LM")
    if adapter.base_model_name is not None:
        cfg["base_model_name_or_path"] = adapter.base_model_name
    return cfg


def save_as_peft(adapter: LoraAdapter, out_dir: str | Path) -> Path:
    """Save `adapter` as `adapter_config.json` + `adapter_model.safetensors` in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), w in adapter.modules.items():
        prefix = f"base_model.model.{module_path(layer, module)}"
        tensors[f"{prefix}.lora_A.weight"] = w.a.detach().to("cpu").contiguous()
        tensors[f"{prefix}.lora_B.weight"] = w.b.detach().to("cpu").contiguous()
    save_file(tensors, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(peft_config_for(adapter), indent=2, sort_keys=True))
    return out
