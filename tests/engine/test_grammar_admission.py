"""Structured-output matchers are built on the admission path (engine/async_engine.py), off the
step loop: the step thread only advances matchers and fills masks."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.errors import RequestError
from loraserve.engine.grammar import GrammarCompiler
from loraserve.engine.params import ResponseFormat, SamplingParams
from tests.engine.test_grammar import SCHEMAS, check_json, constrained, engine, prompts


def test_matchers_are_built_off_the_step_loop(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built_on: list[str] = []
    build = GrammarCompiler.matcher

    def recording(self: GrammarCompiler, fmt: ResponseFormat):  # type: ignore[no-untyped-def]
        built_on.append(threading.current_thread().name)
        return build(self, fmt)

    monkeypatch.setattr(GrammarCompiler, "matcher", recording)
    aengine = AsyncEngine(engine(llama_dir))
    try:

        async def run() -> list[str]:
            async def one(i: int) -> str:
                text = ""
                async for out in aengine.generate(prompts(3)[i], constrained(SCHEMAS[i])):
                    if out.finished:
                        text = out.generated_text or ""
                return text

            return list(await asyncio.gather(*(one(i) for i in range(3))))

        texts = asyncio.run(run())
    finally:
        aengine.shutdown()
    for i, text in enumerate(texts):
        check_json(text, SCHEMAS[i])
    assert len(built_on) == 3 and "loraserve-step-loop" not in built_on, built_on


def test_a_bad_schema_is_refused_before_it_is_queued(llama_dir: Path) -> None:
    aengine = AsyncEngine(engine(llama_dir))
    try:

        async def run() -> None:
            params = SamplingParams(response_format=ResponseFormat("json_schema", {"type": "wat"}))
            async for _ in aengine.generate([1, 5, 6], params):
                pass

        with pytest.raises(RequestError, match="response_format"):
            asyncio.run(run())
        assert aengine.engine.num_waiting == 0 and not aengine.engine.has_unfinished()
    finally:
        aengine.shutdown()
