"""The KV cache is sized from the workload (`--max-batch-total-tokens`), never from free memory.

Checked on the demo model (4 layers, 2 KV heads of 32: 2 KiB of fp32 KV per token): the engine's
reported capacity, the KV tensors actually allocated, and the start-up log all follow the flag.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from loraserve.engine import memory_plan
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.host_allocator import return_freed_memory
from tests.demo.cases import MODEL_DIR

PER_TOKEN = 2 * 4 * 2 * 32 * 4  # K and V, layers, KV heads, head_dim, fp32


@pytest.fixture
def no_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free memory must not enter the KV sizing: reading it fails the test."""

    def refuse(device: torch.device) -> int:
        raise AssertionError("the KV cache was sized from device memory")

    monkeypatch.setattr(memory_plan, "device_memory", refuse)


def _engine(**kw) -> Engine:
    return Engine.from_pretrained(
        MODEL_DIR, EngineConfig(adapter_memory_bytes=64 << 20, max_active_adapters=2, **kw)
    )


def _kv_tokens(engine: Engine) -> int:
    """Tokens the allocated KV tensors hold, null block excluded."""
    k, v = engine.runner.kv_caches[0]
    assert k.shape == v.shape
    return (k.shape[0] - 1) * k.shape[1]


@pytest.mark.parametrize("tokens", [1024, 3000, 8192])
def test_kv_reservation_follows_max_batch_total_tokens(
    tokens: int, no_device_memory: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="loraserve.engine.memory_plan"):
        engine = _engine(max_batch_total_tokens=tokens)
    want = -(-tokens // 16) * 16  # whole blocks of 16
    assert engine.limits.max_batch_total_tokens == want == _kv_tokens(engine)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    assert f"KV cache: {want} tokens (--max-batch-total-tokens) in {want // 16} blocks of 16" in line
    mib = float(re.search(r"([\d.]+) MiB", line).group(1))
    assert mib == pytest.approx((want + 16) * PER_TOKEN / 2**20, abs=0.05)  # + the null block
    assert f"{PER_TOKEN} bytes per token" in line


def test_default_is_a_few_full_sequences_not_free_memory(
    no_device_memory: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Demo model: context 512 -> max_total_tokens 512; 2 x 512 < the 4096-token prefill step."""
    with caplog.at_level(logging.INFO, logger="loraserve.engine.memory_plan"):
        engine = _engine()
    assert engine.limits.max_total_tokens == 512
    assert _kv_tokens(engine) == engine.limits.max_batch_total_tokens == 4096
    assert any("(default)" in r.getMessage() for r in caplog.records)
    longer = _engine(max_batch_prefill_tokens=512, max_total_tokens=512)
    assert _kv_tokens(longer) == memory_plan.DEFAULT_FULL_SEQUENCES * 512


def test_never_less_than_one_full_sequence(no_device_memory: None) -> None:
    assert _kv_tokens(_engine(max_batch_total_tokens=16)) == 512  # one max_total_tokens sequence


def test_an_explicit_byte_budget_is_filled_up_to_the_flag(no_device_memory: None) -> None:
    assert _kv_tokens(_engine(kv_cache_memory_bytes=6000 * PER_TOKEN)) == 6000
    capped = _engine(max_batch_total_tokens=1024, kv_cache_memory_bytes=6000 * PER_TOKEN)
    assert _kv_tokens(capped) == 1024


def test_adapter_slots_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="loraserve.engine.memory_plan"):
        engine = _engine(max_batch_total_tokens=1024)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("adapter slots:"))
    assert line.startswith(f"adapter slots: {engine.limits.max_active_adapters}, ")
    assert "at --max-lora-rank 64" in line


def test_return_freed_memory_is_safe_to_call() -> None:
    assert isinstance(return_freed_memory(), bool)
