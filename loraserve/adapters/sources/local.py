"""`local` adapters: a directory on the server's own disk.

Operators may confine local adapters to allowed root directories
(`allowed_roots`; None allows any path, LoRAX's default), because a
caller-chosen path is a way to read the server's files. Any `..` component is
refused outright, and the check is made on the fully resolved path so
symlinks cannot escape.

The server's own download caches (hub cache, `--adapter-cache-dir` with the
S3/Predibase downloads) are always refused (`refuse_dirs`, wired by
`AdapterStore`): a private hub adapter fetched once with a valid token lies
there, and loading its snapshot as a "local" path would skip the token check.

Without roots, error messages must not tell a caller which paths exist: a
missing directory, a file, an unreadable directory and a directory without
adapter files all get the same 404 (`not_loadable`).

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


def not_loadable(adapter_id: str) -> AdapterNotFoundError:
    """The one answer for every path that does not hold a readable adapter (existence is not told)."""
    return AdapterNotFoundError(
        f"local adapter {adapter_id!r} was not found: the path is not a readable adapter directory "
        "(adapter_config.json with adapter_model.safetensors or .bin, or Medusa config.json with "
        "medusa_lm_head.safetensors or .pt)"
    )


class LocalSource(AdapterSource):
    name = "local"
    checks_auth = False

    def __init__(
        self, allowed_roots: Iterable[str | Path] | None = None, refused_dirs: Iterable[str | Path] = ()
    ) -> None:
        self.allowed_roots = (
            None if allowed_roots is None else [Path(r).expanduser().resolve() for r in allowed_roots]
        )
        self.refused_dirs: list[Path] = []
        self.refuse_dirs(refused_dirs)

    def refuse_dirs(self, dirs: Iterable[str | Path]) -> None:
        """Never serve adapters under `dirs` (the server's caches), even inside an allowed root."""
        for d in dirs:
            resolved = Path(d).expanduser().resolve()
            if resolved not in self.refused_dirs:
                self.refused_dirs.append(resolved)

    def _refused(self, path: Path) -> bool:
        return any(path.is_relative_to(d) for d in self.refused_dirs)

    def _checked_path(self, adapter_id: str) -> Path:
        if "\x00" in adapter_id:
            raise AdapterError("local adapter path contains a NUL byte")
        raw = Path(os.path.expanduser(adapter_id))
        if ".." in raw.parts:
            raise AdapterForbiddenError(
                f"local adapter path {adapter_id!r} contains '..', which is not allowed"
            )
        try:
            path = raw.resolve()
        except (OSError, RuntimeError) as e:  # symlink loops, names too long
            raise not_loadable(adapter_id) from e
        if self.allowed_roots is not None and not any(path.is_relative_to(r) for r in self.allowed_roots):
            raise AdapterForbiddenError(
                f"local adapter path {adapter_id!r} is outside the directories this server allows"
            )
        if self._refused(path):
            raise AdapterForbiddenError(
                f"local adapter path {adapter_id!r} is inside this server's own adapter cache, which is "
                "never served as a local adapter; ask for the adapter through its own source (hub, s3, "
                "pbase) with a token"
            )
        return path

    def resolve(self, adapter_id: str, token: str | None, revision: str | None) -> ResolvedAdapter:
        if revision:
            raise AdapterError("local adapters have no revisions; drop the revision parameter")
        path = self._checked_path(adapter_id)
        digest = hashlib.sha256()
        try:
            present = [f for f in ADAPTER_FILES if (path / f).is_file()]
            files = pick_adapter_files(present, "local adapter directory")
            for f in files:
                if self._refused((path / f).resolve()):  # a symlink into a cache is a copy of it
                    raise AdapterForbiddenError(
                        f"local adapter {adapter_id!r} links into this server's own adapter cache"
                    )
                st = (path / f).stat()
                digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
        except AdapterForbiddenError:
            raise
        except (AdapterError, OSError, RuntimeError) as e:
            raise not_loadable(adapter_id) from e
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
