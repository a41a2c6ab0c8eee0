"""How the device's memory is split at start-up: sequence lengths, KV-cache blocks, adapter slots.

Decided once, before the first step, so a running server never allocates or resizes the
tensors a step reads. The `EngineConfig` that came in is never written to: what was resolved
is a frozen `Limits`, which is what `/info`, the server's validation and the scheduler
report and enforce.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loraserve.engine.config import EngineConfig, device_memory
from loraserve.layers.lora import LoraTable
from loraserve.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What the engine enforces, resolved from the `EngineConfig`, the model and the device."""

    max_input_length: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int  # KV-cache capacity in tokens
    max_active_adapters: int  # adapter slots on the device
    max_lora_rank: int
    max_num_seqs: int
    block_size: int


def resolve_lengths(cfg: EngineConfig, mc: ModelConfig) -> tuple[int, int, int]:
    """(max_input_length, max_total_tokens, max_batch_prefill_tokens): unset limits from the
    model's context, LoRAX's defaults capped by it."""
    ctx = mc.max_position_embeddings
    total = min(cfg.max_total_tokens or min(2048, ctx), ctx)
    inp = min(cfg.max_input_length or min(1024, total - 1), total - 1)
    return inp, total, max(cfg.max_batch_prefill_tokens, inp)


def kv_cache_blocks(
    cfg: EngineConfig, mc: ModelConfig, max_total_tokens: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Blocks (null block included) that fit the KV budget, never more than the batch could use."""
    elt = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * elt
    budget = cfg.kv_cache_memory_bytes
    if budget is None:
        avail = device_memory(device)
        budget = int(avail * (0.8 if device.type == "cuda" else 0.25))
        budget = min(budget, 8 << 30) if device.type == "cpu" else budget
    # never more than the batch could ever use, so small models start fast
    tokens = min(budget // per_token, cfg.max_num_seqs * max_total_tokens)
    if cfg.max_batch_total_tokens:
        tokens = min(tokens, cfg.max_batch_total_tokens)
    num_blocks = max(tokens // cfg.block_size, -(-max_total_tokens // cfg.block_size)) + 1
    log.info(
        "KV cache: %d blocks x %d tokens (%.1f MiB)",
        num_blocks,
        cfg.block_size,
        num_blocks * cfg.block_size * per_token / 2**20,
    )
    return num_blocks


def adapter_slots(cfg: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Device slots for active adapters at the maximum rank, within the adapter memory budget."""
    per_slot = LoraTable.bytes_per_slot(mc.linear_shapes(), mc.num_hidden_layers, cfg.max_lora_rank, dtype)
    budget = cfg.adapter_memory_bytes or int(device_memory(device) * 0.1)
    num_slots = max(1, min(cfg.max_active_adapters, budget // per_slot))
    if num_slots < cfg.max_active_adapters:
        log.warning(
            "adapter memory budget fits %d of %d requested active adapters",
            num_slots,
            cfg.max_active_adapters,
        )
    return num_slots
