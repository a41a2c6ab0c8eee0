"""Phi-3: a Llama-family decoder whose checkpoint already fuses q/k/v (`qkv_proj`) and gate/up
(`gate_up_proj`), so those are the modules a PEFT adapter targets and the LoRA slot table
holds; everything else is Llama's math (models/llama.py)."""

from __future__ import annotations

from loraserve.models.config import ModelConfig
from loraserve.models.llama import LlamaModel
from loraserve.models.spec import Projection


def phi3_projections(cfg: ModelConfig) -> list[Projection]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return [
        Projection("qkv_proj", "self_attn.qkv_proj", h, q + 2 * kv, "qkv"),
        Projection("o_proj", "self_attn.o_proj", q, h, "o"),
        Projection("gate_up_proj", "mlp.gate_up_proj", h, 2 * i, "gate_up"),
        Projection("down_proj", "mlp.down_proj", i, h, "down"),
    ]


class Phi3Model(LlamaModel):
    projections = staticmethod(phi3_projections)

    def __init__(self, cfg: ModelConfig, *args: object, **kwargs: object) -> None:
        if float(cfg.raw.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("Phi-3 checkpoints with partial_rotary_factor != 1 are not supported yet")
        super().__init__(cfg, *args, **kwargs)  # type: ignore[arg-type]
