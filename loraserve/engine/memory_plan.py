"""How the device's memory is split at start-up: sequence lengths, KV-cache blocks, adapter slots.

Decided once, before the first step, so a running server never allocates or resizes the
tensors a step reads. The `EngineConfig` that came in is never written to: what was resolved
is a frozen `Limits`, which is what `/info`, the server's validation and the scheduler
report and enforce.
"""

from __future__ import annotations

import inspect
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


# Sequences of full length (--max-total-tokens) the default KV cache holds at once. Why a count of
# sequences and not a share of free memory: on CPU "device memory" is the whole host, and a cache
# sized from it (5.5 GB for a 135M model) is memory nobody's batch ever uses. Blocks are paged,
# so this also holds many more short sequences (the benchmark's 32 x 192 tokens fit in 2 x 2048
# + 4096); a batch that outgrows it preempts its newest sequence, which is recomputed later.
DEFAULT_FULL_SEQUENCES = 2


def default_batch_total_tokens(cfg: EngineConfig, max_total_tokens: int) -> int:
    """LoRAX's `--max-batch-total-tokens` when it is not given: room for a few full-length
    sequences (max batch size x max total tokens, the batch size capped at
    DEFAULT_FULL_SEQUENCES) and for the largest prefill step, whichever is more."""
    full = min(cfg.max_num_seqs, DEFAULT_FULL_SEQUENCES) * max_total_tokens
    return max(full, cfg.max_batch_prefill_tokens)


def kv_bytes_per_token(mc: ModelConfig, dtype: torch.dtype) -> int:
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * elt


def kv_cache_blocks(
    cfg: EngineConfig, mc: ModelConfig, max_total_tokens: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Blocks (null block included) for `--max-batch-total-tokens` tokens (default:
    `default_batch_total_tokens`), never fewer than one full-length sequence needs. An explicit
    `kv_cache_memory_bytes` (the Python API's byte budget) is filled instead, up to the flag.
    Logged, so an operator sees what the cache reserved."""
    per_token = kv_bytes_per_token(mc, dtype)
    if cfg.kv_cache_memory_bytes is not None:  # a byte budget (Python API): as much as it holds
        tokens = min(cfg.kv_cache_memory_bytes // per_token, cfg.max_num_seqs * max_total_tokens)
        tokens = min(tokens, cfg.max_batch_total_tokens or tokens)
    else:
        tokens = cfg.max_batch_total_tokens or default_batch_total_tokens(cfg, max_total_tokens)
    num_blocks = max(-(-tokens // cfg.block_size), -(-max_total_tokens // cfg.block_size)) + 1
    capacity = (num_blocks - 1) * cfg.block_size
    log.info(
        "KV cache: %d tokens (%s) in %d blocks of %d, %.1f MiB (%s, %d bytes per token)",
        capacity,
        "--max-batch-total-tokens"
        if cfg.max_batch_total_tokens
        else "default"
        if cfg.kv_cache_memory_bytes is None
        else "kv_cache_memory_bytes",
        num_blocks - 1,
        cfg.block_size,
        num_blocks * cfg.block_size * per_token / 2**20,
        str(dtype).replace("torch.", ""),
        per_token,
    )
    return num_blocks


def adapter_slots(cfg: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Device slots for active adapters at the maximum rank, within the adapter memory budget.

    On CPU the table is reserved as address space and a slot's memory is taken when its adapter
    loads, at the rank the table then has (layers/lora.py), so the log gives what one slot costs
    at the start rank and what every slot would cost at the largest."""
    shapes, layers = mc.linear_shapes(), mc.num_hidden_layers
    per_slot = LoraTable.bytes_per_slot(shapes, layers, cfg.max_lora_rank, dtype)
    budget = cfg.adapter_memory_bytes or int(device_memory(device) * 0.1)
    num_slots = max(1, min(cfg.max_active_adapters, budget // per_slot))
    if num_slots < cfg.max_active_adapters:
        log.warning(
            "adapter memory budget fits %d of %d requested active adapters",
            num_slots,
            cfg.max_active_adapters,
        )
    start_rank = min(inspect.signature(LoraTable).parameters["rank"].default, cfg.max_lora_rank)
    log.info(
        "adapter slots: %d, %s (%.1f MiB a slot at rank %d, up to %.1f MiB for all at --max-lora-rank %d)",
        num_slots,
        "taken as adapters load" if device.type == "cpu" else "allocated now",
        LoraTable.bytes_per_slot(shapes, layers, start_rank, dtype) / 2**20,
        start_rank,
        num_slots * per_slot / 2**20,
        cfg.max_lora_rank,
    )
    return num_slots
