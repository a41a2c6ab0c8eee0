"""Device adapter slots are bounded by `max_active_adapters` *and* by the adapter memory budget.

The budget is what `--adapter-memory-fraction` becomes; when it holds fewer
slots than asked for, the engine must shrink the slot table (and report the
smaller number) rather than allocate past it, and still serve more adapters
than it has slots, correctly. On CPU a slot's memory is taken when its adapter
loads, at the table's rank, so the budget is held against what loaded adapters
take (engine/adapter_slots.py), not against every slot at --max-lora-rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.layers.lora import LoraTable
from loraserve.models.config import ModelConfig
from tests.engine.test_continuous_batching import alone, prompts, random_adapter

RANK = 16


def per_slot_at(llama_dir: Path, rank: int) -> int:
    mc = ModelConfig.from_dir(llama_dir)
    return LoraTable.bytes_per_slot(mc.linear_shapes(), mc.num_hidden_layers, rank, torch.float32)


def per_slot_bytes(llama_dir: Path) -> int:
    return per_slot_at(llama_dir, RANK)


def test_memory_budget_caps_the_slot_count(llama_dir: Path) -> None:
    """3 slots at rank 16 are 6 at rank 8, the smallest a CPU table is sized for (and the rank
    of these rank-4 adapters' table): 6 slots, and 7 adapters in one batch served 6 at a time."""
    budget = 3 * per_slot_bytes(llama_dir) + 1
    e = Engine.from_pretrained(
        llama_dir,
        EngineConfig(
            max_active_adapters=8,
            adapter_memory_bytes=budget,
            max_lora_rank=RANK,
            kv_cache_memory_bytes=16 << 20,
        ),
    )
    assert e.limits.max_active_adapters == 6 and e.runner.slots.num_slots == 6
    ref = Engine.from_pretrained(
        llama_dir, EngineConfig(max_active_adapters=1, max_lora_rank=RANK, kv_cache_memory_bytes=16 << 20)
    )
    ads = [random_adapter(e.model_config, f"budget-{i}", seed=i) for i in range(7)]
    ps = prompts(7, seed=9)
    params = SamplingParams(max_new_tokens=4, ignore_eos_token=True)
    results = e.generate(ps, params, ads)
    assert [[t.id for t in r.tokens] for r in results] == [alone(ref, p, params, a) for p, a in zip(ps, ads)]
    assert e.runner.slots.loads >= 7 and e.runner.slots.in_use() == 0
    assert e.runner.slots.peak_taken == 6


def test_budget_holds_adapters_at_their_rank_not_the_maximum(llama_dir: Path) -> None:
    """A budget of 4 rank-16 slots holds a single slot at --max-lora-rank 64: six rank-16
    adapters in one batch get 4 slots at a time (8 in the table), never more pages than that,
    and every request what it gets alone."""
    budget = 4 * per_slot_at(llama_dir, RANK) + 1
    cfg = dict(max_lora_rank=64, kv_cache_memory_bytes=16 << 20)
    e = Engine.from_pretrained(
        llama_dir, EngineConfig(max_active_adapters=8, adapter_memory_bytes=budget, **cfg)
    )
    ref = Engine.from_pretrained(llama_dir, EngineConfig(max_active_adapters=1, **cfg))
    slots = e.runner.slots
    assert slots.num_slots == 8 and slots.budget_bytes == budget
    ads = [random_adapter(e.model_config, f"rank16-{i}", seed=60 + i, rank=RANK) for i in range(6)]
    ps = prompts(6, seed=13)
    params = SamplingParams(max_new_tokens=4, ignore_eos_token=True)
    results = e.generate(ps, params, ads)
    assert [[t.id for t in r.tokens] for r in results] == [alone(ref, p, params, a) for p, a in zip(ps, ads)]
    assert slots.peak_taken == 4 and slots.loads == 6 and slots.in_use() == 0


def test_a_higher_rank_drops_idle_adapters_until_the_rest_fit(llama_dir: Path) -> None:
    """Four rank-4 adapters fill a budget of 4 slots at the table's rank 8 (2 at rank 16); a
    rank-16 adapter then reuses the least recently used slot and the two next idle ones are
    dropped, their pages handed back; the most recent one stays loaded, re-laid out at rank 16,
    and still gives what it gives alone."""
    budget = 4 * per_slot_at(llama_dir, 8) + 1
    cfg = dict(max_lora_rank=RANK, kv_cache_memory_bytes=16 << 20)
    e = Engine.from_pretrained(
        llama_dir, EngineConfig(max_active_adapters=8, adapter_memory_bytes=budget, **cfg)
    )
    ref = Engine.from_pretrained(llama_dir, EngineConfig(max_active_adapters=1, **cfg))
    slots, table = e.runner.slots, e.runner.lora
    assert slots.num_slots == 4
    params = SamplingParams(max_new_tokens=4, ignore_eos_token=True)
    small = [random_adapter(e.model_config, f"small-{i}", seed=80 + i) for i in range(4)]
    p = prompts(1, seed=17)[0]
    for a in small:
        alone(e, p, params, a)
    assert sum(table.written) == 4 and table.rank == 8
    big = random_adapter(e.model_config, "big", seed=90, rank=RANK)
    assert alone(e, p, params, big) == alone(ref, p, params, big)
    assert table.rank == RANK and sum(table.written) == 2 and len(slots.taken) == 2
    assert sorted(slots.active_keys()) == ["big", "small-3"] and slots.evictions == 3
    assert alone(e, p, params, small[3]) == alone(ref, p, params, small[3])
    assert slots.loads == 5  # small-3 was not loaded again


def test_budget_larger_than_needed_keeps_the_requested_count(llama_dir: Path) -> None:
    e = Engine.from_pretrained(
        llama_dir,
        EngineConfig(
            max_active_adapters=5,
            adapter_memory_bytes=64 << 20,
            max_lora_rank=RANK,
            kv_cache_memory_bytes=16 << 20,
        ),
    )
    assert e.limits.max_active_adapters == 5 and e.runner.slots.num_slots == 5


def test_adapters_arriving_mid_serving_take_free_slots_without_moving_the_table(llama_dir: Path) -> None:
    """A budget of many slots is reserved at start and filled as adapters arrive: the batch that
    loads six adapters into it gives every request what it gives alone (a reference engine of
    one slot), and loading them never re-allocates the table (its `generation`, which the native
    decode stack watches, stays)."""
    e = Engine.from_pretrained(
        llama_dir,
        EngineConfig(max_active_adapters=12, max_lora_rank=RANK, kv_cache_memory_bytes=16 << 20),
    )
    assert e.runner.slots.num_slots == 12 and e.runner.lora.a["qkv"].shape[1] == 12
    ref = Engine.from_pretrained(
        llama_dir, EngineConfig(max_active_adapters=1, max_lora_rank=RANK, kv_cache_memory_bytes=16 << 20)
    )
    ads = [random_adapter(e.model_config, f"grow-{i}", seed=20 + i) for i in range(6)]
    e.runner.lora.ensure_rank(max(a.max_rank for a in ads))
    generation = e.runner.lora.generation
    ps = prompts(7, seed=11)
    params = SamplingParams(max_new_tokens=4, ignore_eos_token=True)
    results = e.generate(ps, params, [*ads, None])
    assert [[t.id for t in r.tokens] for r in results] == [
        alone(ref, p, params, a) for p, a in zip(ps, [*ads, None])
    ]
    assert e.runner.lora.generation == generation and sum(e.runner.lora.written) == 6


def test_prepare_prefaults_the_slots_cold_adapters_will_take(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before a request is submitted, a worker thread takes the pages of the slot its adapter
    will load into: the lowest never-used free slot, the next one for a second adapter in
    flight, none for an adapter already resident or prepared, or when only used slots are left;
    a preparation whose request ended no longer holds its slot."""
    e = Engine.from_pretrained(
        llama_dir, EngineConfig(max_active_adapters=3, max_lora_rank=RANK, kv_cache_memory_bytes=16 << 20)
    )
    slots, calls = e.runner.slots, []
    monkeypatch.setattr(slots.table, "prefault", lambda slot, rank: calls.append((slot, rank)) or True)
    ads = [random_adapter(e.model_config, f"pre-{i}", seed=40 + i) for i in range(4)]
    slots.acquire(ads[0])  # slot 0, written
    slots.prepare(ads[0])  # resident: nothing
    slots.prepare(ads[1])
    slots.prepare(ads[1])  # its second request: the same slot, taken once
    assert calls == [(1, ads[1].max_rank)]
    slots.prepare(ads[2])
    slots.prepare(ads[3])  # slots 1 and 2 are being prepared; no fresh slot left
    assert calls == [(1, ads[1].max_rank), (2, ads[2].max_rank)]
    slots.unprepare(ads[1].key)  # its request ended before it loaded: slot 1 is free to guess again
    slots.prepare(ads[3])
    assert calls[-1] == (1, ads[3].max_rank)
