"""`local` adapters: a directory on the server's own disk.

Operators may confine local adapters to allowed root directories
(`allowed_roots`; None allows any path), because a caller-chosen path is a
way to read the server's files. Any `..` component is refused outright, and
the check is made on the fully resolved path so symlinks cannot escape.
The revision is a fingerprint of the weight files' size and mtime, so an
adapter rewritten in place is reloaded instead of served stale.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from loraserve.adapters.errors import AdapterError, AdapterForbiddenError, AdapterNotFoundError
from loraserve.adapters.sources.base import ADAPTER_FILES, AdapterSource, ResolvedAdapter, pick_adapter_files


class LocalSource(AdapterSource):
    name = "local"
    checks_auth = False

    def __init__(self, allowed_roots: Iterable[str | Path] | None = None) -> None:
        self.allowed_roots = (
            None if allowed_roots is None else [Path(r).expanduser().resolve() for r in allowed_roots]
        )

    def _checked_path(self, adapter_id: str) -> Path:
        raw = Path(os.path.expanduser(adapter_id))
        if ".." in raw.parts:
            raise AdapterForbiddenError(
                f"local adapter path {adapter_id!r} contains '..', which is not allowed"
            )
        path = raw.resolve()
        if self.allowed_roots is not None and not any(path.is_relative_to(r) for r in self.allowed_roots):
            raise AdapterForbiddenError(
                f"local adapter path {adapter_id!r} is outside the directories this server allows"
            )
        if not path.is_dir():
            raise AdapterNotFoundError(f"local adapter directory {adapter_id!r} does not exist")
        return path

    def resolve(self, adapter_id: str, token: str | None, revision: str | None) -> ResolvedAdapter:
        if revision:
            raise AdapterError("local adapters have no revisions; drop the revision parameter")
        path = self._checked_path(adapter_id)
        present = [f for f in ADAPTER_FILES if (path / f).is_file()]
        files = pick_adapter_files(present, f"local adapter directory {adapter_id!r}")
        digest = hashlib.sha256()
        for f in files:
            st = (path / f).stat()
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
        return ResolvedAdapter(
            source=self.name,
            adapter_id=str(path),
            revision=digest.hexdigest()[:16],
            location=str(path),
            private=False,
            files=tuple(files),
        )

    def fetch(self, resolved: ResolvedAdapter, token: str | None) -> Path:
        assert resolved.location is not None
        return Path(resolved.location)
