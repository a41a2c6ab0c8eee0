"""The one object that describes a step's batch to the model.

Built once per step by the engine and passed down; no layer looks anything
up globally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.attention import AttentionMeta
from loraserve.layers.lora import LoraBatch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] all new tokens of all sequences, flattened
    positions: torch.Tensor  # [T]
    cos: torch.Tensor  # [T, D/2]
    sin: torch.Tensor  # [T, D/2]
    attn: AttentionMeta
    lora: LoraBatch | None  # None when no row uses an adapter


@dataclass
class BurstBatch:
    """What a decode burst (engine/decode_bursts.py: several greedy steps in one call) gives the
    model: single-token rows, built once a burst; the steps after the first derive their
    positions, cache slots and inputs from it."""

    ids: torch.Tensor  # [M] each row's last token, not yet in the cache
    positions: torch.Tensor  # [M] its position
    steps: int
    block_tables: torch.Tensor  # [M, blocks], reaching position + steps - 1 of every row
    block_size: int
    lora: LoraBatch | None  # None when no row uses an adapter
    # sampled rows: [M] each row's temperature (0: a greedy row) and [steps, M] the uniform its
    # generator gave it for each step; None: every row greedy
    temperatures: torch.Tensor | None = None
    uniforms: torch.Tensor | None = None
