"""Hundreds of distinct adapters cycled through a server with room for 8 on the device.

220 real PEFT adapters (written by PEFT's `save_pretrained`) sit on local disk.
The server keeps at most 8 in device slots (`--max-active-adapters 8`) and
about 9 in its host-memory LRU (`--adapter-host-cache-bytes`), so nearly
every request loads from disk, evicts from both tiers, and shares batches
with strangers. Every answer must equal what the engine alone generates with
that adapter, memory must stay bounded (slots, host-cache bytes, server RSS),
and adapters evicted long ago must come back correct.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.fixtures.memory import rss_mib
from tests.fixtures.peft_factory import PeftAdapterFactory
from tests.fixtures.server import ServerProcess, make_tiny_served_model, start_server

NUM_ADAPTERS = 220
ACTIVE = 8
RANK = 32  # big enough that leaking adapters would dwarf bounded caches (compiled kernels)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ("hello world", "the quick brown fox", "adapters change what", "many adapters share one batch")
MAX_NEW = 3
CONCURRENCY = 32
REVISITS = 30  # adapters asked for again after the whole cycle, long evicted from both tiers


@pytest.fixture(scope="module")
def scale_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("scale")
    model, _ = make_tiny_served_model(root, ())
    with PeftAdapterFactory(model, r=RANK, target_modules=MODULES) as factory:
        dirs = [factory.save(root / "adapters" / f"lora-{i:03d}", seed=1000 + i) for i in range(NUM_ADAPTERS)]
    return model, dirs


@pytest.fixture(scope="module")
def adapter_bytes(scale_assets: tuple[Path, list[Path]]) -> int:
    return parse_peft_adapter(scale_assets[1][0]).nbytes


@pytest.fixture(scope="module")
def oracle(scale_assets: tuple[Path, list[Path]]) -> list[list[int]]:
    """Greedy token ids of each adapter's request, run alone on the engine."""
    model, dirs = scale_assets
    engine = Engine.from_pretrained(
        model, EngineConfig(max_batch_total_tokens=256, max_active_adapters=1, num_threads=1)
    )
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos_token=True)
    return [
        [
            t.id
            for t in engine.generate([PROMPTS[i % len(PROMPTS)]], params, [parse_peft_adapter(d)])[0].tokens
        ]
        for i, d in enumerate(dirs)
    ]


@pytest.fixture(scope="module")
def server(
    scale_assets: tuple[Path, list[Path]], adapter_bytes: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    model, dirs = scale_assets
    srv = start_server(
        model,
        tmp_path_factory.mktemp("scale-logs"),
        "--adapter-source",
        "local",
        "--local-adapter-roots",
        str(dirs[0].parent),
        "--max-active-adapters",
        str(ACTIVE),
        "--adapter-host-cache-bytes",
        str(host_budget(adapter_bytes)),
        "--max-concurrent-requests",
        "64",
    )
    yield srv
    srv.stop()


def host_budget(adapter_bytes: int) -> int:
    return int(9.5 * adapter_bytes)


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


async def ask_all(url: str, dirs: list[Path], order: list[int]) -> dict[int, list[int] | str]:
    """Each adapter's token ids (or the error text), CONCURRENCY requests in flight at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)
    answers: dict[int, list[int] | str] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "inputs": PROMPTS[i % len(PROMPTS)],
            "parameters": {
                "adapter_id": str(dirs[i]),
                "adapter_source": "local",
                "max_new_tokens": MAX_NEW,
                "ignore_eos_token": True,
                "details": True,
            },
        }
        async with gate:
            r = await client.post("/generate", json=body)
        answers[i] = [t["id"] for t in r.json()["details"]["tokens"]] if r.status_code == 200 else r.text

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(client, i) for i in order))
    return answers


def test_hundreds_of_adapters_through_eight_slots(
    server: ServerProcess, scale_assets: tuple[Path, list[Path]], oracle: list[list[int]], adapter_bytes: int
) -> None:
    _, dirs = scale_assets
    assert len({tuple(o) for o in oracle}) > NUM_ADAPTERS // 2  # the adapters really differ
    rng = random.Random(7)
    # warm long enough that the server's kernel caches (oneDNN compiles one kernel per matmul
    # shape and row bucket, a bounded set) have seen the batch sizes this traffic produces
    warm = list(range(48))
    assert asyncio.run(ask_all(server.url, dirs, warm)) == {i: oracle[i] for i in warm}
    rss_warm = rss_mib(server.proc.pid)

    order = list(range(48, NUM_ADAPTERS))
    rng.shuffle(order)
    answers = asyncio.run(ask_all(server.url, dirs, order))
    wrong = [i for i in order if answers[i] != oracle[i]]
    assert not wrong, [(i, answers[i], oracle[i]) for i in wrong[:5]]

    revisit = rng.sample(range(NUM_ADAPTERS), REVISITS)
    again = asyncio.run(ask_all(server.url, dirs, revisit))
    assert again == {i: oracle[i] for i in revisit}

    m = metrics(server.url)
    rss_end = rss_mib(server.proc.pid)
    print(
        f"\nscale: {NUM_ADAPTERS} adapters of {adapter_bytes} bytes, RSS {rss_warm:.0f} -> {rss_end:.0f} MiB, "
        f"slot loads {m['loraserve_engine_adapter_loads_total']:.0f}, host evictions "
        f"{m['loraserve_adapter_cache_host_evictions_total']:.0f}"
    )
    # Device tier: never more than 8 adapters resident, every slot released, slots reused.
    assert m["loraserve_engine_adapter_slots"] == ACTIVE
    assert m["loraserve_engine_active_adapters"] <= ACTIVE
    assert m["loraserve_engine_adapter_slots_in_use"] == 0
    # Revisits may find one of the last 8 adapters still resident; every other request loads a slot.
    assert m["loraserve_engine_adapter_loads_total"] >= NUM_ADAPTERS + REVISITS - ACTIVE
    assert m["loraserve_engine_adapter_evictions_total"] == m["loraserve_engine_adapter_loads_total"] - ACTIVE
    # Host tier: bounded by its byte budget, so most adapters were evicted and reloaded from disk.
    assert m["loraserve_adapter_cache_host_bytes"] <= host_budget(adapter_bytes)
    assert m["loraserve_adapter_cache_host_entries"] <= 9
    assert m["loraserve_adapter_cache_host_evictions_total"] >= NUM_ADAPTERS - 9
    assert m["loraserve_adapter_cache_loads_total"] >= NUM_ADAPTERS + REVISITS - 9
    assert m["loraserve_engine_free_blocks"] == m["loraserve_engine_total_blocks"]
    # Everything loaded adds up to several times what the server may keep; RSS grows far less.
    loaded_mib = m["loraserve_adapter_cache_loaded_bytes_total"] / 2**20
    assert loaded_mib > 40
    assert rss_end - rss_warm < loaded_mib / 2, (rss_warm, rss_end, loaded_mib)
