"""Host-memory LRU of parsed adapters, bounded by bytes rather than count.

Adapters differ in size by orders of magnitude (rank 4 on two modules vs
rank 128 on all seven), so a count limit would either waste memory or
overflow it. An adapter bigger than the whole budget is not cached at all:
the caller still gets it, it just is not kept. Evicting an entry only drops
this cache's reference; an engine slot holding the adapter keeps it alive.
Thread-safe: loads finish on worker threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from loraserve.adapters.lora_weights import LoraAdapter


class HostAdapterCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: str) -> LoraAdapter | None:
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
            return adapter

    def put(self, adapter: LoraAdapter) -> None:
        size = adapter.nbytes
        with self._lock:
            old = self._entries.pop(adapter.key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[adapter.key] = adapter
            self._bytes += size

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes
