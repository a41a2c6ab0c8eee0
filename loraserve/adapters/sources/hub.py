"""`hub` adapters: Hugging Face Hub model repos, through the real `huggingface_hub` client.

* `adapter_id` is `org/name` or `org/name@revision`; a `revision` argument
  works too (both at once must agree). The revision is pinned to its commit
  sha, so `repo`, `repo@main` and `repo@<sha>` share one cache entry.
* `HF_ENDPOINT`, `HF_HUB_CACHE`/`HUGGINGFACE_HUB_CACHE`/`HF_HOME` and
  `HF_HUB_OFFLINE` are read when the source is built (not when
  `huggingface_hub` was imported), so a server or test can point it anywhere.
* Auth: `resolve()` is one `model_info` call carrying the caller's token, so
  it doubles as the per-request authorisation check of private repos. With
  no token the client is told `token=False`: the server's own token (env or
  `huggingface-cli login`) is never sent on a caller's behalf; the store
  decides when the global token may be used (`LORAX_USE_GLOBAL_HF_TOKEN`).
* If the hub cannot be reached, an adapter this process has seen public is
  still served from its pinned sha; anything else fails with 503. In offline
  mode the disk cache is trusted as is (it cannot tell private from public).
* Downloads log progress (file by file, bytes) to the server log.
* With a `disk_cache` (`AdapterDiskCache`), each repo folder is one cache
  entry: pinned while files are downloaded into it, measured afterwards, and
  deleted least-recently-used first when the budget is exceeded.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loraserve.adapters.errors import (
    AdapterAuthError,
    AdapterError,
    AdapterForbiddenError,
    AdapterNotFoundError,
)
from loraserve.adapters.sources.base import (
    ADAPTER_FILES,
    AdapterSource,
    AdapterUnavailableError,
    ResolvedAdapter,
    pick_adapter_files,
)

if TYPE_CHECKING:
    from loraserve.adapters.disk_cache import AdapterDiskCache

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"


def split_revision(adapter_id: str, revision: str | None) -> tuple[str, str]:
    """`org/name@rev` -> (`org/name`, `rev`); the default branch is `main`."""
    repo, at, id_rev = adapter_id.partition("@")
    if at and revision and id_rev != revision:
        raise AdapterError(
            f"adapter id {adapter_id!r} names revision {id_rev!r} but the request asks for {revision!r}"
        )
    rev = revision or id_rev or "main"
    if not repo:
        raise AdapterError("hub adapter id is empty")
    return repo, rev


def _env_cache_dir() -> str:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return os.path.join(
        os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "huggingface", "hub"
    )


def _is_transport_error(e: Exception) -> bool:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(e, (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError))


def map_hub_error(e: Exception, what: str, had_token: bool) -> AdapterError:
    """Translate `huggingface_hub` errors; messages name the repo, never the token."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, AdapterError):
        return e
    if isinstance(e, HFValidationError):
        return AdapterError(f"invalid hub adapter id {what}: {e}")
    if _is_transport_error(e):
        return AdapterUnavailableError(f"could not reach the hub for {what}: {type(e).__name__}")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, RevisionNotFoundError):
        return AdapterNotFoundError(f"hub adapter {what}: revision not found")
    if isinstance(e, RemoteEntryNotFoundError):
        return AdapterError(f"hub adapter {what} is missing its adapter files")
    if isinstance(e, GatedRepoError):
        return AdapterForbiddenError(f"hub adapter {what} is gated and the token has no access to it")
    if isinstance(e, RepositoryNotFoundError) and status != 401:
        return AdapterNotFoundError(f"hub adapter {what} not found")
    if status == 401:
        if had_token:
            return AdapterAuthError(
                f"the token was rejected for hub adapter {what} (invalid, revoked or no access)"
            )
        return AdapterAuthError(f"hub adapter {what} not found or private: a token with access is required")
    if status == 403:
        return AdapterForbiddenError(f"the token has no access to hub adapter {what}")
    if status == 404:
        return AdapterNotFoundError(f"hub adapter {what} not found")
    if isinstance(e, HfHubHTTPError):
        return AdapterUnavailableError(f"the hub failed for {what} (HTTP {status})")
    return AdapterUnavailableError(f"loading hub adapter {what} failed: {type(e).__name__}")


