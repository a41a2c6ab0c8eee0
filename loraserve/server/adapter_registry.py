"""Where the server gets `LoraAdapter`s from.

`AdapterProvider` is the interface of `loraserve.adapters.store.AdapterStore`,
the one adapter-loading path (a server without remote sources uses
`local_adapter_store`, the same store with only the `local` source).
`AdapterRegistry` adds what only the server knows: the static `--adapter-id`,
preloaded adapters reachable by their bare id, the list `/v1/models` reports,
and per-request merges (`merged_adapters`), whose inputs are fetched exactly
like a request's own `adapter_id`.
"""

from __future__ import annotations

from typing import Any, Protocol

from loraserve.adapters.errors import AdapterNotFoundError
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.merge import BASE_MODEL_ADAPTER_ID, MergeSpec
from loraserve.adapters.merged_store import MergedAdapterStore


class AdapterProvider(Protocol):
    async def get(
        self, adapter_id: str, source: str, token: str | None, revision: str | None = None
    ) -> LoraAdapter: ...


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
        self._preloaded_source: dict[str, str] = {}  # the source each preloaded id was loaded from
        self.preload_token: str | None = None  # --predibase-api-token, for adapters loaded at start
        self.merged = MergedAdapterStore(_MergeInputs(self))

    @property
    def preloaded_ids(self) -> list[str]:
        """Ids loaded at start (bounded by the command line; served ids are never collected
        here: every spelling a caller invents would grow it forever)."""
        return list(self._preloaded)

    async def preload(self, adapter_ids: list[str], source: str) -> None:
        ids = list(adapter_ids)
        if self.static_adapter_id:
            ids.insert(0, self.static_adapter_id)
        for adapter_id in ids:
            src = self.static_adapter_source if adapter_id == self.static_adapter_id else source
            adapter = await self.provider.get(adapter_id, src, self.preload_token if src == "pbase" else None)
            self._preloaded[adapter_id] = adapter
            self._preloaded_source[adapter_id] = src

    async def resolve(
        self, adapter_id: str | None, source: str | None, token: str | None
    ) -> LoraAdapter | None:
        """`None` means the base model (or the static adapter when the server has one).

        A Medusa-only static adapter is the engine's default speculator already, so
        requests without an adapter run on the base model (`None`) and it drafts for them.

        A preloaded adapter named by its bare id is served from memory only when its
        source has no per-request authorisation (`local`, `s3`) or it is the static
        `--adapter-id`, which every request without an adapter gets anyway. Adapters of
        private sources (`hub`, `pbase`) go through the store's token check on every
        request, preloaded or not, inside `merged_adapters` too (see `_MergeInputs`).
        """
        if not adapter_id:
            if not self.static_adapter_id:
                return None
            static = self._preloaded.get(self.static_adapter_id)
            if static is not None and static.medusa is not None and not static.modules:
                return None
            return static
        if source is None and adapter_id in self._preloaded:
            src = self._preloaded_source[adapter_id]
            if adapter_id == self.static_adapter_id or not self._checks_auth(src):
                return self._preloaded[adapter_id]
            # Preloading used the server's own credentials (--predibase-api-token); the caller must
            # still prove access with theirs, as for any adapter of that source. The store keeps
            # the weights in host memory, so this costs the auth call only.
            return await self.provider.get(adapter_id, src, token)
        return await self.provider.get(adapter_id, source or self.default_source, token)

    def _checks_auth(self, source: str) -> bool:
        """Whether `source` authorises callers per request; unknown providers are assumed to."""
        sources = getattr(self.provider, "sources", None)
        if isinstance(sources, dict) and source in sources:
            return bool(getattr(sources[source], "checks_auth", True))
        return True

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
