"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in plain PyTorch.

One file for the family: grouped-query attention, RoPE (with scaling),
RMSNorm, SwiGLU, optional tied embeddings, Qwen2's q/k/v bias, Qwen3's
per-head q/k RMSNorm, Mistral's sliding window. q/k/v and gate/up run as one
matmul each (models/spec.py); LoRA deltas are added into slices of the fused
outputs (layers/lora_linear.py), so adapters never change the base weights.
Weight names follow HF checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loraserve.layers.decode_stack import DecodeLayerSpec, DecodeTop
from loraserve.layers.forward_batch import BurstBatch, ForwardBatch
from loraserve.layers.lora import LoraBatch, LoraTable
from loraserve.layers.ops import TorchOps
from loraserve.models.base import DecoderModel, KVCaches, build_projections
from loraserve.models.config import ModelConfig
from loraserve.models.spec import Projection


def llama_projections(cfg: ModelConfig) -> list[Projection]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return [
        Projection("q_proj", "self_attn.q_proj", h, q, "qkv"),
        Projection("k_proj", "self_attn.k_proj", h, kv, "qkv"),
        Projection("v_proj", "self_attn.v_proj", h, kv, "qkv"),
        Projection("o_proj", "self_attn.o_proj", q, h, "o"),
        Projection("gate_proj", "mlp.gate_proj", h, i, "gate_up"),
        Projection("up_proj", "mlp.up_proj", h, i, "gate_up"),
        Projection("down_proj", "mlp.down_proj", i, h, "down"),
    ]


class LlamaLayer:
    def __init__(
        self,
        i: int,
        w: Mapping[str, torch.Tensor],
        cfg: ModelConfig,
        ops: TorchOps,
        table: LoraTable | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        projections: list[Projection],
    ) -> None:
        p = build_projections(projections, w, ops, table, i)
        self.qkv, self.o, self.gate_up, self.down = p["qkv"], p["o"], p["gate_up"], p["down"]
        self.in_norm = w["input_layernorm.weight"]
        self.post_norm = w["post_attention_layernorm.weight"]
        self.q_norm = w.get("self_attn.q_norm.weight")  # Qwen3: RMSNorm over each head
        self.k_norm = w.get("self_attn.k_norm.weight")
        self.ops, self.cfg, self.kv_cache = ops, cfg, kv_cache
        self.window = cfg.layer_windows[i]
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.k_end = self.q_size + cfg.num_key_value_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.softcap: float | None = None  # attention-logit soft-capping (Gemma 2)
        # the backend's one-call decode attention (CpuNativeOps.rope_decode_attention), if any
        self.fused_attention = getattr(ops, "rope_decode_attention", None)

    def attention(self, h: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        ops, cfg, hd = self.ops, self.cfg, self.cfg.head_dim
        qkv = self.qkv(h, fb.lora)
        if (
            self.fused_attention is not None
            and self.q_norm is None
            and self.window is None
            and self.softcap is None
        ):
            heads = (cfg.num_attention_heads, cfg.num_key_value_heads)
            o = self.fused_attention(qkv, *heads, fb, self.kv_cache, self.scale)
            if o is not None:
                return self.o(o, fb.lora)
        t = qkv.shape[0]
        if self.q_norm is None:
            # q and k sit side by side in the fused output: rotate all their heads in one go
            qk = ops.rotary(qkv[:, : self.k_end].view(t, -1, hd), fb.cos, fb.sin)
            q, k = qk[:, : cfg.num_attention_heads], qk[:, cfg.num_attention_heads :]
        else:
            q = ops.rms_norm(qkv[:, : self.q_size].reshape(-1, hd), self.q_norm, cfg.rms_norm_eps)
            k = ops.rms_norm(qkv[:, self.q_size : self.k_end].reshape(-1, hd), self.k_norm, cfg.rms_norm_eps)
            q = ops.rotary(q.view(t, -1, hd), fb.cos, fb.sin)
            k = ops.rotary(k.view(t, -1, hd), fb.cos, fb.sin)
        v = qkv[:, self.k_end :].view(t, -1, hd)
        k_cache, v_cache = self.kv_cache
        attn = ops.paged_attention(q, k, v, k_cache, v_cache, fb.attn, self.scale, self.window, self.softcap)
        return self.o(attn.view(t, -1), fb.lora)

    def mlp(self, h: torch.Tensor, lb: LoraBatch | None) -> torch.Tensor:
        act = self.ops.silu_mul(self.gate_up(h, lb), self.cfg.intermediate_size)
        return self.down(act, lb)

    def stack_spec(self, next_norm: torch.Tensor) -> DecodeLayerSpec | None:
        """This layer for the backend's one-call decode stack; None if it has parts the stack
        does not run (per-head q/k norms, a sliding window, soft-capping)."""
        if self.q_norm is not None or self.window is not None or self.softcap is not None:
            return None
        heads = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads)
        parts = (self.qkv, self.o, self.gate_up, self.down)
        return DecodeLayerSpec(*parts, self.post_norm, next_norm, self.kv_cache, *heads, self.scale)


class LlamaModel(DecoderModel):
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
        super().__init__(cfg, top, ops, kv_caches)
        projections = self.projections(cfg)
        self.layers = [
            LlamaLayer(i, w, cfg, ops, lora, kv_caches[i], projections) for i, w in enumerate(per_layer)
        ]
        self.own_tensors(self.layers)
        # decode steps' layers in one native call where the backend has one (layers/decode_stack.py)
        norms = [layer.in_norm for layer in self.layers[1:]] + [self.norm]
        specs = [layer.stack_spec(nxt) for layer, nxt in zip(self.layers, norms)]
        # and, with what runs around the layers, greedy bursts of steps (engine/decode_bursts.py)
        top = DecodeTop(
            self.lm_head if self.embed is None else self.embed,
            self.layers[0].in_norm,
            self.rotary,
            self.lm_head,
        )
        self.decode_stack = (
            None
            if any(s is None for s in specs)
            else ops.decode_stack(specs, cfg.rms_norm_eps, top if self.embed_scale is None else None)
        )

    def burst_steps(self, burst: BurstBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`steps` decode steps in one call (layers/decode_stack.py `DecodeStack.burst`),
        or None where the backend's stack cannot run them."""
        if self.decode_stack is None:
            return None
        return self.decode_stack.burst(burst)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] for every new token."""
        ops, eps = self.ops, self.cfg.rms_norm_eps
        x = self.embed_tokens(fb.input_ids)  # the residual stream
        h = ops.rms_norm(x, self.layers[0].in_norm, eps)
        if self.decode_stack is not None:
            out = self.decode_stack(x, h, fb)
            if out is not None:
                return out
        for i, layer in enumerate(self.layers):
            x, h = ops.add_rms_norm(x, layer.attention(h, fb), layer.post_norm, eps)
            # the residual add folds into the next norm: the next layer's input norm, or the final one
            nxt = self.norm if i + 1 == len(self.layers) else self.layers[i + 1].in_norm
            x, h = ops.add_rms_norm(x, layer.mlp(h, fb.lora), nxt, eps)
        return h
