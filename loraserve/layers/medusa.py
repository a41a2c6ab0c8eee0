"""Medusa heads as pure tensor math: hidden states in, draft logits out.

Each head `k` applies `num_layers` residual blocks `x = x + SiLU(x @ W[k, j].T + b[k, j])`
to the final (normed) hidden state, then either its own vocabulary projection
(v1) or the base model's `lm_head` (v2). All heads run together as batched
matmuls over a leading head dimension, so the cost is one `bmm` per block
plus one projection, whatever the number of heads.

The heads object only needs `weight [K, L, H, H]`, `bias [K, L, H]` and
`proj [K, V, H] | None` (see `loraserve.adapters.lora_weights.MedusaHeads`);
tensors already on the hidden states' device and dtype are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from loraserve.adapters.lora_weights import MedusaHeads


def medusa_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[N, H] -> [K, N, H]: every head's residual blocks applied to the same hidden states."""
    k, layers = weight.shape[0], weight.shape[1]
    weight = weight.to(device=hidden.device, dtype=hidden.dtype)
    bias = bias.to(device=hidden.device, dtype=hidden.dtype)
    x = hidden.unsqueeze(0).expand(k, -1, -1)
    for j in range(layers):
        # baddbmm: bias [K, 1, H] + x [K, N, H] @ W^T [K, H, H]
        x = x + F.silu(torch.baddbmm(bias[:, j].unsqueeze(1), x, weight[:, j].transpose(1, 2)))
    return x


def medusa_logits(
    hidden: torch.Tensor,
    heads: MedusaHeads,
    lm_head: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    include_base: bool = False,
) -> torch.Tensor:
    """Draft logits `[num_heads, N, V]` (float32); head `k` predicts the token `k + 2` after each row.

    With `include_base=True` the result is `[1 + num_heads, N, V]` with the base
    model's own next-token logits at index 0; for v2 heads they share one
    `lm_head` matmul with the drafts (LoRA never touches `lm_head`, so the base
    logits are the same with or without an adapter).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got {tuple(hidden.shape)}")
    if isinstance(lm_head, torch.Tensor):  # the matrix itself, else the model's projection
        weight = lm_head
        lm_head = lambda x: F.linear(x, weight)  # noqa: E731
    x = medusa_hidden(hidden, heads.weight, heads.bias)
    if heads.proj is None:
        if include_base:
            x = torch.cat([hidden.unsqueeze(0), x])
        return lm_head(x).float()
    proj = heads.proj.to(device=hidden.device, dtype=hidden.dtype)
    drafts = torch.bmm(x, proj.transpose(1, 2)).float()
    if include_base:
        return torch.cat([lm_head(hidden).float().unsqueeze(0), drafts])
    return drafts
