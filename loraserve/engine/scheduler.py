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

Prefix caching (block_manager.py): a prompt whose leading full blocks are cached
takes them and prefills only the rest (always at least its last token, for the
logits); a prompt whose next block another sequence is computing right now waits
one step for it instead of computing a copy. `decoder_input_details` requests need
logits at every prompt position, so they compute the whole prompt (their blocks are
still offered to others). Preempted sequences offer their computed blocks to the
cache on the way out, so the recompute usually finds them.

Chunked prefill: the step's prefill budget is split over prompts, each taking
at most what is left of it, so a long prompt is fed over several steps beside
the running decodes and every step's work stays bounded. The budget counts
work, not tokens: a prompt token `ctx` positions in also attends to `ctx` keys,
which on a small model soon costs more than its projections (SmolLM-135M: at
3,072 keys; a 7B Llama: at ~25k), so a chunk deep into a long prompt gets
`budget / (1 + ctx / context_cost)` tokens (at least one). With a fixed token
count, a 16-token chunk at position 4,000 of a 135M model doubled the step
time of 31 decoding streams; sized by cost, every chunk step costs the same.
A chunked prompt's blocks are all taken at admission, so later chunks never
wait for memory. Logit-hungry `decoder_input_details` prompts are never chunked.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from loraserve.engine.adapter_slots import AdapterSlots
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.prefix_cache import extend_hashes
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
        prefix_caching: bool = False,
        chunked_prefill: bool = False,
        context_cost: int | None = None,
    ) -> None:
        """`max_prefill_tokens`: prompt tokens fed per step (the chunk budget when chunking, in
        tokens without context); `context_cost`: the context length at which a prompt token's
        attention costs as much as its projections (`ModelConfig.attention_cost_context`), or
        None to count chunks in plain tokens."""
        self.blocks, self.slots = blocks, slots
        self.caching, self.chunked = prefix_caching, chunked_prefill
        self.context_cost = context_cost
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
        for seq in self.running:
            self._commit(seq)
        budget = self._schedule_running(out)
        self._admit(out, budget)
        key = lambda s: -1 if s.slot is None else s.slot  # noqa: E731 - group rows by adapter slot
        out.decodes.sort(key=key)
        out.prefills.sort(key=key)
        return out

    def _commit(self, seq: Sequence) -> None:
        """Offer the sequence's newly computed full blocks to the prefix cache."""
        if not self.caching:
            return
        full = min(seq.num_cached // self.blocks.block_size, len(seq.block_table))
        if full > seq.committed_blocks:
            addresses = extend_hashes(seq, full, self.blocks.block_size)
            self.blocks.address(seq.block_table, addresses[:full], seq.committed_blocks, computed=True)
            seq.committed_blocks = full

    def _schedule_running(self, out: Schedule) -> int:
        """Decode every running sequence (preempting the newest when blocks run out) and give
        chunked prompts part-way through their next chunk; returns the prefill budget left."""
        budget = self.max_prefill_tokens
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            seq.admitted_now = False
            left = seq.num_tokens - seq.num_cached
            if left > 1:  # a chunked prompt part-way through: its blocks were taken at admission
                if budget > 0:
                    feed, used = self._chunk(budget, seq.num_cached, left)
                    seq.prefill_end = seq.num_cached + feed
                    budget -= used
                    out.prefills.append(seq)
                continue
            seq.prefill_end = None
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
        return budget

    def _chunk(self, budget: int, ctx: int, left: int) -> tuple[int, int]:
        """(prompt tokens to feed, budget they use) for a chunk starting `ctx` tokens in."""
        if self.context_cost is None:
            n = min(left, budget)
            return n, n
        per_token = 1.0 + ctx / self.context_cost
        n = max(1, min(left, int(budget / per_token)))
        return n, math.ceil(n * per_token)

    def _lookup(self, seq: Sequence, whole: bool) -> tuple[list[int], bool]:
        """(cached blocks the prompt can start from, whether to wait a step for more)."""
        if not self.caching or whole:
            return [], False
        full = (seq.num_tokens - 1) // self.blocks.block_size  # the last token is always computed
        return self.blocks.match(extend_hashes(seq, full, self.blocks.block_size)[:full])

    def _admit(self, out: Schedule, budget: int) -> None:
        skipped: list[Sequence] = []
        now = time.monotonic()
        blocked: dict[str, float] = {}
        bs = self.blocks.block_size
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            whole = seq.params.prefill_logprobs and not seq.prefill_reported  # logits at every position
            matched, wait = self._lookup(seq, whole)
            if wait:  # another sequence is computing our next block: reuse it next step
                skipped.append(self.waiting.popleft())
                continue
            todo = n - len(matched) * bs
            if self.chunked and not whole:
                if budget <= 0:
                    break
                feed, used = self._chunk(budget, len(matched) * bs, todo)
            else:
                if todo > budget and out.prefills:
                    break
                feed = used = todo
            # keep one spare block per running sequence so admissions don't force immediate preemption
            reserve = min(len(self.running), self.blocks.num_free // 4)
            cost = self.blocks.cost(matched, n)
            if cost + reserve > self.blocks.num_free:
                if self.running or out.prefills:
                    break
                if cost > self.blocks.num_free:
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
            self._place(seq, matched, whole)
            seq.prefill_end = seq.num_cached + feed if self.chunked and not whole else None
            seq.admitted_now = True
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.prefills.append(seq)
            budget -= used
        self.waiting.extendleft(reversed(skipped))
        self._blocked_since = blocked
        self._rotate_adapters(now)

    def _place(self, seq: Sequence, matched: list[int], whole: bool) -> None:
        """Give an admitted sequence its blocks: the cached prefix shared, the rest new, and the
        new full blocks of its prompt addressed as pending so identical prompts wait for them."""
        bs, n = self.blocks.block_size, seq.num_tokens
        seq.block_table = self.blocks.share(matched)
        seq.num_cached = len(matched) * bs
        seq.committed_blocks = len(matched)
        self.blocks.grow(seq.block_table, n)
        if self.caching:
            if not whole:
                self.blocks.misses += (n - 1) // bs - len(matched)
            addresses = extend_hashes(seq, n // bs, bs)
            self.blocks.address(seq.block_table, addresses[: n // bs], len(matched), computed=False)

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
        self._commit(seq)  # its computed blocks stay cached: the recompute usually finds them
        self._release(seq)
        seq.num_cached = seq.committed_blocks = 0
        seq.prefill_end = None
        seq.drafts = []
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._commit(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
