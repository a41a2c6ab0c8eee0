"""A decode step's decoder layers in one native call, where the backend has one.

Why: at batch 1 a small model's step is mostly short kernels, and each trip from Python to a
kernel costs a few microseconds of interpreter, argument conversion and output allocation,
240 times a token on SmolLM2-135M (csrc/decode_stack_cpu.cpp has the figures). A model declares
its layers once (`DecodeLayerSpec`); the backend (`Ops.decode_stack`) turns them into a
`DecodeStack` that runs the same kernels in the same order, so its output equals the Python
loop's bit for bit. Steps it does not cover (prefills, speculative drafts, rows with adapters)
get None back and take the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraserve.layers.attention import all_single_decodes
from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.linear import Linear


@dataclass
class DecodeLayerSpec:
    """One Llama-family layer as the stack runs it: pre-norm attention (q|k|v, rotary, paged
    attention, o), residual + norm, SwiGLU MLP (gate|up, silu * up, down), residual + norm."""

    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    post_norm: torch.Tensor  # after attention
    next_norm: torch.Tensor  # after the MLP: the next layer's input norm, or the final one
    kv_cache: tuple[torch.Tensor, torch.Tensor]
    n_heads: int
    n_kv_heads: int
    scale: float


def single_decode_rows(fb: ForwardBatch, num_tokens: int) -> bool:
    """Whether every row of the step is one new token of a sequence that reads the paged cache."""
    meta = fb.attn
    return not meta.fresh and len(meta.paged) == 1 and all_single_decodes(meta.paged[0], num_tokens)


class DecodeStack:
    """The native stack (`kernels.DecodeStack`) with the step checks in front of it."""

    def __init__(self, native: Any) -> None:
        self.native = native

    def __call__(self, x: torch.Tensor, h: torch.Tensor, fb: ForwardBatch) -> torch.Tensor | None:
        """The final norm of the residual stream `x` (updated in place) after every layer, from
        `h`, the first layer's normed input; None where the step is not the stack's to run."""
        if fb.lora is not None or not single_decode_rows(fb, x.shape[0]):
            return None
        grp = fb.attn.paged[0]
        return self.native.run(x, h, fb.cos, fb.sin, fb.attn.slot_mapping, grp.block_tables, grp.ctx_lens)
