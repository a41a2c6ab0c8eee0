"""Which adapters occupy the device slot table, with reference counts and LRU reuse.

An adapter is copied into a slot when the first request that needs it is
admitted; it stays there (refcount 0, in LRU order) after its last request
finishes so a returning adapter costs nothing, and is overwritten only when a
new adapter needs the room. The step loop never copies adapter weights for a
slot that is already loaded.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.layers.lora import LoraTable


class AdapterSlots:
    def __init__(self, table: LoraTable) -> None:
        self.table = table
        self.key_to_slot: dict[str, int] = {}
        self.slot_key: list[str | None] = [None] * table.num_slots
        self.refs: list[int] = [0] * table.num_slots
        self.loaded_at: list[float] = [0.0] * table.num_slots
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, unreferenced, oldest first
        self.loads = 0
        self.evictions = 0
        self._prefaulted: dict[str, int] = {}  # adapter key -> the fresh slot a worker took for it
        self._prefault_lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    def active_keys(self) -> list[str]:
        return [k for k in self.slot_key if k is not None]

    def prepare(self, adapter: LoraAdapter) -> None:
        """Off the step thread, before a request on `adapter` is submitted: if it is not resident
        and will go into a slot never used before, fault that slot's pages in now
        (`LoraTable.prefault`), so its load on the step thread is only the copy. Slots are claimed
        lowest free first, so the k-th adapter prepared takes the k-th such slot (once, however
        many of its requests arrive together); a guess that turns out wrong costs only the memory
        of a slot taken early."""
        if adapter.key in self.key_to_slot:
            return
        with self._prefault_lock:
            if adapter.key in self._prefaulted:
                return
            written, taken = self.table.written, set(self._prefaulted.values())
            fresh = (
                s for s, key in enumerate(self.slot_key) if key is None and not written[s] and s not in taken
            )
            slot = next(fresh, None)
            if slot is None:
                return
            self._prefaulted[adapter.key] = slot
        self.table.prefault(slot, adapter.max_rank)

    def unprepare(self, key: str) -> None:
        """The request `prepare` ran for has ended (its adapter loaded, or it never got that far):
        its slot is no longer held for it. Without this, a request cancelled before its adapter
        loaded kept its guessed slot out of every later guess, while loads still took that slot
        first (lowest free), so each later guess was one slot off and its load faulted on the
        step thread."""
        with self._prefault_lock:
            self._prefaulted.pop(key, None)

    def can_acquire(self, adapter: LoraAdapter) -> bool:
        return adapter.key in self.key_to_slot or None in self.slot_key or bool(self._idle)

    def acquire(self, adapter: LoraAdapter) -> int:
        slot = self.key_to_slot.get(adapter.key)
        if slot is None:
            slot = self._claim_slot()
            self._load(slot, adapter)
        self._idle.pop(slot, None)
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            self._idle[slot] = None

    def in_use(self) -> int:
        return sum(1 for r in self.refs if r > 0)

    def _claim_slot(self) -> int:
        """Lowest free slot first keeps the batch's slot range compact (cheaper grouped matmul)."""
        if None in self.slot_key:
            return self.slot_key.index(None)
        slot, _ = self._idle.popitem(last=False)
        old = self.slot_key[slot]
        if old is not None:
            del self.key_to_slot[old]
        self.evictions += 1
        return slot

    def _load(self, slot: int, adapter: LoraAdapter) -> None:
        self.table.ensure_rank(adapter.max_rank)
        self.table.clear_slot(slot)
        for (layer, module), w in adapter.modules.items():
            self.table.write(slot, layer, module, w.a, w.b, w.scale)
        self.key_to_slot[adapter.key] = slot
        self.slot_key[slot] = adapter.key
        self.loaded_at[slot] = time.monotonic()
        self.loads += 1