class HubSource(AdapterSource):
    name = "hub"
    checks_auth = True
    disk_cache: AdapterDiskCache | None = None  # set by the server: bounds what downloads keep

    def __init__(
        self,
        endpoint: str | None = None,
        cache_dir: str | Path | None = None,
        offline: bool | None = None,
        timeout_s: float | None = None,
    ) -> None:
        # Per network call; downloads read huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT, which the
        # server sets from the same flag before the client is imported.
        self.timeout_s = timeout_s
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.cache_dir = str(cache_dir) if cache_dir is not None else _env_cache_dir()
        if offline is None:
            offline = (os.environ.get("HF_HUB_OFFLINE") or "").upper() in ("1", "ON", "YES", "TRUE")
        self.offline = offline
        self._known_public: dict[tuple[str, str], ResolvedAdapter] = {}

    def resolve(self, adapter_id: str, token: str | None, revision: str | None) -> ResolvedAdapter:
        repo, rev = split_revision(adapter_id, revision)
        what = f"{repo}@{rev}"
        if self.offline:
            return self._resolve_from_cache(repo, rev)
        from huggingface_hub import HfApi

        try:
            info = HfApi(endpoint=self.endpoint).model_info(
                repo, revision=rev, token=token or False, timeout=self.timeout_s
            )
        except Exception as e:
            known = self._known_public.get((repo, rev))
            if known is not None and _is_transport_error(e):
                log.warning(
                    "hub unreachable for %s; serving the public revision %s seen before", what, known.revision
                )
                return known
            raise map_hub_error(e, what, had_token=bool(token)) from e
        if not info.sha:
            raise AdapterUnavailableError(f"the hub gave no commit sha for {what}")
        names = [s.rfilename for s in (info.siblings or [])]
        files = pick_adapter_files(names, f"hub adapter {what}")
        resolved = ResolvedAdapter(
            self.name, repo, info.sha, private=bool(info.private), files=tuple(files), requested_revision=rev
        )
        if not info.private:
            self._known_public[(repo, rev)] = resolved
        else:
            self._known_public.pop((repo, rev), None)
        return resolved

    def _resolve_from_cache(self, repo: str, rev: str) -> ResolvedAdapter:
        from huggingface_hub import try_to_load_from_cache

        found: dict[str, str] = {}
        for f in ADAPTER_FILES:
            path = try_to_load_from_cache(repo, f, cache_dir=self.cache_dir, revision=rev)
            if isinstance(path, str):
                found[f] = path
        if not found:
            raise AdapterNotFoundError(f"hub adapter {repo}@{rev} is not in the local cache (offline mode)")
        files = pick_adapter_files(found, f"cached hub adapter {repo}@{rev}")
        snapshot = Path(found[files[0]]).parent
        return ResolvedAdapter(self.name, repo, snapshot.name, location=str(snapshot), files=tuple(files))

    def fetch(self, resolved: ResolvedAdapter, token: str | None) -> Path:
        if resolved.location is not None:  # offline: resolve() already found the snapshot
            return Path(resolved.location)
        from huggingface_hub.file_download import repo_folder_name

        if self.disk_cache is None:
            return self._download(resolved, token)
        entry = Path(self.cache_dir) / repo_folder_name(repo_id=resolved.adapter_id, repo_type="model")
        with self.disk_cache.using(entry):
            return self._download(resolved, token)

    def _download(self, resolved: ResolvedAdapter, token: str | None) -> Path:
        from huggingface_hub import hf_hub_download

        what = f"{resolved.adapter_id}@{resolved.revision[:12]}"
        t0, total, folder = time.monotonic(), 0, None
        for i, f in enumerate(resolved.files, 1):
            try:
                path = hf_hub_download(
                    resolved.adapter_id,
                    f,
                    revision=resolved.revision,
                    cache_dir=self.cache_dir,
                    endpoint=self.endpoint,
                    token=token or False,
                )
            except Exception as e:
                raise map_hub_error(e, what, had_token=bool(token)) from e
            size = os.path.getsize(path)
            total += size
            folder = Path(path).parent
            log.info(
                "hub adapter %s: %s (%d bytes) ready, %d/%d files", what, f, size, i, len(resolved.files)
            )
        log.info("hub adapter %s: %d bytes in %.2fs", what, total, time.monotonic() - t0)
        assert folder is not None
        self._write_ref(resolved)
        return folder

    def _write_ref(self, resolved: ResolvedAdapter) -> None:
        """Record branch -> sha like `snapshot_download` does, so offline mode can find the snapshot."""
        rev = resolved.requested_revision
        if not rev or rev == resolved.revision or rev.startswith("/") or ".." in rev.split("/"):
            return
        from huggingface_hub.file_download import repo_folder_name

        ref = (
            Path(self.cache_dir)
            / repo_folder_name(repo_id=resolved.adapter_id, repo_type="model")
            / "refs"
            / rev
        )
        try:
            if ref.is_file() and ref.read_text() == resolved.revision:
                return
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f"{ref.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
            tmp.write_text(resolved.revision)
            os.replace(tmp, ref)
        except OSError as e:  # only offline mode needs it; never fail a load over it
            log.warning("could not record hub ref %s for %s: %s", rev, resolved.adapter_id, e)
