"""`s3` adapters: `s3://bucket/prefix` in S3 or any S3-compatible store.

Credentials and endpoint come from the standard AWS environment that boto3
reads itself (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`), so the server needs no flags
of its own. Only the adapter files directly under the prefix are fetched,
into `<cache_dir>/s3/<digest of URI>-<ETag digest>/`; a directory already
complete there is reused, so a restart does not re-download. With a
`disk_cache` (`AdapterDiskCache`) each such directory is one cache entry,
pinned while it is downloaded or read and evicted least-recently-used first
beyond the budget.

`fetch_uri` is also the second half of the `pbase` source, whose gateway
answers with an S3 location.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraserve.adapters.errors import AdapterError, AdapterForbiddenError, AdapterNotFoundError
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

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "403"}
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "404"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> (bucket, 'some/prefix'); the prefix may be empty."""
    if not uri.startswith("s3://"):
        raise AdapterError(f"s3 adapter id must look like s3://bucket/prefix, got {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise AdapterError(f"s3 adapter id {uri!r} names no bucket")
    return bucket, prefix.strip("/")


_sessions: dict[tuple, object] = {}
_sessions_lock = threading.Lock()


def _s3_client(timeout_s: float | None = None):  # boto3 is imported lazily: slow to import
    import boto3
    from botocore.config import Config

    # boto3's default session pins the credentials it saw first; keying sessions by the AWS
    # environment lets rotated keys take effect without a restart, while reusing a session
    # (building one re-reads botocore's service models) whenever nothing changed.
    env_key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _sessions_lock:
        session = _sessions.get(env_key)
        if session is None:
            _sessions.clear()
            session = _sessions[env_key] = boto3.session.Session()
        timeouts = {} if timeout_s is None else {"connect_timeout": timeout_s, "read_timeout": timeout_s}
        return session.client(
            "s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}, **timeouts)
        )


def _map_s3_error(e: Exception, uri: str) -> AdapterError:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(e, AdapterError):
        return e
    if isinstance(e, NoCredentialsError):
        return AdapterForbiddenError(f"the server has no S3 credentials to read {uri}")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _AUTH_CODES:
            return AdapterForbiddenError(f"access to {uri} was denied by the S3 store ({code})")
        if code in _MISSING_CODES:
            return AdapterNotFoundError(f"s3 adapter {uri} not found ({code})")
        return AdapterUnavailableError(f"S3 error while reading {uri}: {code}")
    if isinstance(e, BotoCoreError):
        return AdapterUnavailableError(f"could not reach the S3 store for {uri}: {type(e).__name__}")
    return AdapterUnavailableError(f"reading {uri} failed: {type(e).__name__}")


def list_etags(client: Any, bucket: str, base: str, keep: Callable[[str], bool]) -> dict[str, str]:
    """ETags of the objects right under `base` whose names (relative to it) `keep` accepts."""
    found: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(base) :]
            if keep(name):
                found[name] = obj.get("ETag", "").strip('"')
    return found


def download_into(client: Any, bucket: str, base: str, files: list[str], target: Path, what: str) -> Path:
    """`files` under `base` into `target` (kept if already complete), through a private temporary
    directory renamed into place, so a concurrent or interrupted download never leaves a partial
    `target`. Shared by adapters and base models (models/source.py)."""
    if all((target / f).is_file() for f in files):
        log.info("%s: using cached copy %s", what, target)
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    t0, total = time.monotonic(), 0
    try:
        for i, f in enumerate(files, 1):
            client.download_file(bucket, base + f, str(tmp / f))
            size = (tmp / f).stat().st_size
            total += size
            log.info("%s: downloaded %s (%d bytes), %d/%d files", what, f, size, i, len(files))
        if target.exists():  # another worker finished first; keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: %d bytes in %.2fs into %s", what, total, time.monotonic() - t0, target)
    return target


class S3Source(AdapterSource):
    name = "s3"
    checks_auth = False
    disk_cache: AdapterDiskCache | None = None  # set by the server: bounds what downloads keep

    def __init__(self, cache_dir: str | Path, timeout_s: float | None = None) -> None:
        self.cache_dir = Path(cache_dir) / "s3"
        self.timeout_s = timeout_s  # per network call; None keeps botocore's 60 s

    def _list(self, client, uri: str) -> tuple[str, str, dict[str, str]]:
        """ETags of the adapter files right under the prefix (name -> etag)."""
        bucket, prefix = parse_s3_uri(uri)
        base = f"{prefix}/" if prefix else ""
        found = list_etags(client, bucket, base, lambda name: name in ADAPTER_FILES)
        if not found:
            raise AdapterNotFoundError(f"s3 adapter {uri} not found (no adapter files under that prefix)")
        return bucket, base, found

    def resolve(self, adapter_id: str, token: str | None, revision: str | None) -> ResolvedAdapter:
        if revision:
            raise AdapterError("s3 adapters have no revisions; drop the revision parameter")
        uri = adapter_id.rstrip("/")
        try:
            _, _, etags = self._list(_s3_client(self.timeout_s), uri)
            files = pick_adapter_files(etags, f"s3 adapter {uri}")
        except Exception as e:
            raise _map_s3_error(e, uri) from e
        digest = hashlib.sha256(";".join(f"{f}:{etags[f]}" for f in files).encode()).hexdigest()[:16]
        return ResolvedAdapter(self.name, uri, digest, location=uri, private=None, files=tuple(files))

    def fetch(self, resolved: ResolvedAdapter, token: str | None) -> Path:
        assert resolved.location is not None
        target = self._target(resolved.location, resolved.revision)
        with self._in_use(target):
            if resolved.files and all((target / f).is_file() for f in resolved.files):
                return target  # resolve() just listed these ETags: no second listing needed
            return self.fetch_uri(resolved.location)

    def _in_use(self, target: Path) -> contextlib.AbstractContextManager[None]:
        """Pin `target` in the disk cache (when there is one) while its files are read or written."""
        return self.disk_cache.using(target) if self.disk_cache is not None else contextlib.nullcontext()

    def _target(self, uri: str, digest: str) -> Path:
        return self.cache_dir / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{digest}"

    def fetch_uri(self, uri: str) -> Path:
        """Download the adapter files under `uri` (or reuse a complete cached copy)."""
        uri = uri.rstrip("/")
        try:
            client = _s3_client(self.timeout_s)
            bucket, base, etags = self._list(client, uri)
            files = pick_adapter_files(etags, f"s3 adapter {uri}")
            digest = hashlib.sha256(";".join(f"{f}:{etags[f]}" for f in files).encode()).hexdigest()[:16]
            target = self._target(uri, digest)
            with self._in_use(target):
                return self._download(client, uri, bucket, base, files, target)
        except Exception as e:
            raise _map_s3_error(e, uri) from e

    def _download(
        self, client: Any, uri: str, bucket: str, base: str, files: list[str], target: Path
    ) -> Path:
        return download_into(client, bucket, base, files, target, f"s3 adapter {uri}")
