"""Overload answers 429 at once; a client that leaves frees its KV blocks and adapter slot within a step or two."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import httpx
import pytest

from tests.fixtures.server import ServerProcess
from tests.reliability.metrics import gauges, is_idle, wait_for

LONG = 4000  # tokens: a request runs for thousands of steps (seconds) unless aborted
STEP_SLACK = 8  # steps the engine may still take between the client leaving and the abort landing...
ABORT_SLACK_S = 0.1  # ...or as many as it runs in this long, where steps are that short (tiny models)


def long_body(server: ServerProcess, adapter: str | None = "alpha", **extra: object) -> dict:
    params: dict = {"max_new_tokens": LONG, "ignore_eos_token": True, **extra}
    if adapter:
        params.update(adapter_id=str(server.adapters[adapter]), adapter_source="local")
    return {"inputs": "hello world", "parameters": params}


@pytest.mark.parametrize(
    "path,body",
    [
        ("/generate_stream", None),
        (
            "/v1/completions",
            {
                "model": "ALPHA",
                "prompt": "hello",
                "max_tokens": LONG,
                "stream": True,
                "ignore_eos_token": True,
            },
        ),
    ],
)
def test_closing_a_stream_frees_blocks_and_slot(
    small_server: ServerProcess, path: str, body: dict | None
) -> None:
    url = small_server.url
    assert is_idle(wait_for(url, is_idle))
    if body is None:
        body = long_body(small_server)
    else:
        body = {**body, "model": str(small_server.adapters["alpha"]), "adapter_source": "local"}
    with httpx.Client(timeout=60) as client, client.stream("POST", url + path, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = 0
        while seen < 3:
            if next(lines).startswith("data:"):
                seen += 1
        t0, first = time.perf_counter(), gauges(url)["steps"]
        time.sleep(0.2)
        busy = gauges(url)
        assert (
            busy["running"] == 1 and busy["slots_in_use"] == 1 and busy["free_blocks"] < busy["total_blocks"]
        )
        steps_at_close = busy["steps"]
        per_s = (steps_at_close - first) / (time.perf_counter() - t0)
    after = wait_for(url, is_idle, timeout=5)
    assert is_idle(after), after
    slack = max(STEP_SLACK, per_s * ABORT_SLACK_S)
    assert after["steps"] - steps_at_close <= slack, (steps_at_close, per_s, after)


def test_non_streaming_client_timeout_aborts_generation(small_server: ServerProcess) -> None:
    url = small_server.url
    assert is_idle(wait_for(url, is_idle))
    start = gauges(url)["steps"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/generate", json=long_body(small_server), timeout=0.25)
    gave_up = gauges(url)["steps"]
    after = wait_for(url, is_idle, timeout=5)
    assert is_idle(after), after
    assert after["steps"] - gave_up <= STEP_SLACK, (gave_up, after)
    assert after["steps"] - start < LONG  # it never ran to completion


def test_overload_is_429_at_once_and_service_resumes(small_server: ServerProcess) -> None:
    url = small_server.url
    assert is_idle(wait_for(url, is_idle))
    probes = [
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
        ("/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
        ("/", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
        ("/v1/completions", {"model": "", "prompt": "hi", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ),
    ]

    async def scenario() -> tuple[list[tuple[int, dict, float]], dict[str, float]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client, AsyncExitStack() as held:
            readers = []  # kept alive: a dropped line iterator closes its connection
            for i in range(4):  # fill every concurrency slot with a long stream
                body = long_body(small_server, adapter="alpha" if i % 2 else None)
                r = await held.enter_async_context(client.stream("POST", "/generate_stream", json=body))
                assert r.status_code == 200
                readers.append(r.aiter_lines())
                assert (await readers[-1].__anext__()).startswith('data:{"token"')

            async def probe(path: str, body: dict) -> tuple[int, dict, float]:
                t0 = time.monotonic()
                r = await client.post(path, json=body)
                try:
                    return r.status_code, r.json(), time.monotonic() - t0
                except ValueError:
                    return r.status_code, {"text": r.text[:100]}, time.monotonic() - t0

            results = await asyncio.gather(*[probe(p, b) for p, b in probes * 4])
            busy = gauges(url)
        return list(results), busy

    results, busy = asyncio.run(scenario())
    assert [s for s, _, _ in results] == [429] * len(results), (busy, results)
    assert busy["in_flight"] == 4
    for status, body, seconds in results:
        assert status == 429, body
        assert body.get("error_type") == "overloaded"
        assert seconds < 2.0  # refused at once, never queued behind the long streams
    assert is_idle(wait_for(url, is_idle, timeout=5))  # the closed streams and the 429s leaked nothing
    r = httpx.post(url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200, r.text
