"""Fixed-size KV blocks, per-sequence block tables, a free list and the prefix cache.

A sequence's cache lives in whatever blocks it was handed; growing or
shrinking the batch never moves anyone's cache.

Block 0 is never handed out: padded block-table entries point at it, and
it stays all zeros, so masked-out attention positions never read stale
values (0 x NaN would still be NaN).

Prefix caching: a *full* block whose K/V are computed gets a content address
(engine/prefix_cache.py: adapter identity + every token up to its end). Blocks
are reference-counted; a sequence whose prompt starts with cached addresses
takes those blocks (one more reference) instead of computing them. When the last
reference goes, an addressed block is not freed but parked in an LRU of reusable
blocks, which the allocator drains (oldest first, a table's tail before its head,
so shared heads live longest) only when the free list is empty: caching costs
nothing until memory is needed, and a block somebody holds is never evicted.
Only full blocks are shared and a sequence only ever writes past its own cached
tokens, so a shared block is never written (no copy-on-write needed).

A block is addressed *pending* when a sequence is admitted to compute it, and
becomes reusable once that forward pass ran: a second request for the same
prefix waits for it instead of computing it again.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        # stack: pop() hands out low ids first; block 0 is the reserved null block
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks
        self._addr: dict[int, bytes] = {}  # block -> content address
        self._index: dict[bytes, int] = {}  # content address -> block
        self._pending: set[int] = set()  # addressed, but its forward pass has not run yet
        self._lru: OrderedDict[int, None] = OrderedDict()  # addressed blocks nobody holds, oldest first
        self._dirty: set[int] = set()  # may hold NaN/inf: zeroed before anyone else gets them
        self._to_zero: list[int] = []
        self.hits = self.misses = self.evictions = 0  # in blocks

    @property
    def capacity(self) -> int:
        """Blocks that sequences can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks a new table can get: never used, or cached and held by nobody."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Reusable cached blocks held by nobody (evicted first when memory is needed)."""
        return len(self._lru)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a table must get to hold `num_tokens` tokens."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(table))

    def can_hold(self, table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(table, num_tokens) + reserve <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` in place so it covers `num_tokens`; caller checked `can_hold`."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            table.append(self._alloc())

    def shrink(self, table: list[int], num_tokens: int) -> None:
        """Return blocks beyond `num_tokens` (speculative decoding rolls back rejected drafts;
        those blocks are never addressed: only blocks of computed tokens are)."""
        keep = -(-num_tokens // self.block_size)
        while len(table) > keep:
            self._release(table.pop())

    def free(self, table: list[int]) -> None:
        for b in reversed(table):  # tail first into the LRU: evicted before the shared head
            self._release(b)
        table.clear()

    # ---- prefix cache -------------------------------------------------------------------------------
    def match(self, addresses: list[bytes]) -> tuple[list[int], bool]:
        """The cached blocks of the longest computed prefix of `addresses`, and whether the
        run stopped at a block another sequence is computing right now (worth waiting for)."""
        out: list[int] = []
        for a in addresses:
            b = self._index.get(a)
            if b is None:
                return out, False
            if b in self._pending:
                return out, True
            out.append(b)
        return out, False

    def cost(self, matched: list[int], num_tokens: int) -> int:
        """Free blocks a table starting with the `matched` blocks takes to cover `num_tokens`."""
        parked = sum(1 for b in matched if self._refs[b] == 0)
        return parked + max(0, -(-num_tokens // self.block_size) - len(matched))

    def share(self, matched: list[int]) -> list[int]:
        """A new table holding the `matched` cached blocks (one more reference each)."""
        for b in matched:
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1
        self.hits += len(matched)
        return list(matched)

    def address(self, table: list[int], addresses: list[bytes], start: int, computed: bool) -> None:
        """Address `table[start:len(addresses)]`; `computed=False`: the step that computes them is
        still to run (others wait for it). A block already addressed keeps its address, and one
        whose address another block has stays private: one copy of each prefix is shared."""
        for i in range(start, min(len(addresses), len(table))):
            b = table[i]
            if b in self._addr:
                if computed:
                    self._pending.discard(b)
                continue
            if b in self._dirty or addresses[i] in self._index:
                continue
            self._addr[b], self._index[addresses[i]] = addresses[i], b
            if not computed:
                self._pending.add(b)

    def poison(self, table: list[int]) -> None:
        """The table's blocks may hold NaN/inf (a failed request): nobody new may match them,
        and each is zeroed when its last holder lets go (see `take_dirty`)."""
        for b in table:
            self._forget(b)
            self._dirty.add(b)

    def take_dirty(self) -> list[int]:
        """Released poisoned blocks, to be zeroed by the caller now; they become free."""
        out, self._to_zero = self._to_zero, []
        self._free.extend(out)
        return out

    # ---- internals ------------------------------------------------------------------------------
    def _alloc(self) -> int:
        if self._free:
            b = self._free.pop()
        else:  # caller checked can_hold: the LRU has one
            b, _ = self._lru.popitem(last=False)
            self._forget(b)
            self.evictions += 1
        self._refs[b] = 1
        return b

    def _release(self, b: int) -> None:
        self._refs[b] -= 1
        if self._refs[b] > 0:
            return
        if b in self._dirty:
            self._dirty.discard(b)
            self._to_zero.append(b)
        elif b in self._addr and b not in self._pending:
            self._lru[b] = None
        else:
            self._forget(b)
            self._free.append(b)

    def _forget(self, b: int) -> None:
        a = self._addr.pop(b, None)
        if a is not None and self._index.get(a) == b:
            del self._index[a]
        self._pending.discard(b)
