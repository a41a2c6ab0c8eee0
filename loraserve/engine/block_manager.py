"""Fixed-size KV blocks, per-sequence block tables and a free list.

A sequence's cache lives in whatever blocks it was handed; growing or
shrinking the batch never moves anyone's cache. Freed blocks go back to the
free list immediately so the next step can admit more work.

Block 0 is never handed out: padded block-table entries point at it, and
it stays all zeros, so masked-out attention positions never read stale
values (0 x NaN would still be NaN).
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        # stack: pop() hands out low ids first; block 0 is the reserved null block
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))

    @property
    def capacity(self) -> int:
        """Blocks that sequences can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a table must get to hold `num_tokens` tokens."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(table))

    def can_hold(self, table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(table, num_tokens) + reserve <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` in place so it covers `num_tokens`; caller checked `can_hold`."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            table.append(self._free.pop())

    def shrink(self, table: list[int], num_tokens: int) -> None:
        """Return blocks beyond `num_tokens` (speculative decoding rolls back rejected drafts)."""
        keep = -(-num_tokens // self.block_size)
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()
