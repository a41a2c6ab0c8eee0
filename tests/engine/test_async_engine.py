"""AsyncEngine: the engine built and stepped on one thread, outputs delivered per step."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from loraserve.cpu_threads import helper_pool, use_one_omp_thread
from loraserve.engine.async_engine import AsyncEngine, _Throughput
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.errors import RequestError
from loraserve.engine.params import SamplingParams


def _params() -> SamplingParams:
    return SamplingParams(max_new_tokens=6, ignore_eos_token=True)


def test_factory_builds_the_engine_on_the_step_loop_thread(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built_on: list[str] = []
    stepped_on: set[tuple[int, str]] = set()  # (engine, thread) of every Engine.step
    step = Engine.step

    def recording_step(self: Engine) -> list:
        stepped_on.add((id(self), threading.current_thread().name))
        return step(self)

    monkeypatch.setattr(Engine, "step", recording_step)

    def factory() -> Engine:
        built_on.append(threading.current_thread().name)
        return Engine.from_pretrained(llama_dir, EngineConfig(kv_cache_memory_bytes=1 << 22))

    # The reference comes from an engine of its own. Calling `aengine.engine.generate` here
    # (as this test once did) steps that engine from this thread while the step loop steps it
    # too: whichever steps the loop stole were lost, 5 tokens of 6 under load (issue 14).
    want = factory().generate([[5, 6, 7]], _params())[0]
    assert len(want.tokens) == 6 and want.finish_reason == "length"
    built_on.clear()
    stepped_on.clear()

    aengine = AsyncEngine(factory=factory)
    try:
        assert built_on == ["loraserve-step-loop"]

        async def run() -> list[list[int]]:
            async def one() -> list[int]:
                ids: list[int] = []
                async for out in aengine.generate([5, 6, 7], _params()):
                    ids += [t.id for t in out.tokens]
                return ids

            return await asyncio.gather(*(one() for _ in range(5)))  # one delivery batch per step

        assert asyncio.run(run()) == [[t.id for t in want.tokens]] * 5
        # deterministic, whatever the timing: only the step loop ever stepped its engine
        assert stepped_on == {(id(aengine.engine), "loraserve-step-loop")}
    finally:
        aengine.shutdown()


def test_a_duplicate_request_id_fails_alone(llama_dir: Path) -> None:
    aengine = AsyncEngine(
        factory=lambda: Engine.from_pretrained(llama_dir, EngineConfig(kv_cache_memory_bytes=1 << 22))
    )
    try:

        async def run() -> tuple[int, BaseException | None]:
            async def first() -> int:
                n = 0
                async for out in aengine.generate(
                    [5, 6, 7], SamplingParams(max_new_tokens=60, ignore_eos_token=True), request_id="r"
                ):
                    n += len(out.tokens)
                return n

            async def second() -> BaseException | None:
                try:
                    async for _ in aengine.generate([5, 6, 7], _params(), request_id="r"):
                        pass
                except RequestError as e:
                    return e
                return None

            # both submitted before the 60-token request can finish; the refused duplicate used
            # to take its sink and then abort it by id, so it waited forever
            return tuple(await asyncio.wait_for(asyncio.gather(first(), second()), 30))

        n, err = asyncio.run(run())
        assert n == 60
        assert err is not None and "duplicate request id" in str(err)
    finally:
        aengine.shutdown()


def test_steps_lost_to_another_driver_are_reported(llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Driving the engine beside its step loop is a bug (issue 14): say so instead of dropping
    that request's outputs silently."""
    aengine = AsyncEngine(
        factory=lambda: Engine.from_pretrained(llama_dir, EngineConfig(kv_cache_memory_bytes=1 << 22))
    )
    try:
        with caplog.at_level(logging.ERROR, logger="loraserve.engine.async_engine"):
            aengine.engine.add_request([5, 6, 7], _params(), request_id="elsewhere")  # the misuse
            deadline = time.monotonic() + 30
            while aengine.engine.has_unfinished() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert not aengine.engine.has_unfinished()  # the step loop ran it, and nobody got its tokens
        assert any(
            "elsewhere" in r.getMessage() and "another thread" in r.getMessage() for r in caplog.records
        )
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


