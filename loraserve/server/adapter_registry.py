"""Where the server gets `LoraAdapter`s from.

`AdapterProvider` is the interface of `loraserve.adapters.store.AdapterStore`;
`LocalDirAdapterProvider` is a minimal stand-in (local directories only: PEFT LoRA,
Medusa heads, or both)
used when that store is unavailable. `AdapterRegistry` adds what only the
server knows: the static `--adapter-id`, preloaded adapters reachable by their
bare id, the list `/v1/models` reports, and per-request merges
(`merged_adapters`), whose inputs are fetched exactly like a request's own
`adapter_id`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from loraserve.adapters.errors import AdapterError, AdapterNotFoundError
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.medusa_format import is_adapter_dir, parse_adapter_dir, validate_medusa
from loraserve.adapters.merge import BASE_MODEL_ADAPTER_ID, MergeSpec
from loraserve.adapters.merged_store import MergedAdapterStore
from loraserve.adapters.validation import validate_adapter
from loraserve.models.config import ModelConfig


class AdapterProvider(Protocol):
    async def get(
        self, adapter_id: str, source: str, token: str | None, revision: str | None = None
    ) -> LoraAdapter: ...


class LocalDirAdapterProvider:
    """Reads adapter directories (LoRA, Medusa or both) from disk and keeps them in host memory."""

    def __init__(self, model_config: ModelConfig | None = None) -> None:
        self._model_config = model_config
        self._cache: dict[str, LoraAdapter] = {}
        self._lock = asyncio.Lock()
        self.counts: Counter[str] = Counter()

    async def get(
        self, adapter_id: str, source: str, token: str | None, revision: str | None = None
    ) -> LoraAdapter:
        if source != "local":
            raise AdapterError(
                f"adapter source {source!r} is not available in this server build; use `local`"
            )
        path = Path(adapter_id).expanduser()
        key = f"local:{path.resolve()}"
        async with self._lock:
            if key in self._cache:
                self.counts["hits"] += 1
                return self._cache[key]
            self.counts["misses"] += 1
            if not is_adapter_dir(path):
                raise AdapterNotFoundError(
                    f"no PEFT LoRA adapter or Medusa heads found at local path {adapter_id!r}"
                )
            adapter = await asyncio.to_thread(parse_adapter_dir, path, key)
            if self._model_config is not None:
                if adapter.medusa is not None:
                    validate_medusa(adapter.medusa, self._model_config)
                validate_adapter(adapter, self._model_config)
            self._cache[key] = adapter
            self.counts["loads"] += 1
            return adapter

    def stats(self) -> dict[str, Any]:
        return {
            "hits": self.counts["hits"],
            "misses": self.counts["misses"],
            "loads": self.counts["loads"],
            "cached": len(self._cache),
        }


class AdapterRegistry:
    """Resolves a request's adapter and remembers which adapters this server has served."""

    def __init__(
        self,
        provider: AdapterProvider,
        default_source: str,
        static_adapter_id: str | None = None,
        static_adapter_source: str | None = None,
    ) -> None:
        self.provider = provider
        self.default_source = default_source
        self.static_adapter_id = static_adapter_id
        self.static_adapter_source = static_adapter_source or default_source
        self._preloaded: dict[str, LoraAdapter] = {}
        self.preload_token: str | None = None  # --predibase-api-token, for adapters loaded at start
        self.loaded_ids: dict[str, None] = {}  # ordered set of ids served so far
        self.merged = MergedAdapterStore(_MergeInputs(self))

    async def preload(self, adapter_ids: list[str], source: str) -> None:
        ids = list(adapter_ids)
        if self.static_adapter_id:
            ids.insert(0, self.static_adapter_id)
        for adapter_id in ids:
            src = self.static_adapter_source if adapter_id == self.static_adapter_id else source
            adapter = await self.provider.get(adapter_id, src, self.preload_token if src == "pbase" else None)
            self._preloaded[adapter_id] = adapter
            self.loaded_ids[adapter_id] = None

    async def resolve(
        self, adapter_id: str | None, source: str | None, token: str | None
    ) -> LoraAdapter | None:
        """`None` means the base model (or the static adapter when the server has one).

        A Medusa-only static adapter is the engine's default speculator already, so
        requests without an adapter run on the base model (`None`) and it drafts for them.
        """
        if not adapter_id:
            if not self.static_adapter_id:
                return None
            static = self._preloaded.get(self.static_adapter_id)
            if static is not None and static.medusa is not None and not static.modules:
                return None
            return static
        if source is None and adapter_id in self._preloaded:
            return self._preloaded[adapter_id]
        adapter = await self.provider.get(adapter_id, source or self.default_source, token)
        self.loaded_ids[adapter_id] = None
        return adapter

    async def resolve_merged(
        self, spec: MergeSpec, source: str | None, token: str | None
    ) -> LoraAdapter | None:
        """The merged adapter (named by its merge cache key, so equal specs share an engine slot).

        Raises `AdapterError` (a `MergeError`, 422, for different ranks).
        """
        if spec.is_single and spec.ids[0] == BASE_MODEL_ADAPTER_ID:
            return None  # LoRAX's pseudo adapter for "no adapter"
        return await self.merged.get_merged(spec, source, token)

    def close(self) -> None:
        self.merged.close()
        close = getattr(self.provider, "close", None)
        if callable(close):
            close()

    def stats(self) -> dict[str, Any]:
        stats = getattr(self.provider, "stats", None)
        out = dict(stats()) if callable(stats) else {}
        out["merges_run"] = self.merged.merges_run
        out["merged_cached"] = len(self.merged.cache)
        return out


class _MergeInputs:
    """Fetches each id of a merge the way `AdapterRegistry.resolve` fetches a request's adapter.

    So preloaded bare ids, the default source and the caller's token behave the
    same inside `merged_adapters` as in `adapter_id`.
    """

    def __init__(self, registry: AdapterRegistry) -> None:
        self._registry = registry

    async def get(self, adapter_id: str, source: str | None, token: str | None) -> LoraAdapter:
        adapter = await self._registry.resolve(adapter_id, source, token)
        if adapter is None:  # only an empty id resolves to nothing; the spec forbids those
            raise AdapterNotFoundError(f"no adapter for id {adapter_id!r}")
        return adapter
