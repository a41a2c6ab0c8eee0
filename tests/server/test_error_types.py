"""Engine errors are typed: a refusal is a 422, a failure while generating a 424, and anything
else (a bug) a 500 whose details go to the log, never to the client."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.errors import GenerationError, RequestError
from loraserve.server.app import build_state, create_app
from loraserve.server.config import ServerConfig


@pytest.fixture(scope="module")
def app_engine(llama_dir: Path):
    cfg = EngineConfig(kv_cache_memory_bytes=16 << 20, adapter_memory_bytes=16 << 20)
    aengine = AsyncEngine(Engine.from_pretrained(llama_dir, cfg))
    app = create_app(build_state(ServerConfig(model_id="tiny"), aengine))
    yield app, aengine.engine
    aengine.shutdown()


def post(app, body: dict) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/generate", json=body)

    return asyncio.run(go())


BODY = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}


@pytest.mark.parametrize(
    ("raised", "status", "shown"),
    [
        (RequestError("too long for this server"), 422, True),
        (GenerationError("the step broke"), 424, True),
        (ValueError("a bug's secret detail"), 500, False),
        (KeyError("another bug"), 500, False),
    ],
)
def test_engine_errors_map_by_type(
    app_engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, raised, status, shown
) -> None:
    app, engine = app_engine

    def fail(*args: object, **kwargs: object) -> str:
        raise raised

    monkeypatch.setattr(engine, "add_request", fail)
    with caplog.at_level(logging.ERROR):
        r = post(app, BODY)
    assert r.status_code == status
    detail = str(raised.args[0])
    assert (detail in r.json()["error"]) == shown
    prefix = {422: "Input validation error: ", 424: "Request failed during generation: "}.get(status, "")
    assert r.json()["error"].startswith(prefix) and (prefix or r.json()["error"] == "internal server error")
    if status == 500:
        assert any("request failed in the engine" in rec.getMessage() for rec in caplog.records)
    monkeypatch.undo()
    assert post(app, BODY).status_code == 200  # the server keeps serving
