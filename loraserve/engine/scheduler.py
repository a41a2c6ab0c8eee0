"""Continuous batching: every step, decode everyone running and admit whoever fits.

Admission is bounded by the prefill-token budget, the number of sequences,
free KV blocks and free adapter slots.

Adapter exchange: when requests wait for an adapter that has no slot for
longer than `adapter_cycle_s`, the longest-resident busy adapters are put in
*draining*: their running requests finish, but new ones for them wait, so a
slot frees up and the starving adapter (older in the FIFO queue) claims it.
Popular adapters thus cannot lock a rare one out, and every adapter gets its
turn within about one cycle per slot. When the cache runs out during
decode, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later
(recompute is cheaper than swapping on every device we target, and needs no
host copy of the cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from loraserve.engine.adapter_slots import AdapterSlots
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.sequence import SeqStatus, Sequence


@dataclass
class Schedule:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        slots: AdapterSlots | None,
        max_num_seqs: int,
        max_prefill_tokens: int,
        adapter_cycle_s: float = 2.0,
    ) -> None:
        self.blocks, self.slots = blocks, slots
        self.adapter_cycle_s = adapter_cycle_s
        self.draining: set[int] = set()
        self._blocked_since: dict[str, float] = {}  # adapter key -> when its requests first lacked a slot
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        out = Schedule()
        self._schedule_decodes(out)
        self._admit(out)
        key = lambda s: -1 if s.slot is None else s.slot  # noqa: E731 - group rows by adapter slot
        out.decodes.sort(key=key)
        out.prefills.sort(key=key)
        return out

    def _schedule_decodes(self, out: Schedule) -> None:
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            if seq.drafts and not self.blocks.can_hold(seq.block_table, seq.num_tokens + len(seq.drafts)):
                seq.drafts = []  # speculation is optional: never preempt anyone for it
            while not self.blocks.can_hold(seq.block_table, seq.num_tokens + len(seq.drafts)):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.num_tokens + len(seq.drafts))
                out.decodes.append(seq)

    def _admit(self, out: Schedule) -> None:
        budget = self.max_prefill_tokens
        skipped: list[Sequence] = []
        now = time.monotonic()
        blocked: dict[str, float] = {}
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            if n > budget and out.prefills:
                break
            # keep one spare block per running sequence so admissions don't force immediate preemption
            reserve = min(len(self.running), self.blocks.num_free // 4)
            if not self.blocks.can_hold(seq.block_table, n, reserve):
                if self.running or out.prefills:
                    break
                if not self.blocks.can_hold(seq.block_table, n):
                    break  # cannot fit even alone; the engine rejects such requests up front
            if seq.uses_slot and self.slots is not None:
                key = seq.adapter.key
                resident = self.slots.key_to_slot.get(key)
                if (resident is not None and resident in self.draining) or (
                    resident is None and not self.slots.can_acquire(seq.adapter)
                ):
                    if resident is None:
                        blocked[key] = self._blocked_since.get(key, now)
                    skipped.append(self.waiting.popleft())  # others may proceed; retried next step
                    continue
                seq.slot = self.slots.acquire(seq.adapter)
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.prefills.append(seq)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        self._blocked_since = blocked
        self._rotate_adapters(now)

    def _rotate_adapters(self, now: float) -> None:
        if self.slots is None:
            return
        slots = self.slots
        self.draining = {s for s in self.draining if slots.refs[s] > 0}
        starving = sum(1 for t in self._blocked_since.values() if now - t >= self.adapter_cycle_s)
        need = starving - len(self.draining)
        if need <= 0:
            return
        busy = [s for s in range(slots.num_slots) if slots.refs[s] > 0 and s not in self.draining]
        busy.sort(key=lambda s: slots.loaded_at[s])
        self.draining.update(busy[:need])

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        if seq.slot is not None and self.slots is not None:
            self.slots.release(seq.slot)
            seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
        seq.drafts = []
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
