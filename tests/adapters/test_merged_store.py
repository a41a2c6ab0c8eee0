"""MergedAdapterStore: fetch through the store every time, merge once per spec, share in-flight merges."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from loraserve.adapters import merged_store
from loraserve.adapters.errors import AdapterAuthError
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.merge import MergeError, MergeSpec, merge_adapters
from loraserve.adapters.merged_store import MergedAdapterStore
from loraserve.adapters.peft_format import parse_peft_adapter
from tests.adapters.merge_fixtures import build_assets


class LocalDirStore:
    """Stand-in for `AdapterStore`: real PEFT dirs, a token check on every call, counts fetches."""

    def __init__(self, dirs: dict[str, Path], private: dict[str, str]) -> None:
        self.dirs, self.private = dirs, private
        self.fetches: list[str] = []
        self._parsed: dict[str, LoraAdapter] = {}

    async def get(self, adapter_id: str, source: str | None, token: str | None) -> LoraAdapter:
        self.fetches.append(adapter_id)
        if adapter_id in self.private and token != self.private[adapter_id]:
            raise AdapterAuthError(f"adapter {adapter_id} needs a valid token")
        if adapter_id not in self._parsed:
            self._parsed[adapter_id] = parse_peft_adapter(
                self.dirs[adapter_id], key=f"{source}:{adapter_id}@r1"
            )
        await asyncio.sleep(0)
        return self._parsed[adapter_id]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_assets(tmp_path_factory.mktemp("mstore"))[1]


@pytest.fixture
def stores(dirs):
    store = LocalDirStore(dirs, private={"a3": "secret-token"})
    merged = MergedAdapterStore(store)
    yield store, merged
    merged.close()


SPEC = MergeSpec(ids=["a1", "a2"], weights=[0.4, 0.6], merge_strategy="ties", density=0.5)


def test_merges_once_and_serves_from_cache(stores) -> None:
    store, merged = stores

    async def go() -> tuple[LoraAdapter, LoraAdapter]:
        return await merged.get_merged(SPEC, "local", None), await merged.get_merged(SPEC, "local", None)

    first, second = asyncio.run(go())
    assert first is second and merged.merges_run == 1
    assert store.fetches == ["a1", "a2", "a1", "a2"]  # every request still goes through the store
    direct = merge_adapters([store._parsed["a1"], store._parsed["a2"]], SPEC, first.key)
    assert first.key == SPEC.cache_key(["local:a1@r1", "local:a2@r1"])
    for slot, m in direct.modules.items():
        assert (first.modules[slot].a == m.a).all() and (first.modules[slot].b == m.b).all()


def test_concurrent_identical_requests_share_one_merge(stores, monkeypatch: pytest.MonkeyPatch) -> None:
    _, merged = stores
    gate = threading.Event()
    real = merged_store.merge_adapters

    def slow_merge(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(merged_store, "merge_adapters", slow_merge)

    async def go() -> list[LoraAdapter]:
        tasks = [asyncio.create_task(merged.get_merged(SPEC, "local", None)) for _ in range(6)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    assert all(r is results[0] for r in results)
    assert merged.merges_run == 1


def test_private_input_needs_its_token_even_when_cached(stores) -> None:
    store, merged = stores
    spec = MergeSpec(ids=["a1", "a3"], weights=[1.0, 1.0])
    ok = asyncio.run(merged.get_merged(spec, "local", "secret-token"))
    assert ok.key in merged.cache
    with pytest.raises(AdapterAuthError) as e:
        asyncio.run(merged.get_merged(spec, "local", "wrong"))
    assert "secret-token" not in str(e.value)
    with pytest.raises(AdapterAuthError):
        asyncio.run(merged.get_merged(spec, "local", None))


def test_single_id_returns_the_plain_adapter(stores) -> None:
    store, merged = stores
    got = asyncio.run(merged.get_merged(MergeSpec(ids=["a1"], weights=[0.3]), "local", None))
    assert got is store._parsed["a1"] and merged.merges_run == 0


def test_duplicate_ids_are_fetched_once(stores) -> None:
    store, merged = stores
    spec = MergeSpec(ids=["a1", "a1"], weights=[0.5, 0.5], merge_strategy="dare_linear", density=0.5)
    asyncio.run(merged.get_merged(spec, "local", None))
    assert store.fetches == ["a1"]


def test_errors_are_raised_and_not_cached(stores) -> None:
    store, merged = stores
    with pytest.raises(MergeError, match="`density`"):
        asyncio.run(
            merged.get_merged(
                MergeSpec(ids=["a1", "a2"], weights=[1, 1], merge_strategy="ties", density=0.0), "local", None
            )
        )
    assert store.fetches == []  # a bad spec is refused before any download
    bad_ranks = MergeSpec(ids=["a1", "r4"], weights=[1.0, 1.0])
    for _ in range(2):
        with pytest.raises(MergeError, match="r=8.*r=4"):
            asyncio.run(merged.get_merged(bad_ranks, "local", None))
    assert len(merged.cache) == 0


# ---- with the real AdapterStore and a loopback hub -----------------------------

HUB_TOKEN = "hf_merge_secret_token_456"


def test_real_store_private_input_and_new_revision(make_store, fake_hub, tiny_llama, tmp_path) -> None:
    from tests.fixtures.tiny_models import make_peft_adapter

    pub = make_peft_adapter(tiny_llama, tmp_path / "pub", r=8, target_modules=("q_proj", "v_proj"), seed=21)
    priv = make_peft_adapter(
        tiny_llama, tmp_path / "priv", r=8, target_modules=("k_proj", "v_proj"), seed=22, lora_alpha=4
    )
    fake_hub.add_repo("org/pub", pub)
    fake_hub.add_repo("org/priv", priv, private=True, tokens=(HUB_TOKEN,))
    store = make_store(hub=fake_hub, auth_ttl_s=0.0)
    merged = MergedAdapterStore(store)
    spec = MergeSpec(ids=["org/pub", "org/priv"], weights=[0.5, 2.0], merge_strategy="dare_ties", density=0.7)
    try:
        first = asyncio.run(merged.get_merged(spec, "hub", HUB_TOKEN))
        assert first.target_modules == ("k_proj", "q_proj", "v_proj")
        assert {m.scale for m in first.modules.values()} == {16 / 8}  # org/pub's alpha/r
        assert asyncio.run(merged.get_merged(spec, None, HUB_TOKEN)) is first  # hub is the default source
        for token in (None, "hf_wrong"):
            with pytest.raises(AdapterAuthError) as e:
                asyncio.run(merged.get_merged(spec, "hub", token))
            assert HUB_TOKEN not in str(e.value)
        # A new commit of one input is a different merge under a different key.
        fake_hub.add_repo(
            "org/pub",
            make_peft_adapter(tiny_llama, tmp_path / "pub2", r=8, target_modules=("q_proj",), seed=23),
        )
        second = asyncio.run(merged.get_merged(spec, "hub", HUB_TOKEN))
        assert second.key != first.key and second.target_modules == ("k_proj", "q_proj", "v_proj")
        assert merged.merges_run == 2
    finally:
        merged.close()
