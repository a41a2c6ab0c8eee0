"""`AdapterStore`: the one entry point the server uses to turn a request's adapter into tensors.

    store = AdapterStore(model_config, cache_dir="/var/cache/loraserve",
                         host_cache_bytes=2 << 30, default_source="hub")
    adapter = await store.get(adapter_id, source, token, revision)   # -> LoraAdapter
    adapter.medusa       # MedusaHeads when the adapter ships Medusa heads (then modules may be empty)
    store.stats()        # counters for /metrics
    store.close()

`get` raises `AdapterError` subclasses whose `status_code` the HTTP layer
returns as is (400 bad files / shapes, 401/403 auth, 404 not found, 503
source unreachable). Messages never contain tokens.

What happens per call, and why:

1. **Authorise / pin** (`source.resolve`) in the source's small `auth` thread pool.
   For `hub` and `pbase` this runs for every request, even when the adapter
   is cached, so a private adapter asked for with a missing, wrong or revoked
   token is refused. Successful results are remembered for `auth_ttl_s`
   (a few seconds) under a SHA-256 fingerprint of the token, never the token;
   failures are never remembered. `local` and `s3` carry no caller
   credentials, so their resolution is reused while the adapter stays cached.
2. **Host-memory LRU** (bounded by bytes) keyed by the pinned revision.
3. **Load** on a miss in the source's own `load` pool: download or
   disk-cache hit, parse, validate against the base model. Concurrent
   requests for the same uncached adapter share one load (single-flight); a
   failed load fails just those requests and is retried by the next one.
   Each source has its own pool so that downloads stalled on a slow hub or
   bucket can never occupy the workers a local (or other remote) adapter
   needs.

Nothing here blocks the event loop, and auth checks have their own pools so a
slow download never delays them. Pools are per source for both steps, so a
hub or bucket that stops answering ties up only its own workers. With `LORAX_USE_GLOBAL_HF_TOKEN=1` the
server's `HUGGING_FACE_HUB_TOKEN`/`HF_TOKEN` is used for `hub` requests that
bring no token; otherwise the server's token is never used for a caller.
`get_blocking` is the same path for threads without an event loop (preloading).

A token that is not visible ASCII is refused as malformed (401) before any
source sees it: it could not be sent in an HTTP header anyway. The `local`
source never serves a path inside a cache another source (or this store)
downloads into (`_confine_local`): a private adapter fetched once with a
valid token would otherwise be readable as a local path without one.

`local_adapter_store(model_config)` is this store with only the `local` source
(the CLI's one-off `generate`, and servers assembled without remote sources):
one loading path, so a directory that loads there loads the same way in a
full server, with the same parsing, validation and errors.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from loraserve.adapters.errors import AdapterAuthError, AdapterError
from loraserve.adapters.host_cache import HostAdapterCache
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.medusa_format import parse_adapter_dir
from loraserve.adapters.single_flight import SingleFlight, await_shared
from loraserve.adapters.sources import (
    SOURCE_NAMES,
    AdapterSource,
    LocalSource,
    ResolvedAdapter,
    build_sources,
)
from loraserve.adapters.sources.base import token_fingerprint
from loraserve.adapters.validation import validate_adapter
from loraserve.cpu_threads import helper_pool
from loraserve.models.config import ModelConfig

log = logging.getLogger(__name__)

_MAX_RESOLUTIONS = 8192


class AdapterLoadError(AdapterError):
    """An unexpected failure while loading (a bug or an odd file), reported as a server error."""

    status_code = 500


def _well_formed_token(token: str) -> bool:
    """Every hub and Predibase token is visible ASCII; anything else cannot be a valid one."""
    return all("!" <= c <= "~" for c in token)


def _env_flag(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in ("1", "TRUE", "YES", "ON")


class AdapterStore:
    def __init__(
        self,
        model_config: ModelConfig,
        cache_dir: str | Path | None,
        *,
        host_cache_bytes: int = 2 << 30,
        default_source: str = "hub",
        sources: dict[str, AdapterSource] | None = None,
        allowed_local_roots: Iterable[str | Path] | None = None,
        auth_ttl_s: float = 5.0,
        max_rank: int | None = None,
        load_workers: int = 4,
        auth_workers: int = 4,
        use_global_hf_token: bool | None = None,
        global_hf_token: str | None = None,
        warn_unconfined_local: bool = True,
    ) -> None:
        self.model_config = model_config
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if sources is None:
            if self.cache_dir is None:
                raise ValueError("cache_dir is required unless the sources are given")
            sources = build_sources(self.cache_dir, allowed_local_roots)
        self.sources = sources
        self._confine_local(warn_unconfined_local)
        self.default_source = default_source
        self.auth_ttl_s = auth_ttl_s
        self.max_rank = max_rank
        if use_global_hf_token is None:
            use_global_hf_token = _env_flag("LORAX_USE_GLOBAL_HF_TOKEN")
        if global_hf_token is None:
            global_hf_token = os.environ.get("HUGGING_FACE_HUB_TOKEN") or os.environ.get("HF_TOKEN")
        self._global_hf_token = global_hf_token if use_global_hf_token else None
        self._host = HostAdapterCache(host_cache_bytes)
        names = sorted({src.name for src in self.sources.values()})
        self._load_pools = {name: helper_pool(load_workers, f"adapter-load-{name}") for name in names}
        self._auth_pools = {name: helper_pool(auth_workers, f"adapter-auth-{name}") for name in names}
        self._loads = {name: SingleFlight(pool) for name, pool in self._load_pools.items()}
        self._resolves = {name: SingleFlight(pool) for name, pool in self._auth_pools.items()}
        self._resolved: OrderedDict[tuple, tuple[float, ResolvedAdapter]] = OrderedDict()
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(
            (
                "hits",
                "misses",
                "loads",
                "load_failures",
                "loaded_bytes",
                "auth_checks",
                "auth_failures",
                "shared_loads",
            ),
            0,
        )

    @property
    def default_source(self) -> str:
        return self._default_source

    @default_source.setter
    def default_source(self, name: str) -> None:
        if name not in self.sources:
            raise ValueError(f"unknown adapter source {name!r}; expected one of {', '.join(self.sources)}")
        self._default_source = name

    # ---- public API -------------------------------------------------------------------------

    async def get(
        self,
        adapter_id: str,
        source: str | None = None,
        token: str | None = None,
        revision: str | None = None,
    ) -> LoraAdapter:
        src, token = self._prepare(adapter_id, source, token)
        resolved = await await_shared(self._resolve_future(src, adapter_id, token, revision))
        adapter = self._cached(resolved)
        if adapter is not None:
            return adapter
        return await await_shared(self._load_future(src, resolved, token))

    def get_blocking(
        self,
        adapter_id: str,
        source: str | None = None,
        token: str | None = None,
        revision: str | None = None,
    ) -> LoraAdapter:
        """`get` for threads without an event loop; never call it on the event loop thread."""
        src, token = self._prepare(adapter_id, source, token)
        resolved = self._resolve_future(src, adapter_id, token, revision).result()
        adapter = self._cached(resolved)
        if adapter is not None:
            return adapter
        return self._load_future(src, resolved, token).result()

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counters)
        out.update(
            host_bytes=self._host.nbytes,
            host_entries=len(self._host),
            host_evictions=self._host.evictions,
            loads_in_flight=sum(len(flights) for flights in self._loads.values()),
        )
        return out

    def close(self) -> None:
        for pool in (*self._load_pools.values(), *self._auth_pools.values()):
            pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals --------------------------------------------------------------------------

    def _confine_local(self, warn_unconfined: bool) -> None:
        """Keep `local` out of every cache a remote source (or this store) downloads into.

        Otherwise a private hub/s3/pbase adapter, once fetched with a valid token, could be
        read by anyone as a `local` path to its cache directory, with no token at all.
        """
        local = self.sources.get("local")
        if not isinstance(local, LocalSource):
            return
        dirs = [self.cache_dir] if self.cache_dir is not None else []
        for src in self.sources.values():
            if src is not local:
                dirs.extend(src.cache_dirs())
        local.refuse_dirs(dirs)
        if warn_unconfined and local.allowed_roots is None:
            log.warning(
                "--local-adapter-roots is not set: any directory this server can read may be loaded as a "
                "local adapter (LoRAX's default); set it to confine local adapters"
            )

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def _prepare(
        self, adapter_id: str, source: str | None, token: str | None
    ) -> tuple[AdapterSource, str | None]:
        name = (source or self.default_source).strip().lower()
        src = self.sources.get(name)
        if src is None and name in SOURCE_NAMES:
            raise AdapterError(
                f"adapter_source {name!r} is not enabled here; enabled: {', '.join(self.sources)}"
            )
        if src is None:
            raise AdapterError(
                f"unknown adapter_source {source!r}; expected one of {', '.join(self.sources)}"
            )
        if not adapter_id or not adapter_id.strip():
            raise AdapterError("adapter_id is empty")
        if "\x00" in adapter_id:
            raise AdapterError("adapter_id contains a NUL byte")
        if token and src.checks_auth and not _well_formed_token(token):
            # It would reach an HTTP header, where it cannot be encoded (a 503 "hub failed" before).
            self._count("auth_failures")
            raise AdapterAuthError("the token is malformed: tokens are printable ASCII without spaces")
        if name == "hub" and not token and self._global_hf_token:
            token = self._global_hf_token
        return src, token or None

    def _cached(self, resolved: ResolvedAdapter) -> LoraAdapter | None:
        adapter = self._host.get(resolved.cache_key)
        self._count("hits" if adapter is not None else "misses")
        return adapter

    def _resolve_future(
        self, src: AdapterSource, adapter_id: str, token: str | None, revision: str | None
    ) -> Future:
        key = (src.name, adapter_id, revision, token_fingerprint(token) if src.checks_auth else None)
        now = time.monotonic()
        with self._lock:
            entry = self._resolved.get(key)
        if entry is not None and entry[0] > now and (src.checks_auth or entry[1].cache_key in self._host):
            done: Future = Future()
            done.set_result(entry[1])
            return done
        fut, _ = self._resolves[src.name].submit(key, self._resolve, src, key, adapter_id, token, revision)
        return fut

    def _resolve(
        self, src: AdapterSource, key: tuple, adapter_id: str, token: str | None, revision: str | None
    ) -> ResolvedAdapter:
        if src.checks_auth:
            self._count("auth_checks")
        try:
            resolved = src.resolve(adapter_id, token, revision)
        except AdapterAuthError:
            self._count("auth_failures")
            raise
        except AdapterError:
            raise
        except Exception as e:  # a source bug must fail the request, not the server
            log.exception("resolving %s adapter %s failed", src.name, adapter_id)
            raise AdapterLoadError(
                f"resolving {src.name} adapter {adapter_id!r} failed: {type(e).__name__}"
            ) from e
        ttl = self.auth_ttl_s if src.checks_auth else math.inf
        with self._lock:
            self._resolved[key] = (time.monotonic() + ttl, resolved)
            self._resolved.move_to_end(key)
            while len(self._resolved) > _MAX_RESOLUTIONS:
                self._resolved.popitem(last=False)
        return resolved

    def _load_future(self, src: AdapterSource, resolved: ResolvedAdapter, token: str | None) -> Future:
        fut, started = self._loads[src.name].submit(resolved.cache_key, self._load, src, resolved, token)
        if not started:
            self._count("shared_loads")
        return fut

    def _load(self, src: AdapterSource, resolved: ResolvedAdapter, token: str | None) -> LoraAdapter:
        cached = self._host.get(resolved.cache_key)  # a load that just finished may have raced us here
        if cached is not None:
            return cached
        t0 = time.monotonic()
        try:
            path = src.fetch(resolved, token)
            adapter = parse_adapter_dir(path, key=resolved.cache_key)
            for warning in validate_adapter(adapter, self.model_config, self.max_rank):
                log.warning("adapter %s: %s", resolved.cache_key, warning)
        except AdapterError as e:
            self._count("load_failures")
            log.warning("loading adapter %s failed: %s", resolved.cache_key, e)
            raise
        except Exception as e:
            self._count("load_failures")
            log.exception("loading adapter %s failed", resolved.cache_key)
            raise AdapterLoadError(
                f"loading {src.name} adapter {resolved.adapter_id!r} failed: {type(e).__name__}"
            ) from e
        self._count("loads")
        self._count("loaded_bytes", adapter.nbytes)
        self._host.put(adapter)
        log.info(
            "adapter %s loaded: rank %d, %d modules, %s, %d bytes in %.2fs",
            resolved.cache_key,
            adapter.rank,
            len(adapter.modules),
            f"{adapter.medusa.num_heads} Medusa heads" if adapter.medusa is not None else "no Medusa heads",
            adapter.nbytes,
            time.monotonic() - t0,
        )
        return adapter


def local_adapter_store(
    model_config: ModelConfig,
    *,
    allowed_local_roots: Iterable[str | Path] | None = None,
    max_rank: int | None = None,
    host_cache_bytes: int = 2 << 30,
) -> AdapterStore:
    """An `AdapterStore` that reads adapter directories from local disk only.

    It needs no cache directory (local files are read in place) and starts no
    network client, which is what a one-off `generate` or a test server wants,
    yet adapters go through the same parse, validation and host cache as in a
    full server. Other sources are refused with a message naming `local`.
    """
    return AdapterStore(
        model_config,
        None,
        host_cache_bytes=host_cache_bytes,
        default_source="local",
        sources={"local": LocalSource(allowed_local_roots)},
        max_rank=max_rank,
        warn_unconfined_local=False,  # the caller names its own files (generate, tests)
    )
