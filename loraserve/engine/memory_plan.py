"""How the device's memory is split at start-up: sequence lengths, KV-cache blocks, adapter slots.

Decided once, before the first step, so a running server never allocates or resizes the
tensors a step reads. The `EngineConfig` that came in is never written to: what was resolved
is a frozen `Limits`, which is what `/info`, the server's validation and the scheduler
report and enforce.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass

import torch

from loraserve.engine.config import EngineConfig, device_memory
from loraserve.layers.lora import LoraTable
from loraserve.models.config import ModelConfig

log = logging.getLogger(__name__)

# the smallest rank a CPU slot table is sized for: lower-rank adapters fit more slots in the
# budget, but the table reserves address space for every slot at --max-lora-rank
RANK_FLOOR = 8


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


def _host_memory_total() -> int:
    """The host's physical memory (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass(frozen=True)
class SlotPlan:
    """The adapter slot table's size, and the bytes its adapters may hold at their loaded rank."""

    num_slots: int
    budget_bytes: int | None  # None: every slot fits the budget even at --max-lora-rank


def adapter_slots(cfg: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device) -> SlotPlan:
    """Device slots for active adapters within the adapter memory budget.

    On CUDA the table is allocated at start, so the budget is divided by the slot size at
    --max-lora-rank. On CPU the table is reserved as address space and a slot's memory is taken
    when its adapter loads, at the rank the table then has (layers/lora.py), so the budget is
    held against what loaded adapters take at that rank (engine/adapter_slots.py) and the table
    gets as many slots as the budget holds at rank RANK_FLOOR, their address space (reserved at
    --max-lora-rank) capped at half the host's physical memory, which Linux's heuristic
    overcommit still grants in one mapping. Why: counted at the maximum rank, a
    24 GB host's default budget (10%) held 30 slots at --max-lora-rank 64 for SmolLM2-135M's
    rank-16 fp32 adapters (19.5 MB each, 625 MB for 32), so the 32nd of 32 concurrent requests,
    each on its own adapter, waited for all the others and then decoded alone (64 one-row steps):
    7% of the whole batch's wall time (bench/llamacpp.py, int8, 2-core Zen 3)."""
    shapes, layers = mc.linear_shapes(), mc.num_hidden_layers
    per_slot = LoraTable.bytes_per_slot(shapes, layers, cfg.max_lora_rank, dtype)
    budget = cfg.adapter_memory_bytes or int(device_memory(device) * 0.1)
    at_max = max(1, min(cfg.max_active_adapters, budget // per_slot))
    start_rank = min(inspect.signature(LoraTable).parameters["rank"].default, cfg.max_lora_rank)
    if device.type == "cpu":
        floor = min(RANK_FLOOR, cfg.max_lora_rank)
        per_floor = LoraTable.bytes_per_slot(shapes, layers, floor, dtype)
        reservable = _host_memory_total() // 2 or 4 * budget
        num_slots = max(at_max, min(cfg.max_active_adapters, budget // per_floor, reservable // per_slot))
    else:
        num_slots = at_max
    if num_slots < cfg.max_active_adapters:
        log.warning(
            "adapter memory budget fits %d of %d requested active adapters%s",
            num_slots,
            cfg.max_active_adapters,
            f" (at rank {min(RANK_FLOOR, cfg.max_lora_rank)})" if device.type == "cpu" else "",
        )
    log.info(
        "adapter slots: %d, %s (%.1f MiB a slot at rank %d; %d fit the %.1f MiB budget at --max-lora-rank %d)",
        num_slots,
        "memory taken as adapters load, at their rank" if device.type == "cpu" else "allocated now",
        LoraTable.bytes_per_slot(shapes, layers, start_rank, dtype) / 2**20,
        start_rank,
        at_max,
        budget / 2**20,
        cfg.max_lora_rank,
    )
    limited = device.type == "cpu" and num_slots > at_max
    return SlotPlan(num_slots, budget if limited else None)
