"""What every decoder-only family shares: embedding, final norm, lm_head, and the projections
built from the family's declaration (models/spec.py).

A model is built in one go from loaded weights, the `Ops` backend, the LoRA slot table and
the KV cache (all owned by the `ModelRunner`), so after construction it holds everything its
forward reads and nobody sets attributes on it from outside.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loraserve.layers.forward_batch import BurstBatch
from loraserve.layers.linear import Linear
from loraserve.layers.lora import LoraTable
from loraserve.layers.lora_linear import LoraLinear
from loraserve.layers.ops import TorchOps
from loraserve.layers.rotary import RotaryTable
from loraserve.models.config import ModelConfig
from loraserve.models.spec import Projection, fused_groups

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def build_projections(
    projections: list[Projection],
    w: Mapping[str, torch.Tensor],
    ops: TorchOps,
    table: LoraTable | None,
    layer: int,
) -> dict[str, LoraLinear]:
    """One `LoraLinear` per fused matmul of decoder layer `layer`, its weight the declared
    members' checkpoint tensors stacked in order (biases too, when the checkpoint has them)."""
    out = {}
    for fused, members in fused_groups(projections).items():
        weights = [w[f"{p.path}.weight"] for p in members]
        has_bias = [f"{p.path}.bias" in w for p in members]
        biases = [w[f"{p.path}.bias"] for p in members] if all(has_bias) else None
        # one member: its tensor as loaded (no copy, which would double its memory until packed)
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        bias = None if biases is None else biases[0] if len(biases) == 1 else torch.cat(biases)
        if any(has_bias) and bias is None:
            raise ValueError(f"layer {layer}: {fused} has biases on some of its projections only")
        base = ops.make_linear(weight, bias)
        out[fused] = LoraLinear(base, ops, table, layer, fused, [(p.name, p.out_features) for p in members])
    return out


class DecoderModel:
    """Holds the shared weights; subclasses add their layers and `forward`."""

    def __init__(
        self,
        cfg: ModelConfig,
        top: Mapping[str, torch.Tensor],
        ops: TorchOps,
        kv_caches: KVCaches,
        embed_scale: float | None = None,
    ) -> None:
        self.cfg, self.ops, self.kv_caches = cfg, ops, kv_caches
        self.embed_scale = embed_scale
        self.rotary = RotaryTable(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, ops.dtype, ops.device
        )
        embed = top["model.embed_tokens.weight"]
        self.vocab_size = embed.shape[0]
        self.norm = top["model.norm.weight"]
        tied = "lm_head.weight" not in top and cfg.tie_word_embeddings
        head = embed if tied else top.get("lm_head.weight")
        if head is None:
            raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        self.lm_head: Linear = ops.make_linear(head)
        # a tied embedding the backend can read out of the packed lm_head is not kept twice
        self.embed: torch.Tensor | None = None if tied and ops.can_share_embedding(self.lm_head) else embed

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.ops.embedding(ids, self.lm_head if self.embed is None else self.embed)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # HF rounds the scale to the dtype
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head).float()

    def burst_steps(self, burst: BurstBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Several decode steps in one call ([steps, M] tokens, logprobs, finite), where a
        family and its backend have one (models/llama.py); None: step one at a time."""
        return None

    def own_tensors(self, layers: list[object]) -> None:
        """Copy out the tensors still used as loaded (norms, biases, an untied embedding) once
        the matrices live in packed copies; subclasses call it at the end of construction.

        Why: safetensors maps the checkpoint, and a CPU tensor already in the serving dtype is a
        view of that mapping, so a single kept norm vector pins the whole file, resident after
        packing read it (513 MB on the 135M shape). Plain layouts compute straight from the
        mapping, so they keep it.
        """
        if self.lm_head.weight.device.type != "cpu" or not self.lm_head.packed:
            return
        if self.lm_head.bias is not None:
            self.lm_head.bias = self.lm_head.bias.clone()
        for obj in [self, *layers]:
            for name, value in list(vars(obj).items()):
                if isinstance(value, torch.Tensor):
                    setattr(obj, name, value.clone())
                elif isinstance(value, LoraLinear) and value.base.bias is not None:
                    value.base.bias = value.base.bias.clone()