def test_step_observer_sees_every_forward_pass_and_first_admissions(llama_dir, monkeypatch) -> None:
    """The server's metrics observe forward passes through `Engine.step_observer`, not by
    wrapping engine internals: one record per forward call (a decode burst's counts its steps),
    each request admitted exactly once."""
    from loraserve.engine import decode_bursts
    from loraserve.engine.engine import Engine, EngineConfig
    from loraserve.engine.params import SamplingParams

    monkeypatch.setattr(decode_bursts, "BURST_SECONDS", 1e9)  # a burst however slow the steps
    engine = Engine.from_pretrained(llama_dir, EngineConfig(kv_cache_memory_bytes=16 << 20))
    records = []
    engine.step_observer = records.append
    results = engine.generate([[1, 5, 9], [1, 7]], SamplingParams(max_new_tokens=4, ignore_eos_token=True))
    assert sum(r.steps for r in records) == engine.steps and all(r.ok and r.seconds > 0 for r in records)
    assert any(r.steps > 1 for r in records)  # the last two tokens came in one burst
    admitted = [rid for r in records for rid in r.admitted]
    assert sorted(admitted) == sorted(r.request_id for r in results)
    assert records[0].kind == "prefill" and records[-1].kind == "decode"


def test_a_cold_adapters_slot_guess_ends_with_its_request(llama_dir: Path) -> None:
    """A request on a cold adapter has its slot's pages taken beforehand (AdapterSlots.prepare);
    when the request ends, finished or abandoned before its adapter loaded, that guess is
    dropped, so it cannot hold a slot out of later guesses."""
    from tests.engine.test_continuous_batching import random_adapter

    aengine = AsyncEngine(
        factory=lambda: Engine.from_pretrained(
            llama_dir, EngineConfig(kv_cache_memory_bytes=1 << 22, max_active_adapters=4)
        )
    )
    try:
        slots = aengine.engine.runner.slots
        done, dropped = (
            random_adapter(aengine.engine.model_config, f"guess-{i}", seed=60 + i) for i in range(2)
        )

        async def run() -> None:
            async for _ in aengine.generate([5, 6, 7], _params(), done):
                pass
            gen = aengine.generate(
                [5, 6, 7], SamplingParams(max_new_tokens=60, ignore_eos_token=True), dropped
            )
            await gen.__anext__()  # prepared, submitted, first token out
            await gen.aclose()  # the client goes away

        asyncio.run(run())
        assert done.key in slots.key_to_slot
        assert slots._prefaulted == {}
    finally:
        aengine.shutdown()


def test_throughput_is_the_tokens_after_the_windows_first_step_over_its_span() -> None:
    t = _Throughput(horizon=5.0)
    assert t.rate(100.0) == 0.0 and t.tokens_per_s == 0.0
    t.record(100.0, 7)
    assert t.rate(100.0) == 0.0  # one step: no span yet
    for i in range(1, 11):  # 2 tokens every 0.5 s
        t.record(100.0 + 0.5 * i, 2)
    assert t.rate(105.0) == pytest.approx(20 / 5.0)
    # steps older than the horizon leave the window: the first step's 7 tokens never count, and
    # after a burst the rate is the window's, not the whole history's
    for i in range(1, 5):
        t.record(105.0 + 0.25 * i, 10)
    assert t.rate(106.0) == pytest.approx((2 * 8 + 10 * 4) / (106.0 - 101.0))
    assert t.rate(111.5) == 0.0  # idle past the horizon: nothing is being generated
    t.record(200.0, 3)  # a long pause: the old window is gone
    assert t.rate(200.0) == 0.0
    now = time.monotonic()  # what `tokens_per_s` reads the window against
    t.record(now - 1.0, 4)
    t.record(now, 6)
    assert t.tokens_per_s == pytest.approx(6.0)
