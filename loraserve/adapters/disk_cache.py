"""`AdapterDiskCache`: a byte budget with LRU eviction for downloaded adapter files.

The `hub`, `s3` and `pbase` sources download into directories that nothing
ever deleted, so a server asked for many adapters filled its disk. Each
source now reports the directory it fetched into (an *entry*: a hub repo
folder `models--org--name`, or an S3 target `s3/<uri digest>-<etag digest>`)
and this cache keeps the sum of their sizes under `max_bytes` by deleting the
least recently used entries.

* **Never an entry in use.** A source wraps each download or disk-cache read
  in `using(entry)`; a pinned entry is skipped by eviction until the last
  user leaves, so a load never sees its files vanish. (Adapters already
  parsed into host memory do not need their files any more.)
* **Nor one just fetched.** The store parses an adapter's files right after
  `fetch()` returns, outside the pin, so an entry used within the last
  `grace_s` seconds is not deleted either (files already opened stay
  readable after deletion on POSIX; the grace covers the moment before they
  are opened). Under a burst of new adapters the budget can thus be exceeded
  for `grace_s`; the next download after that trims it.
* **The newest entry stays** even when it alone exceeds the budget: it was
  just asked for, and deleting it would only make the next request download
  it again.
* **Only what this cache recorded is deleted.** The hub cache directory may
  be shared with other tools (`HF_HUB_CACHE`), so entries are tracked in an
  index file (`<cache_dir>/disk-cache-index.json`) that survives restarts;
  directories under `<cache_dir>/s3`, which belong to loraserve alone, are
  also picked up by a scan at start. `max_bytes <= 0` disables eviction.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

INDEX_NAME = "disk-cache-index.json"


def directory_bytes(path: Path) -> int:
    """Bytes of the regular files under `path`; symlinks (hub snapshots point at blobs) count 0."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


class AdapterDiskCache:
    def __init__(self, cache_dir: str | Path, max_bytes: int, grace_s: float = 10.0) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self._used_at: dict[str, float] = {}  # monotonic time of the last use, this process only
        self.evictions = 0
        self._index_path = self.cache_dir / INDEX_NAME
        self._entries: OrderedDict[str, int] = OrderedDict()  # path -> bytes, least recent first
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        self._load_index()

    # ---- what sources call ------------------------------------------------------------------

    @contextmanager
    def using(self, entry: str | Path) -> Iterator[None]:
        """Pin `entry` while files in it are written or read; record its size and use afterwards."""
        key = str(entry)
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._pins[key] - 1
                if left:
                    self._pins[key] = left
                else:
                    del self._pins[key]
            self.record(entry)

    def record(self, entry: str | Path) -> None:
        """Note a use of `entry` (now the most recent), measure it, and evict beyond the budget."""
        key = str(entry)
        size = directory_bytes(Path(key)) if os.path.isdir(key) else 0
        with self._lock:
            if size:
                self._entries[key] = size
                self._entries.move_to_end(key)
                self._used_at[key] = time.monotonic()
            else:
                self._entries.pop(key, None)
                self._used_at.pop(key, None)
            victims = self._pick_victims()
            for victim in victims:
                self._entries.pop(victim, None)
                self._used_at.pop(victim, None)
            self._save_index()
        for victim in victims:
            self._delete(victim)

    # ---- introspection ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "bytes": sum(self._entries.values()),
                "entries": len(self._entries),
                "evictions": self.evictions,
            }

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._entries.values())

    def entries(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    # ---- internals --------------------------------------------------------------------------

    def _pick_victims(self) -> list[str]:
        if self.max_bytes <= 0:
            return []
        total = sum(self._entries.values())
        newest = next(reversed(self._entries), None)
        recent = time.monotonic() - self.grace_s
        victims = []
        for key, size in self._entries.items():  # least recently used first
            if total <= self.max_bytes:
                break
            if key == newest or key in self._pins or self._used_at.get(key, -math.inf) > recent:
                continue
            victims.append(key)
            total -= size
        return victims

    def _delete(self, key: str) -> None:
        t0 = time.monotonic()
        with self._lock:
            if key in self._pins:  # a load started on it since it was picked: keep it
                return
            # Rename first (atomic), delete after: a fetch that starts now sees no half-deleted tree.
            trash = f"{key}.evicted-{os.getpid()}-{time.monotonic_ns()}"
            try:
                os.rename(key, trash)
            except OSError as e:
                log.warning("adapter disk cache: could not evict %s: %s", key, e)
                return
            self.evictions += 1
        shutil.rmtree(trash, ignore_errors=True)
        log.info("adapter disk cache: evicted %s in %.2fs", key, time.monotonic() - t0)

    def _load_index(self) -> None:
        """Entries from the index file, then loraserve's own S3 directories not in it (oldest first)."""
        known: list[str] = []
        try:
            raw = json.loads(self._index_path.read_text())
            known = [str(p) for p in raw.get("entries", []) if isinstance(p, str)]
        except (OSError, ValueError, AttributeError):
            pass
        s3_root = self.cache_dir / "s3"
        if s3_root.is_dir():
            for leftover in s3_root.glob("*.evicted-*"):  # a deletion a crash interrupted
                shutil.rmtree(leftover, ignore_errors=True)
            found = [
                p
                for p in s3_root.iterdir()
                if p.is_dir() and ".tmp-" not in p.name and ".evicted-" not in p.name
            ]
            for p in sorted(found, key=lambda p: p.stat().st_mtime):
                if str(p) not in known:
                    known.insert(0, str(p))
        for key in known:
            if os.path.isdir(key):
                self._entries[key] = directory_bytes(Path(key))

    def _save_index(self) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._index_path.with_name(f"{INDEX_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"entries": list(self._entries)}))
            os.replace(tmp, self._index_path)
        except OSError as e:  # the index only matters across restarts: never fail a load over it
            log.warning("adapter disk cache: could not write %s: %s", self._index_path, e)
