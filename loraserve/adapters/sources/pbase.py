"""`pbase` adapters: Predibase model repos, resolved by the Predibase gateway, fetched from S3.

`adapter_id` is `<model_repo>/<model_version>`, or `<model_repo>` for the
latest version. The gateway (`PREDIBASE_GATEWAY_ENDPOINT`) is asked with the
caller's token as `Authorization: Bearer`, which makes the lookup the
per-request authorisation check too:

1. `GET /v2/repos/{repo}/version/{version}` -> `status`, `adapterPath`.
   A version whose status is not final (still training, queued, ...) is
   refused; a final one is served from `adapterPath`.
2. Otherwise (no version, or the v2 call failed) the legacy
   `GET /v1/models/version/name/{repo}[?version={v}]` -> `uuid`,
   `bestRunID`; weights sit at `{uuid}/{bestRunID}/artifacts/model/model_weights/`.

The storage path is read as S3: `s3://bucket/key` names its bucket; a bare
key lives in `PREDIBASE_MODEL_BUCKET`, or, when that is unset, its first path
component is the bucket. Files are then fetched by the `s3` source, so they
land in its download folder and count against the same disk-cache budget
(`--adapter-disk-cache-bytes`), pinned while they are fetched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import quote

import httpx

from loraserve.adapters.errors import (
    AdapterAuthError,
    AdapterError,
    AdapterForbiddenError,
    AdapterNotFoundError,
)
from loraserve.adapters.sources.base import AdapterSource, AdapterUnavailableError, ResolvedAdapter
from loraserve.adapters.sources.s3 import S3Source

log = logging.getLogger(__name__)

DEFAULT_GATEWAY = "https://api.app.predibase.com"
FINAL_STATUSES = frozenset({"completed", "stopped", "canceled", "errored"})
NOT_READY_STATUSES = frozenset({"pending", "queued", "training", "stopping"})
LEGACY_WEIGHTS_PATH = "{uuid}/{run}/artifacts/model/model_weights/"


class AdapterNotReadyError(AdapterError):
    """The Predibase version exists but is still training (or queued): not servable yet."""

    status_code = 400


def split_pbase_id(adapter_id: str, revision: str | None) -> tuple[str, str | None]:
    parts = adapter_id.strip("/").split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], revision or None
    if len(parts) == 2 and all(parts):
        if revision and revision != parts[1]:
            raise AdapterError(
                f"pbase adapter {adapter_id!r} names version {parts[1]!r} but the request asks for {revision!r}"
            )
        return parts[0], parts[1]
    raise AdapterError(
        f"pbase adapter id must be <model_repo>/<model_version> or <model_repo>, got {adapter_id!r}"
    )


def storage_to_s3_uri(path: str, bucket_env: str | None) -> str:
    """Apply Predibase's bucket rules to a gateway-provided weights path."""
    if path.startswith("s3://"):
        return path
    key = path.lstrip("/")
    if bucket_env:
        return f"s3://{bucket_env}/{key}"
    bucket, _, rest = key.partition("/")
    if not bucket or not rest:
        raise AdapterError(f"the Predibase weights path {path!r} names no bucket")
    return f"s3://{bucket}/{rest}"


def _status_error(status: int, what: str) -> AdapterError:
    if status == 401:
        return AdapterAuthError(f"the Predibase token was rejected for {what}")
    if status == 403:
        return AdapterForbiddenError(f"the Predibase token has no access to {what}")
    if status == 404:
        return AdapterNotFoundError(f"pbase adapter {what} not found")
    return AdapterUnavailableError(f"the Predibase gateway failed for {what} (HTTP {status})")


class PbaseSource(AdapterSource):
    name = "pbase"
    checks_auth = True

    def __init__(
        self,
        s3: S3Source,
        gateway: str | None = None,
        model_bucket: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.s3 = s3
        self.gateway = (gateway or os.environ.get("PREDIBASE_GATEWAY_ENDPOINT") or DEFAULT_GATEWAY).rstrip(
            "/"
        )
        self.model_bucket = (
            model_bucket if model_bucket is not None else os.environ.get("PREDIBASE_MODEL_BUCKET")
        )
        self.timeout_s = timeout_s

    def _get(self, client: httpx.Client, path: str, what: str) -> httpx.Response:
        try:
            return client.get(self.gateway + path)
        except httpx.HTTPError as e:
            raise AdapterUnavailableError(
                f"could not reach the Predibase gateway for {what}: {type(e).__name__}"
            ) from e

    def _weights_path(self, repo: str, version: str | None, token: str, what: str) -> str:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(headers=headers, timeout=self.timeout_s) as client:
            if version is not None:
                r = self._get(
                    client, f"/v2/repos/{quote(repo, safe='')}/version/{quote(version, safe='')}", what
                )
                if r.status_code == 200:
                    body = _json(r, what)
                    status = str(body.get("status", "")).lower()
                    if status in NOT_READY_STATUSES or status not in FINAL_STATUSES:
                        raise AdapterNotReadyError(
                            f"pbase adapter {what} is not ready to serve (status {status or 'unknown'!r}); "
                            "retry once it has finished"
                        )
                    if body.get("adapterPath"):
                        return str(body["adapterPath"])
                log.info(
                    "pbase %s: v2 lookup answered HTTP %d; trying the legacy endpoint", what, r.status_code
                )
            query = f"?version={quote(version, safe='')}" if version is not None else ""
            r = self._get(client, f"/v1/models/version/name/{quote(repo, safe='')}{query}", what)
            if r.status_code != 200:
                raise _status_error(r.status_code, what)
            body = _json(r, what)
            if not body.get("uuid") or not body.get("bestRunID"):
                raise AdapterNotFoundError(f"pbase adapter {what} has no trained weights")
            return LEGACY_WEIGHTS_PATH.format(uuid=body["uuid"], run=body["bestRunID"])

    def resolve(self, adapter_id: str, token: str | None, revision: str | None) -> ResolvedAdapter:
        repo, version = split_pbase_id(adapter_id, revision)
        what = f"{repo}/{version}" if version else f"{repo} (latest)"
        if not token:
            raise AdapterAuthError(
                f"pbase adapter {what} needs an API token (api_token or Authorization header)"
            )
        uri = storage_to_s3_uri(self._weights_path(repo, version, token, what), self.model_bucket).rstrip("/")
        # The storage path pins the trained weights, so it is the revision: "latest" moving to a
        # new version yields a new cache key.
        return ResolvedAdapter(self.name, adapter_id.strip("/"), uri, location=uri, private=True)

    def fetch(self, resolved: ResolvedAdapter, token: str | None) -> Path:
        assert resolved.location is not None
        return self.s3.fetch_uri(resolved.location)


def _json(r: httpx.Response, what: str) -> dict:
    try:
        body = r.json()
    except ValueError as e:
        raise AdapterUnavailableError(f"the Predibase gateway sent a non-JSON answer for {what}") from e
    if not isinstance(body, dict):
        raise AdapterUnavailableError(f"the Predibase gateway sent an unexpected answer for {what}")
    return body
