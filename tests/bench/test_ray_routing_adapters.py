"""bench/ray_routing.py's adapters load through the server's store (the benchmark itself needs Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.ray_routing import MODEL, make_adapters
from loraserve.adapters.store import local_adapter_store
from loraserve.models.config import ModelConfig


def test_generated_adapters_are_valid_distinct_peft_adapters(tmp_path: Path) -> None:
    paths = make_adapters(tmp_path, 2, rank=8)
    store = local_adapter_store(ModelConfig.from_dir(MODEL))
    first, second = (asyncio.run(store.get(str(p), "local")) for p in paths)
    assert first.rank == second.rank == 8 and len(first.modules) == 28  # 7 projections x 4 layers
    a = next(iter(first.modules.values()))
    b = second.modules[next(iter(first.modules))]
    assert not (a.a == b.a).all()
