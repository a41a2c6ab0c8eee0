"""Which adapters occupy the device slot table, with reference counts and LRU reuse.

An adapter is copied into a slot when the first request that needs it is
admitted; it stays there (refcount 0, in LRU order) after its last request
finishes so a returning adapter costs nothing, and is overwritten only when a
new adapter needs the room. The step loop never copies adapter weights for a
slot that is already loaded.

With a byte budget (CPU, engine/memory_plan.py) the table has more slots than the budget holds
at --max-lora-rank, and what counts is what loaded adapters take at the table's rank: a slot's
pages are taken when it is first written (or prefaulted), so a new adapter takes a fresh slot only
while one more fits, else it reuses the least recently used idle one; when the rank grows, idle
adapters are dropped and their pages handed back until the others fit at the new rank.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.layers.lora import LoraTable


class AdapterSlots:
    def __init__(self, table: LoraTable, budget_bytes: int | None = None) -> None:
        self.table = table
        self.budget_bytes = budget_bytes  # None: any slot may be taken
        self.taken: set[int] = set()  # slots whose pages are taken (written or prefaulted)
        self.peak_taken = 0
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
            written, held = self.table.written, set(self._prefaulted.values())
            fresh = (
                s for s, key in enumerate(self.slot_key) if key is None and not written[s] and s not in held
            )
            slot = next(fresh, None)
            rank = max(self.table.rank, adapter.max_rank)
            if slot is None or (slot not in self.taken and not self._fits(len(self.taken) + 1, rank)):
                return
            self._prefaulted[adapter.key] = slot
            self._take(slot)
        self.table.prefault(slot, adapter.max_rank)

    def unprepare(self, key: str) -> None:
        """The request `prepare` ran for has ended (its adapter loaded, or it never got that far):
        its slot is no longer held for it. Without this, a request cancelled before its adapter
        loaded kept its guessed slot out of every later guess, while loads still took that slot
        first (lowest free), so each later guess was one slot off and its load faulted on the
        step thread."""
        with self._prefault_lock:
            self._prefaulted.pop(key, None)

    def slot_bytes(self, rank: int) -> int:
        t = self.table
        return LoraTable.bytes_per_slot(t.shapes, t.num_layers, rank, t.dtype)

    def _fits(self, n: int, rank: int) -> bool:
        """Whether `n` slots' pages at `rank` are within the budget."""
        return self.budget_bytes is None or n * self.slot_bytes(rank) <= self.budget_bytes

    def _take(self, slot: int) -> None:
        self.taken.add(slot)
        self.peak_taken = max(self.peak_taken, len(self.taken))

    def can_acquire(self, adapter: LoraAdapter) -> bool:
        if adapter.key in self.key_to_slot:
            return True
        busy = sum(1 for r in self.refs if r > 0)
        if not self._fits(busy + 1, max(self.table.rank, adapter.max_rank)):
            return False
        return None in self.slot_key or bool(self._idle)

    def acquire(self, adapter: LoraAdapter) -> int:
        slot = self.key_to_slot.get(adapter.key)
        if slot is None:
            rank = max(self.table.rank, adapter.max_rank)
            slot = self._claim_slot(rank)
            self._shed(rank, keep=slot)
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

    def _claim_slot(self, rank: int) -> int:
        """Lowest free slot first keeps the batch's slot range compact (cheaper grouped matmul);
        one whose pages would go past the budget is not free, an idle slot is reused instead."""
        with self._prefault_lock:
            free = [s for s, key in enumerate(self.slot_key) if key is None]
            fresh = next((s for s in free if s in self.taken or self._fits(len(self.taken) + 1, rank)), None)
            if fresh is not None or not self._idle:
                if fresh is None:
                    raise RuntimeError("no adapter slot is free now")
                self._take(fresh)
                return fresh
        slot, _ = self._idle.popitem(last=False)
        self._forget(slot)
        self.evictions += 1
        return slot

    def _shed(self, rank: int, keep: int) -> None:
        """Hand back pages until the taken slots fit at `rank`: first those of free slots no
        request is being prepared for (a prefault whose guess was wrong), then idle adapters',
        least recently used first; never `keep`'s, the slot an adapter is being loaded into."""
        if self._fits(len(self.taken), rank):
            return
        with self._prefault_lock:
            held = set(self._prefaulted.values())
            spare = [
                s for s in sorted(self.taken) if self.slot_key[s] is None and s not in held and s != keep
            ]
        for slot in spare:
            if self._fits(len(self.taken), rank):
                return
            self._discard(slot)
        while not self._fits(len(self.taken), rank) and self._idle:
            slot, _ = self._idle.popitem(last=False)
            self._forget(slot)
            self._discard(slot)
            self.evictions += 1

    def _discard(self, slot: int) -> None:
        self.table.discard(slot)
        with self._prefault_lock:
            self.taken.discard(slot)

    def _forget(self, slot: int) -> None:
        old = self.slot_key[slot]
        if old is not None:
            del self.key_to_slot[old]
        self.slot_key[slot] = None

    def _load(self, slot: int, adapter: LoraAdapter) -> None:
        self.table.ensure_rank(adapter.max_rank)
        self.table.clear_slot(slot)
        for (layer, module), w in adapter.modules.items():
            self.table.write(slot, layer, module, w.a, w.b, w.scale)
        self.key_to_slot[adapter.key] = slot
        self.slot_key[slot] = adapter.key
        self.loaded_at[slot] = time.monotonic()
        self.loads += 1
