"""Launcher options read from environment variables, a static adapter, and 429 on overload."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.server import ServerProcess, start_server


@pytest.fixture(scope="module")
def strict_server(tiny_assets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model, adapters = tiny_assets
    env = {
        "MAX_CONCURRENT_REQUESTS": "1",
        "MAX_STOP_SEQUENCES": "1",
        "ADAPTER_ID": str(adapters["beta"]),
        "ADAPTER_SOURCE": "local",
        "MAX_TOTAL_TOKENS": "300",
        "MAX_INPUT_LENGTH": "100",
    }
    srv = start_server(model, tmp_path_factory.mktemp("strict"), env=env)
    srv.adapters = dict(adapters)
    yield srv
    srv.stop()


def test_env_vars_configure_the_server(strict_server: ServerProcess) -> None:
    info = httpx.get(strict_server.url + "/info").json()
    assert info["max_concurrent_requests"] == 1 and info["max_stop_sequences"] == 1
    assert info["max_total_tokens"] == 300 and info["max_input_length"] == 100
    assert info["adapter_id"] == str(strict_server.adapters["beta"])
    r = httpx.post(strict_server.url + "/generate", json={"inputs": "hi", "parameters": {"stop": ["a", "b"]}})
    assert r.status_code == 422 and "up to 1 stop" in r.json()["error"]


def test_static_adapter_applies_when_request_names_none(
    strict_server: ServerProcess, server: ServerProcess
) -> None:
    def text(srv: ServerProcess, **params) -> str:
        r = httpx.post(
            srv.url + "/generate",
            timeout=60,
            json={"inputs": "hello world", "parameters": {"max_new_tokens": 8, **params}},
        )
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]

    beta = text(server, adapter_id=str(server.adapters["beta"]))
    assert text(strict_server) == beta
    assert (
        text(strict_server, adapter_id=str(strict_server.adapters["alpha"]), adapter_source="local") != beta
    )


def test_overload_is_429_at_once(strict_server: ServerProcess) -> None:
    started = threading.Event()
    ended_at: list[float] = []

    def hold_slot() -> None:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 280, "ignore_eos_token": True}}
        with httpx.stream("POST", strict_server.url + "/generate_stream", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                started.set()
        ended_at.append(time.monotonic())

    t = threading.Thread(target=hold_slot)
    t.start()
    assert started.wait(60)
    r = httpx.post(
        strict_server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    )
    answered_at = time.monotonic()
    t.join(120)
    # The server frees the slot as it sends the stream's last event, a moment before this client
    # reads it: a probe answered 200 within that moment found the stream already over.
    if r.status_code == 200 and ended_at and ended_at[0] < answered_at + 0.5:
        pytest.skip("the streaming request finished before the probe; machine too fast for this check")
    assert r.status_code == 429 and r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    ok = httpx.post(
        strict_server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    )
    assert ok.status_code == 200
