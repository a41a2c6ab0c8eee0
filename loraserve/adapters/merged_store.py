"""Serve `merged_adapters` requests: fetch every id, merge once, keep the result.

Every id goes through the normal adapter store on every request, so a private
adapter's token is checked even when its merge is already cached, and a new
revision of any input changes the cache key. The merge itself runs on a worker
thread (never on the event loop or the step loop), at most once per key at a
time: concurrent identical requests share one job. Merged adapters live in a
byte-bounded host LRU keyed by `MergeSpec.cache_key`, which is also the
adapter's `key`, so the engine gives each distinct merge one slot and batches
it beside plain adapters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Protocol

from loraserve.adapters.host_cache import HostAdapterCache
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.merge import MergeSpec, merge_adapters
from loraserve.adapters.single_flight import SingleFlight, await_shared
from loraserve.cpu_threads import helper_pool

DEFAULT_MERGED_CACHE_BYTES = 1 << 30


class AdapterFetcher(Protocol):
    """What `AdapterStore` offers: a fetched, validated adapter (auth checked per call)."""

    async def get(self, adapter_id: str, source: str | None, token: str | None) -> LoraAdapter: ...


class MergedAdapterStore:
    def __init__(
        self,
        store: AdapterFetcher,
        cache: HostAdapterCache | None = None,
        executor: Executor | None = None,
    ) -> None:
        self._store = store
        self.cache = cache if cache is not None else HostAdapterCache(DEFAULT_MERGED_CACHE_BYTES)
        # One worker: merges are CPU-bound tensor work; more threads would only fight the step loop.
        self._owns_executor = executor is None
        self._executor = executor if executor is not None else helper_pool(1, "merge")
        self._flight = SingleFlight(self._executor)
        self.merges_run = 0

    async def get_merged(self, spec: MergeSpec, source: str | None, token: str | None) -> LoraAdapter:
        """The merged adapter for `spec`; raises `MergeError` / `AdapterError` for the caller to map."""
        spec.validate()
        adapters = await self._fetch_all(spec.ids, source, token)
        if spec.is_single:
            return adapters[0]
        key = spec.cache_key([a.key for a in adapters])
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        fut, _ = self._flight.submit(key, self._merge_and_cache, adapters, spec, key)
        return await await_shared(fut)

    async def _fetch_all(
        self, ids: Sequence[str], source: str | None, token: str | None
    ) -> list[LoraAdapter]:
        unique = list(dict.fromkeys(ids))  # an id listed twice is fetched once
        fetched = await asyncio.gather(*(self._store.get(i, source, token) for i in unique))
        by_id = dict(zip(unique, fetched, strict=True))
        return [by_id[i] for i in ids]

    def _merge_and_cache(self, adapters: list[LoraAdapter], spec: MergeSpec, key: str) -> LoraAdapter:
        hit = self.cache.get(key)  # a job that finished just before this one was submitted
        if hit is not None:
            return hit
        merged = merge_adapters(adapters, spec, key)
        self.merges_run += 1
        self.cache.put(merged)
        return merged

    def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
