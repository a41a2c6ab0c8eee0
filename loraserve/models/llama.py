"""Llama-family decoder (Llama, Mistral, Qwen2) in plain PyTorch.

One file for the family: grouped-query attention, RoPE (with scaling),
RMSNorm, SwiGLU, optional tied embeddings and Qwen2's q/k/v bias. q/k/v and
gate/up are fused into single matmuls at load time; LoRA deltas are added
into slices of the fused outputs, so adapters never change the base weights.
Weight names follow HF checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from loraserve.layers.activation import silu_mul
from loraserve.layers.attention import paged_attention
from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.linear import Linear, linear, make_linear, panel_rows
from loraserve.layers.lora import LoraTable, apply_lora
from loraserve.layers.norm import add_rms_norm, rms_norm
from loraserve.layers.rotary import RotaryTable, apply_rotary
from loraserve.models.config import ModelConfig
from loraserve.models.weights import iter_weights


class DecoderLayer:
    def __init__(
        self, w: dict[str, torch.Tensor], cfg: ModelConfig, pack: bool, kernels: ModuleType | None = None
    ) -> None:
        qkv_w = torch.cat(
            [w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]]
        )
        qkv_b = (
            torch.cat([w["self_attn.q_proj.bias"], w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"]])
            if "self_attn.q_proj.bias" in w
            else None
        )
        self.qkv = make_linear(qkv_w, qkv_b, pack, kernels)
        self.o = make_linear(w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"), pack, kernels)
        self.gate_up = make_linear(
            torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]), None, pack, kernels
        )
        self.down = make_linear(w["mlp.down_proj.weight"], None, pack, kernels)
        self.in_norm = w["input_layernorm.weight"]
        self.post_norm = w["post_attention_layernorm.weight"]


class LlamaModel:
    """Holds weights, the KV cache views and the LoRA slot table; `forward` is pure math."""

    # projections that read the same input share one A-side LoRA matmul (see LoraTable)
    LORA_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.rotary = RotaryTable(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, dtype, device
        )
        self.layers: list[DecoderLayer] = []
        self.embed: torch.Tensor | None = None  # None when a panel-packed tied lm_head holds it
        self.vocab_size = cfg.vocab_size
        self.norm: torch.Tensor | None = None
        self.lm_head: Linear | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.lora: LoraTable | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        pack: bool = True,
        kernels: ModuleType | None = None,
    ) -> LlamaModel:
        """`pack`: let dense weights take a CPU GEMM's packed layout, the native `kernels`' own
        when given and able, else oneDNN's (see layers/linear.py)."""
        model = cls(cfg, dtype, device)
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(cfg.num_hidden_layers)]
        top: dict[str, torch.Tensor] = {}
        for name, t in iter_weights(Path(path)):
            t = t.to(device=device, dtype=dtype)
            if name.startswith("model.layers."):
                idx, rest = name[len("model.layers.") :].split(".", 1)
                per_layer[int(idx)][rest] = t
            else:
                top[name] = t
        model.embed = top["model.embed_tokens.weight"]
        model.vocab_size = model.embed.shape[0]
        model.norm = top["model.norm.weight"]
        tied = "lm_head.weight" not in top and cfg.tie_word_embeddings
        head = model.embed if tied else top.get("lm_head.weight")
        if head is None:
            raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        model.lm_head = make_linear(head, None, pack, kernels)
        if tied and model.lm_head.layout == "panel":
            model.embed = None  # looked up in the panels (embed_tokens): one copy, not two
        # (oneDNN's packed copy is opaque: a tied head packed for it keeps the plain one too)
        model.layers = [DecoderLayer(w, cfg, pack, kernels) for w in per_layer]
        if device.type == "cpu" and model.lm_head.packed:
            model._release_checkpoint()
        return model

    def _release_checkpoint(self) -> None:
        """Copy out the tensors still used as loaded, once the matrices live in packed copies.

        Why: safetensors maps the checkpoint, and a CPU tensor already in the serving dtype is a
        view of that mapping, so a single kept norm vector pins the whole file, resident after
        packing read it (513 MB on the 135M shape). Not done for plain layouts, which compute
        straight from the mapping.
        """
        for layer in self.layers:
            layer.in_norm, layer.post_norm = layer.in_norm.clone(), layer.post_norm.clone()
        projections = ("qkv", "o", "gate_up", "down")
        for lin in [self.lm_head, *(getattr(layer, n) for layer in self.layers for n in projections)]:
            if lin.bias is not None:
                lin.bias = lin.bias.clone()
        self.norm = self.norm.clone()
        if self.embed is not None:
            self.embed = self.embed.clone()

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Returns final hidden states [T, hidden] for every new token."""
        cfg, lb, lora = self.cfg, fb.lora, self.lora
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        inter = cfg.intermediate_size
        kern, eps = fb.kernels, cfg.rms_norm_eps
        ranks = lora.slot_rank if lora is not None else None
        x = self.embed_tokens(fb.input_ids)  # the residual stream
        h = rms_norm(x, self.layers[0].in_norm, eps, kern)
        for i, layer in enumerate(self.layers):
            qkv = linear(h, layer.qkv)
            if lb is not None:
                a, b = lora.a_layers, lora.b_layers
                ys = (qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:])
                apply_lora(ys, h, a["qkv"][i], (b["q_proj"][i], b["k_proj"][i], b["v_proj"][i]), lb, ranks)
            t = qkv.shape[0]
            # q and k sit side by side in the fused output: rotate all their heads in one go
            qk = apply_rotary(qkv[:, :k_end].view(t, -1, cfg.head_dim), fb.cos, fb.sin, kern)
            q, k = qk[:, : cfg.num_attention_heads], qk[:, cfg.num_attention_heads :]
            v = qkv[:, k_end:].view(t, -1, cfg.head_dim)
            k_cache, v_cache = self.kv_caches[i]
            attn = paged_attention(q, k, v, k_cache, v_cache, fb.attn, self.scale, kern).view(t, -1)
            o = linear(attn, layer.o)
            if lb is not None:
                apply_lora((o,), attn, a["o_proj"][i], (b["o_proj"][i],), lb, ranks)
            x, h = add_rms_norm(x, o, layer.post_norm, eps, kern)
            gu = linear(h, layer.gate_up)
            if lb is not None:
                ys = (gu[:, :inter], gu[:, inter:])
                apply_lora(ys, h, a["gate_up"][i], (b["gate_proj"][i], b["up_proj"][i]), lb, ranks)
            act = silu_mul(gu, inter, kern)
            d = linear(act, layer.down)
            if lb is not None:
                apply_lora((d,), act, a["down_proj"][i], (b["down_proj"][i],), lb, ranks)
            # the residual add folds into the next norm: the next layer's input norm, or the final one
            last = i + 1 == len(self.layers)
            x, h = add_rms_norm(x, d, self.norm if last else self.layers[i + 1].in_norm, eps, kern)
        return h

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return panel_rows(self.lm_head, ids)
        return F.embedding(ids, self.embed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()
