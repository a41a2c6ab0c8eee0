"""Where adapters come from: `hub` (default), `local`, `s3`, `pbase`.

Each source module exposes one `AdapterSource` subclass; `build_sources`
wires them with the server's settings. Callers normally go through
`loraserve.adapters.store.AdapterStore`, which adds caching and per-request
authorisation on top; use a source directly only to get files on disk::

    from loraserve.adapters.sources import build_sources
    sources = build_sources(cache_dir="/var/cache/loraserve")
    path, revision = sources["hub"].download("org/my-lora@main", token=None)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from loraserve.adapters.sources.base import (
    ADAPTER_FILES,
    AdapterSource,
    AdapterUnavailableError,
    ResolvedAdapter,
    token_fingerprint,
)
from loraserve.adapters.sources.hub import HubSource
from loraserve.adapters.sources.local import LocalSource
from loraserve.adapters.sources.pbase import AdapterNotReadyError, PbaseSource
from loraserve.adapters.sources.s3 import S3Source

SOURCE_NAMES: tuple[str, ...] = ("hub", "local", "s3", "pbase")


def build_sources(
    cache_dir: str | Path,
    allowed_local_roots: Iterable[str | Path] | None = None,
    hub_endpoint: str | None = None,
    hub_cache_dir: str | Path | None = None,
    hub_offline: bool | None = None,
    pbase_gateway: str | None = None,
    pbase_bucket: str | None = None,
    timeout_s: float | None = None,
) -> dict[str, AdapterSource]:
    """All four sources; unset arguments fall back to the standard environment variables."""
    s3 = S3Source(cache_dir, timeout_s=timeout_s)
    return {
        "hub": HubSource(
            endpoint=hub_endpoint, cache_dir=hub_cache_dir, offline=hub_offline, timeout_s=timeout_s
        ),
        "local": LocalSource(allowed_local_roots),
        "s3": s3,
        "pbase": PbaseSource(
            s3,
            gateway=pbase_gateway,
            model_bucket=pbase_bucket,
            **({} if timeout_s is None else {"timeout_s": timeout_s}),
        ),
    }


__all__ = [
    "ADAPTER_FILES",
    "SOURCE_NAMES",
    "AdapterNotReadyError",
    "AdapterSource",
    "AdapterUnavailableError",
    "HubSource",
    "LocalSource",
    "PbaseSource",
    "ResolvedAdapter",
    "S3Source",
    "build_sources",
    "token_fingerprint",
]
