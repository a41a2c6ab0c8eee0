"""Continuous batching: every step, decode everyone running and admit whoever fits.

Admission is bounded by the prefill-token budget, the number of sequences,
free KV blocks and free adapter slots. When the cache runs out during
decode, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later
(recompute is cheaper than swapping on every device we target, and needs no
host copy of the cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loraserve.engine.adapter_slots import AdapterSlots
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.sequence import Sequence, SeqStatus


@dataclass
class Schedule:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: AdapterSlots | None, max_num_seqs: int,
                 max_prefill_tokens: int) -> None:
        self.blocks, self.slots = blocks, slots
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
            while not self.blocks.can_hold(seq.block_table, seq.num_tokens):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.num_tokens)
                out.decodes.append(seq)

    def _admit(self, out: Schedule) -> None:
        budget = self.max_prefill_tokens
        skipped: list[Sequence] = []
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
            if seq.adapter is not None and self.slots is not None:
                if not self.slots.can_acquire(seq.adapter):
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

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        if seq.slot is not None and self.slots is not None:
            self.slots.release(seq.slot)
            seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
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
