"""`AdapterStore` behaviour independent of the source: single-flight, LRU bound, retries, loop safety."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.peft_format import parse_peft_adapter
from tests.adapters.adapter_asserts import assert_same_weights


def _copies(src, root, n):
    return [shutil.copytree(src, root / f"lora-{i}") for i in range(n)]


def test_concurrent_gets_share_one_download(make_store, fake_hub, peft_adapters):
    fake_hub.add_repo("org/popular", peft_adapters["all"])
    store = make_store(hub=fake_hub)

    async def many():
        return await asyncio.gather(*(store.get("org/popular", None, None) for _ in range(16)))

    adapters = asyncio.run(many())
    assert len({id(a) for a in adapters}) == 1
    assert fake_hub.count("GET", "/api/models/") == 1  # one metadata call
    assert fake_hub.count("GET", "/resolve/") == 2  # one download of config + weights
    assert store.stats()["loads"] == 1


def test_host_lru_is_bounded_by_bytes(make_store, peft_adapters, tmp_path):
    one = parse_peft_adapter(peft_adapters["qv"]).nbytes
    dirs = _copies(peft_adapters["qv"], tmp_path, 6)
    store = make_store(host_cache_bytes=int(2.5 * one))

    async def cycle():
        for d in dirs:
            await store.get(str(d), "local", None)
            assert store.stats()["host_bytes"] <= int(2.5 * one)

    asyncio.run(cycle())
    stats = store.stats()
    assert stats["host_entries"] == 2 and stats["host_evictions"] == 4 and stats["loads"] == 6
    asyncio.run(store.get(str(dirs[-1]), "local", None))  # most recent: still cached
    assert store.stats()["loads"] == 6 and store.stats()["hits"] == 1
    asyncio.run(store.get(str(dirs[0]), "local", None))  # evicted: loaded again
    assert store.stats()["loads"] == 7


def test_adapter_bigger_than_budget_is_served_not_cached(make_store, peft_adapters):
    store = make_store(host_cache_bytes=10)
    adapter = asyncio.run(store.get(str(peft_adapters["qv"]), "local", None))
    assert_same_weights(adapter, peft_adapters["qv"])
    assert store.stats()["host_entries"] == 0 and store.stats()["host_bytes"] == 0


def test_failed_load_is_not_cached_and_retry_succeeds(make_store, peft_adapters, tmp_path):
    d = tmp_path / "flaky"
    d.mkdir()
    shutil.copy(peft_adapters["qv"] / "adapter_config.json", d)
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    store = make_store()
    with pytest.raises(AdapterError, match="corrupt") as e:
        asyncio.run(store.get(str(d), "local", None))
    assert e.value.status_code == 400 and store.stats()["load_failures"] == 1
    shutil.copy(peft_adapters["qv"] / "adapter_model.safetensors", d)  # files fixed
    assert_same_weights(asyncio.run(store.get(str(d), "local", None)), peft_adapters["qv"])
    assert store.stats()["loads"] == 1


def test_hub_failure_then_retry(make_store, fake_hub, peft_adapters):
    store = make_store(hub=fake_hub, auth_ttl_s=0.0)
    with pytest.raises(AdapterError):
        asyncio.run(store.get("org/later", None, None))
    fake_hub.add_repo("org/later", peft_adapters["mlp"])
    assert_same_weights(asyncio.run(store.get("org/later", None, None)), peft_adapters["mlp"])


def test_event_loop_keeps_running_during_load(make_store, fake_hub, peft_adapters, monkeypatch):
    """Loads happen on worker threads: the loop keeps ticking while one is slow."""
    fake_hub.add_repo("org/slow", peft_adapters["qv"])
    store = make_store(hub=fake_hub)
    hub_source = store.sources["hub"]
    real_fetch = hub_source.fetch

    def slow_fetch(resolved, token):
        time.sleep(0.5)
        return real_fetch(resolved, token)

    monkeypatch.setattr(hub_source, "fetch", slow_fetch)

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        await store.get("org/slow", None, None)
        t.cancel()
        return ticks

    assert asyncio.run(run()) >= 20


def test_cancelled_waiter_does_not_cancel_shared_load(make_store, fake_hub, peft_adapters, monkeypatch):
    fake_hub.add_repo("org/shared", peft_adapters["qv"])
    store = make_store(hub=fake_hub)
    real_fetch = store.sources["hub"].fetch
    monkeypatch.setattr(store.sources["hub"], "fetch", lambda r, t: (time.sleep(0.3), real_fetch(r, t))[1])

    async def run():
        first = asyncio.create_task(store.get("org/shared", None, None))
        second = asyncio.create_task(store.get("org/shared", None, None))
        await asyncio.sleep(0.1)
        first.cancel()  # a client disconnects mid-load
        return await second

    assert_same_weights(asyncio.run(run()), peft_adapters["qv"])
    assert store.stats()["loads"] == 1


def test_bad_arguments(make_store):
    store = make_store()
    with pytest.raises(AdapterError, match="unknown adapter_source"):
        asyncio.run(store.get("x", "ftp", None))
    with pytest.raises(AdapterError, match="empty"):
        asyncio.run(store.get("", None, None))
    with pytest.raises(ValueError):
        store.default_source = "ftp"


def test_default_source_and_blocking_api(make_store, peft_adapters):
    store = make_store(default_source="local")
    adapter = store.get_blocking(str(peft_adapters["mlp"]))
    assert_same_weights(adapter, peft_adapters["mlp"])
    assert asyncio.run(store.get(str(peft_adapters["mlp"]))) is adapter
    assert store.stats()["hits"] == 1
