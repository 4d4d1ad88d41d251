"""The paged KV cache's bookkeeping: which fixed-size blocks of the pool each sequence holds,
shared read-only through the prefix cache.

Torch-free: the tensors live in the runner; this only hands out block ids. Every block is in
exactly one of three states:

- in use: its reference count (the number of live block tables holding it) is > 0;
- cached: no table holds it, but its content hash is registered, so a later sequence whose
  tokens start the same way can take it instead of recomputing it (an LRU, evicted oldest
  first only when a new block is needed and the free list is empty);
- free: no table holds it and its content is worth nothing.

Invariants: free + cached + in use == num_blocks; a block's reference count equals the number
of block tables that list it; only full blocks of computed tokens are ever registered, and a
registered block is never written (a sequence writes only at positions >= its
num_computed_tokens, which lie in blocks no other sequence can have found); a block in use is
never evicted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq

from engine.core.prefix_cache import CachedBlockIndex, extend_block_hashes
from engine.core.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cache = CachedBlockIndex()

    # ---- counts --------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks held by no sequence and holding nothing reusable."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks held by no sequence whose content is kept for reuse (evictable)."""
        return self._cache.num_idle

    @property
    def num_available_blocks(self) -> int:
        """Blocks a new allocation may take: free ones first, then evicted cached ones."""
        return len(self._free) + self._cache.num_idle

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def is_cached(self, block: int) -> bool:
        """Whether ``block``'s content hash is registered (in use or idle)."""
        return self._cache.is_cached(block)

    def free_blocks(self) -> list[int]:
        return list(self._free)

    def idle_cached_blocks(self) -> list[int]:
        """Cached blocks held by no sequence, least recently used first."""
        return self._cache.idle_blocks()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- the prefix cache ----------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold the longest prefix of ``seq``'s tokens, whole blocks
        only. At least one token is always left out, because the step that computes a
        sequence's last token is the one that yields its logits; when every block is cached
        the last one is recomputed. Takes no reference: pass the result to allocate()."""
        if not self.enable_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        extend_block_hashes(seq, self.block_size, max_blocks)
        found: list[int] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self._cache.lookup(block_hash)
            if block is None:
                break
            found.append(block)
        return found

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that are now full of computed tokens (prompt or generated)
        whose ids are known (a pending token's block waits for its id), so later sequences can
        share them. A block whose content another block already holds stays private (and goes
        to the free list when released)."""
        if not self.enable_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        extend_block_hashes(seq, self.block_size, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            self._cache.register(seq.block_hashes[i], seq.block_table[i])
        seq.num_cached_blocks = num_full

    # ---- allocation ----------------------------------------------------------------------

    def num_new_blocks(self, seq: Sequence, num_tokens: int, num_cached: int = 0) -> int:
        """Blocks ``seq`` must take from the pool to hold ``num_tokens`` tokens in total, when
        its first ``num_cached`` blocks come from the prefix cache."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table) - num_cached)

    def can_allocate(self, seq: Sequence, num_tokens: int, cached: Seq[int] = ()) -> bool:
        # Taking an idle cached block removes it from what new blocks may evict.
        revived = sum(1 for b in cached if self._ref_counts[b] == 0)
        return (self.num_new_blocks(seq, num_tokens, len(cached))
                <= self.num_available_blocks - revived)

    def allocate(self, seq: Sequence, num_tokens: int, cached: Seq[int] = ()) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens, its first blocks being
        ``cached`` (from find_cached_prefix; only for an empty table). Call can_allocate
        first."""
        if not self.can_allocate(seq, num_tokens, cached):
            raise RuntimeError(
                f"KV pool exhausted: need {self.num_new_blocks(seq, num_tokens, len(cached))} "
                f"blocks, {self.num_available_blocks} available")
        if cached:
            assert not seq.block_table, "cached blocks start a block table"
            # References first, so the new blocks below cannot evict the hits.
            for block in cached:
                self._take_ref(block)
            seq.block_table.extend(cached)
            seq.num_cached_blocks = len(cached)
        n = self.num_new_blocks(seq, num_tokens)
        seq.block_table.extend(self._new_block() for _ in range(n))

    def free(self, seq: Sequence) -> None:
        """Drop every reference ``seq`` holds. Released in reverse so that a sequence's tail
        blocks are evicted before its head: a prefix is worth keeping longer than what only
        follows it."""
        for block in reversed(seq.block_table):
            self._drop_ref(block)
        seq.block_table.clear()
        seq.num_cached_blocks = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Shrink ``seq``'s block table to its first ``num_tokens`` tokens (e.g. rejected draft
        tokens), releasing the blocks past them; ``num_computed_tokens`` and the hashes of
        blocks past ``num_tokens`` are cut to match. The caller trims the token ids themselves.

        The last kept block, if partial, will be written again: if it was registered and only
        ``seq`` holds it, its hash is dropped; if another sequence shares it, ``seq`` gives it
        up instead and keeps only the whole blocks before it (the rest is recomputed)."""
        if not 0 <= num_tokens <= len(seq.block_table) * self.block_size:
            raise ValueError(f"cannot truncate a {len(seq.block_table)}-block table to "
                             f"{num_tokens} tokens")
        keep = self.blocks_needed(num_tokens)
        num_full = num_tokens // self.block_size
        if keep > num_full and keep <= seq.num_cached_blocks:
            last = seq.block_table[keep - 1]
            if self._ref_counts[last] > 1:
                keep, num_tokens = num_full, num_full * self.block_size
            elif self._cache.is_cached(last):
                self._cache.forget(last)
        for block in reversed(seq.block_table[keep:]):
            self._drop_ref(block)
        del seq.block_table[keep:]
        seq.num_cached_blocks = min(seq.num_cached_blocks, num_full)
        del seq.block_hashes[num_full:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

    # ---- reference counts ----------------------------------------------------------------

    def _new_block(self) -> int:
        block = self._free.popleft() if self._free else self._cache.evict()
        assert self._ref_counts[block] == 0
        self._ref_counts[block] = 1
        return block

    def _take_ref(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            self._cache.unpark(block)
        self._ref_counts[block] += 1

    def _drop_ref(self, block: int) -> None:
        count = self._ref_counts[block] - 1
        if count < 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self._ref_counts[block] = count
        if count == 0:
            if self._cache.is_cached(block):
                self._cache.park(block)
            else:
                self._free.append(block)
