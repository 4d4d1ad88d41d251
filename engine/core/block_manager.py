"""The paged KV cache's bookkeeping: which fixed-size blocks of the pool each sequence owns.

Torch-free: the tensors live in the runner; this only hands out block ids. Invariant: every
block id is either in the free list or in exactly one sequence's block table.
"""

from __future__ import annotations

from collections import deque

from engine.core.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` must gain to hold ``num_tokens`` tokens in total."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens. Call can_allocate first."""
        n = self.num_new_blocks(seq, num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: need {n} blocks, {len(self._free)} free")
        seq.block_table.extend(self._free.popleft() for _ in range(n))

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` to the pool."""
        self._free.extend(seq.block_table)
        seq.block_table.clear()
