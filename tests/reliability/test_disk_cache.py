"""Issue 17, item 3: the disk cache of downloaded adapters has a byte budget and LRU eviction.

End to end through a real server, the moto S3 peer and the loopback hub: downloads beyond
`--adapter-disk-cache-bytes` delete the least recently used adapters, the newest stays, and an
evicted adapter is simply fetched again. The cache itself is checked directly for what a server
cannot show deterministically: an entry being loaded is never deleted, and the index survives a
restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraserve.adapters.disk_cache import AdapterDiskCache, directory_bytes
from tests.fixtures.fake_pbase import FakePredibase
from tests.fixtures.server import ServerProcess, start_server
from tests.reliability.assets import Assets
from tests.reliability.stack import BUCKET, MAX_NEW, PROMPTS, Peers, server_env

N = 4
PB_TOKEN = "pb-disk-cache-test-token"


@pytest.fixture(scope="module")
def entry_bytes(assets: Assets) -> int:
    return directory_bytes(assets.good["gamma"])


@pytest.fixture(scope="module")
def gateway() -> Iterator[FakePredibase]:
    fake = FakePredibase().start()
    fake.tokens.add(PB_TOKEN)
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def bounded(
    assets: Assets,
    peers: Peers,
    gateway: FakePredibase,
    entry_bytes: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, Path]]:
    for i in range(N):
        peers.s3.upload_dir(assets.good["gamma"], BUCKET, f"disk-{i}")
        peers.hub.add_repo(f"acme/disk-{i}", assets.good["delta"])
        peers.s3.upload_dir(assets.good["gamma"], BUCKET, f"pbase/disk-{i}/1")
        gateway.add_v2(f"disk-{i}", "1", f"s3://{BUCKET}/pbase/disk-{i}/1")
    logs = tmp_path_factory.mktemp("disk-cache-server")
    cache = logs / "cache"
    srv = start_server(
        assets.model,
        logs,
        "--adapter-cache-dir",
        str(cache),
        "--adapter-disk-cache-bytes",
        str(entry_bytes * 3 // 2),  # room for one adapter and a half: every second download evicts
        "--adapter-disk-cache-grace-s",
        "0",  # requests follow each other at once here: no grace, or nothing could be evicted
        "--adapter-host-cache-bytes",
        "1",  # nothing stays parsed in memory, so each request goes back to the disk cache
        env={**server_env(peers, cache), "PREDIBASE_GATEWAY_ENDPOINT": gateway.url},
    )
    yield srv, cache
    srv.stop()


def generate(srv: ServerProcess, adapter_id: str, source: str) -> None:
    params = {"max_new_tokens": MAX_NEW, "adapter_id": adapter_id, "adapter_source": source}
    if source == "pbase":
        params["api_token"] = PB_TOKEN
    r = httpx.post(srv.url + "/generate", json={"inputs": PROMPTS[0], "parameters": params}, timeout=60)
    assert r.status_code == 200, r.text


def entries(root: Path, pattern: str) -> dict[str, int]:
    if not root.is_dir():
        return {}
    found = [
        p for p in root.glob(pattern) if p.is_dir() and ".tmp-" not in p.name and ".evicted-" not in p.name
    ]
    return {p.name: directory_bytes(p) for p in found}


@pytest.mark.parametrize("source", ["s3", "hub", "pbase"])
def test_downloads_beyond_the_budget_evict_the_least_recently_used(
    bounded: tuple[ServerProcess, Path], entry_bytes: int, source: str
) -> None:
    srv, cache = bounded
    root, pattern = (cache / "hf", "models--acme--disk-*") if source == "hub" else (cache / "s3", "*")
    ids = {
        "s3": [f"s3://{BUCKET}/disk-{i}" for i in range(N)],
        "hub": [f"acme/disk-{i}" for i in range(N)],
        "pbase": [f"disk-{i}/1" for i in range(N)],  # fetched from S3: shares the s3 budget and folder
    }[source]
    budget = entry_bytes * 3 // 2
    for adapter_id in ids:
        generate(srv, adapter_id, source)
        kept = entries(root, pattern)
        assert len(kept) == 1, kept  # one adapter and a half fit: the older one was evicted
        assert sum(kept.values()) <= max(budget, max(kept.values()))
    generate(srv, ids[0], source)  # an evicted adapter is fetched again
    assert len(entries(root, pattern)) == 1
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in httpx.get(srv.url + "/metrics", timeout=30).text.splitlines()
        if line.startswith("loraserve_adapter_disk_cache_")
    }
    assert metrics["loraserve_adapter_disk_cache_evictions_total"] >= N
    assert 0 < metrics["loraserve_adapter_disk_cache_bytes"] <= 2 * budget


def make_entry(root: Path, name: str, size: int) -> Path:
    d = root / "s3" / name
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x" * size)
    return d


def test_an_entry_in_use_is_never_evicted(tmp_path: Path) -> None:
    cache = AdapterDiskCache(tmp_path, max_bytes=250, grace_s=0)
    a, b, c = (make_entry(tmp_path, n, 100) for n in "abc")
    cache.record(a)
    with cache.using(a):  # a load of `a` is in progress
        cache.record(b)
        cache.record(c)  # 300 bytes > 250: `a` is the least recent but pinned; `b` goes
        assert a.is_dir() and not b.exists() and c.is_dir()
        cache.record(make_entry(tmp_path, "d", 100))
        assert a.is_dir() and not c.exists()
    assert cache.nbytes <= 250 and a.is_dir()  # `a` was just used: now the most recent


def test_an_entry_just_fetched_is_kept_for_the_grace_period(tmp_path: Path) -> None:
    """The store parses files after `fetch()` returned (no pin any more): the grace covers that."""
    cache = AdapterDiskCache(tmp_path, max_bytes=150, grace_s=0.5)
    a, b = make_entry(tmp_path, "a", 100), make_entry(tmp_path, "b", 100)
    cache.record(a)
    cache.record(b)
    assert a.is_dir() and b.is_dir()  # over budget, but `a` was fetched a moment ago
    time.sleep(0.6)
    cache.record(make_entry(tmp_path, "c", 10))
    assert not a.exists() and b.is_dir()


def test_the_newest_entry_stays_even_over_budget(tmp_path: Path) -> None:
    cache = AdapterDiskCache(tmp_path, max_bytes=50, grace_s=0)
    a, b = make_entry(tmp_path, "a", 100), make_entry(tmp_path, "b", 100)
    cache.record(a)
    assert a.is_dir()
    cache.record(b)
    assert b.is_dir() and not a.exists()


def test_the_index_survives_a_restart(tmp_path: Path) -> None:
    cache = AdapterDiskCache(tmp_path, max_bytes=1000)
    hub_folder = tmp_path / "elsewhere" / "models--org--name"  # outside the cache dir, like HF_HUB_CACHE
    hub_folder.mkdir(parents=True)
    (hub_folder / "blob").write_bytes(b"y" * 400)
    cache.record(hub_folder)
    s3_entry = make_entry(tmp_path, "s3-entry", 400)
    cache.record(s3_entry)
    again = AdapterDiskCache(tmp_path, max_bytes=500, grace_s=0)
    assert set(again.entries()) == {str(hub_folder), str(s3_entry)}
    again.record(make_entry(tmp_path, "new", 100))
    assert not hub_folder.exists() and s3_entry.is_dir()  # the least recently used went first
    assert again.nbytes <= 500


def test_leftovers_of_an_interrupted_eviction_are_removed_at_start(tmp_path: Path) -> None:
    leftover = make_entry(tmp_path, "abc.evicted-1-2", 10)
    kept = make_entry(tmp_path, "abc", 10)
    cache = AdapterDiskCache(tmp_path, max_bytes=1000)
    assert not leftover.exists() and cache.entries() == [str(kept)]


def test_zero_means_unbounded(tmp_path: Path) -> None:
    cache = AdapterDiskCache(tmp_path, max_bytes=0)
    made = [make_entry(tmp_path, str(i), 1000) for i in range(5)]
    for d in made:
        cache.record(d)
    assert all(d.is_dir() for d in made)
