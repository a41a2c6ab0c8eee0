"""Gemma 2 in plain PyTorch, on the Llama projections (models/llama.py) with Gemma's changes:
embeddings scaled by sqrt(hidden), RMSNorm weights applied as (1 + w), a norm after attention
and after the MLP as well as before each, GELU(tanh) gating, attention scaled by
`query_pre_attn_scalar`, attention and final logits soft-capped, and sliding-window attention
on alternating layers (ModelConfig.layer_windows)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.lora import LoraBatch, LoraTable
from loraserve.layers.ops import TorchOps
from loraserve.models.base import DecoderModel, KVCaches
from loraserve.models.config import ModelConfig
from loraserve.models.llama import LlamaLayer, llama_projections


def _gemma_norm(w: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by (1 + w), computed in float32 as HF does; folded once here
    so every norm runs the ordinary kernel."""
    return (1.0 + w.float()).to(w.dtype)


class Gemma2Layer(LlamaLayer):
    """Llama's attention with Gemma's scale and soft-cap; Gemma's norms and GELU gate."""

    def __init__(
        self,
        i: int,
        w: Mapping[str, torch.Tensor],
        cfg: ModelConfig,
        ops: TorchOps,
        table: LoraTable | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        super().__init__(i, w, cfg, ops, table, kv_cache, llama_projections(cfg))
        self.in_norm = _gemma_norm(w["input_layernorm.weight"])
        self.post_attn_norm = _gemma_norm(w["post_attention_layernorm.weight"])
        self.pre_mlp_norm = _gemma_norm(w["pre_feedforward_layernorm.weight"])
        self.post_mlp_norm = _gemma_norm(w["post_feedforward_layernorm.weight"])
        del self.post_norm  # Gemma's post-attention norm is applied to the attention output
        self.softcap = cfg.raw.get("attn_logit_softcapping")
        self.scale = float(cfg.raw.get("query_pre_attn_scalar") or cfg.head_dim) ** -0.5

    def mlp(self, h: torch.Tensor, lb: LoraBatch | None) -> torch.Tensor:
        return self.down(self.ops.gelu_tanh_mul(self.gate_up(h, lb), self.cfg.intermediate_size), lb)


class Gemma2Model(DecoderModel):
    projections = staticmethod(llama_projections)

    def __init__(
        self,
        cfg: ModelConfig,
        weights: tuple[list[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
        ops: TorchOps,
        lora: LoraTable | None,
        kv_caches: KVCaches,
    ) -> None:
        per_layer, top = weights
        super().__init__(cfg, top, ops, kv_caches, embed_scale=cfg.hidden_size**0.5)
        self.norm = _gemma_norm(self.norm)
        self.final_softcap = cfg.raw.get("final_logit_softcapping")
        self.layers = [Gemma2Layer(i, w, cfg, ops, lora, kv_caches[i]) for i, w in enumerate(per_layer)]
        self.own_tensors(self.layers)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        ops, eps = self.ops, self.cfg.rms_norm_eps
        x = self.embed_tokens(fb.input_ids)
        h = ops.rms_norm(x, self.layers[0].in_norm, eps)
        for i, layer in enumerate(self.layers):
            a = ops.rms_norm(layer.attention(h, fb), layer.post_attn_norm, eps)
            x, h = ops.add_rms_norm(x, a, layer.pre_mlp_norm, eps)
            m = ops.rms_norm(layer.mlp(h, fb.lora), layer.post_mlp_norm, eps)
            nxt = self.norm if i + 1 == len(self.layers) else self.layers[i + 1].in_norm
            x, h = ops.add_rms_norm(x, m, nxt, eps)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
