"""Gemma 2 in plain PyTorch, on the Llama projections (models/llama.py) with Gemma's changes:
embeddings scaled by sqrt(hidden), RMSNorm weights applied as (1 + w), a norm after attention
and after the MLP as well as before each, GELU(tanh) gating, attention scaled by
`query_pre_attn_scalar`, attention and final logits soft-capped, and sliding-window attention
on alternating layers (ModelConfig.layer_windows)."""

from __future__ import annotations

import torch

from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.lora import LoraBatch, LoraTable
from loraserve.layers.ops import TorchOps
from loraserve.models.base import DecoderModel, KVCaches, build_projections
from loraserve.models.config import ModelConfig
from loraserve.models.llama import llama_projections


def _gemma_norm(w: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by (1 + w), computed in float32 as HF does; folded once here
    so every norm runs the ordinary kernel."""
    return (1.0 + w.float()).to(w.dtype)


class Gemma2Layer:
    def __init__(
        self,
        i: int,
        w: dict[str, torch.Tensor],
        cfg: ModelConfig,
        ops: TorchOps,
        table: LoraTable | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        p = build_projections(llama_projections(cfg), w, ops, table, i)
        self.qkv, self.o, self.gate_up, self.down = p["qkv"], p["o"], p["gate_up"], p["down"]
        self.in_norm = _gemma_norm(w["input_layernorm.weight"])
        self.post_attn_norm = _gemma_norm(w["post_attention_layernorm.weight"])
        self.pre_mlp_norm = _gemma_norm(w["pre_feedforward_layernorm.weight"])
        self.post_mlp_norm = _gemma_norm(w["post_feedforward_layernorm.weight"])
        self.ops, self.cfg, self.kv_cache = ops, cfg, kv_cache
        self.window = cfg.layer_windows[i]
        self.softcap = cfg.raw.get("attn_logit_softcapping")
        self.scale = float(cfg.raw.get("query_pre_attn_scalar") or cfg.head_dim) ** -0.5
        self.k_end = (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim

    def attention(self, h: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        ops, cfg, hd = self.ops, self.cfg, self.cfg.head_dim
        qkv = self.qkv(h, fb.lora)
        t = qkv.shape[0]
        qk = ops.rotary(qkv[:, : self.k_end].view(t, -1, hd), fb.cos, fb.sin)
        q, k = qk[:, : cfg.num_attention_heads], qk[:, cfg.num_attention_heads :]
        v = qkv[:, self.k_end :].view(t, -1, hd)
        k_cache, v_cache = self.kv_cache
        attn = ops.paged_attention(q, k, v, k_cache, v_cache, fb.attn, self.scale, self.window, self.softcap)
        return self.o(attn.view(t, -1), fb.lora)

    def mlp(self, h: torch.Tensor, lb: LoraBatch | None) -> torch.Tensor:
        return self.down(self.ops.gelu_tanh_mul(self.gate_up(h, lb), self.cfg.intermediate_size), lb)


class Gemma2Model(DecoderModel):
    projections = staticmethod(llama_projections)

    def __init__(
        self,
        cfg: ModelConfig,
        weights: tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
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
