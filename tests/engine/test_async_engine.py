"""AsyncEngine: the engine built and stepped on one thread, outputs delivered per step."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from loraserve.cpu_threads import helper_pool, use_one_omp_thread
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams


def test_factory_builds_the_engine_on_the_step_loop_thread(llama_dir: Path) -> None:
    built_on: list[str] = []

    def factory() -> Engine:
        built_on.append(threading.current_thread().name)
        return Engine.from_pretrained(llama_dir, EngineConfig(kv_cache_memory_bytes=1 << 22))

    aengine = AsyncEngine(factory=factory)
    try:
        assert built_on == ["loraserve-step-loop"]
        want = aengine.engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos_token=True))

        async def run() -> list[list[int]]:
            async def one() -> list[int]:
                ids: list[int] = []
                async for out in aengine.generate(
                    [5, 6, 7], SamplingParams(max_new_tokens=6, ignore_eos_token=True)
                ):
                    ids += [t.id for t in out.tokens]
                return ids

            return await asyncio.gather(*(one() for _ in range(5)))  # one delivery batch per step

        assert asyncio.run(run()) == [[t.id for t in want[0].tokens]] * 5
    finally:
        aengine.shutdown()


def test_factory_errors_reach_the_caller() -> None:
    def factory() -> Engine:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(factory=factory)
    with pytest.raises(ValueError, match="exactly one"):
        AsyncEngine()


def test_helper_threads_run_tensor_work_single_threaded() -> None:
    """Threads beside the step loop must not start OpenMP pools of their own (see cpu_threads)."""
    before = torch.get_num_threads()
    with helper_pool(1, "t") as pool:
        in_helper = pool.submit(torch.get_num_threads).result()
    if before > 1 and use_one_omp_thread():  # libgomp is here (Linux builds of torch)
        assert in_helper == 1
        torch.set_num_threads(before)  # undo for this (main) thread
    assert torch.get_num_threads() == before  # per thread: the caller keeps its own setting
