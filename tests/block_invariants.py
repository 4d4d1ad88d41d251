"""The KV block invariants, checked from the outside after every step of a test workload.

``check_block_invariants`` reads the scheduler's block tables and the block manager's lists;
``ShadowKV`` stands in for the KV tensors: it records which token prefix each slot was computed
for, so a test can prove that every sequence reads back its own K/V (no block in use was
evicted or overwritten by another sequence, and every cache hit held the right content).
"""

from __future__ import annotations

from collections import Counter

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence


def check_block_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    tables = [seq.block_table for seq in sched.running]
    for table in tables:
        assert len(table) == len(set(table)), "a table lists a block twice"
    holders = Counter(b for table in tables for b in table)
    for block in range(bm.num_blocks):
        assert bm.ref_count(block) == holders[block], \
            f"block {block}: ref count {bm.ref_count(block)}, held by {holders[block]} tables"
    free, idle = bm.free_blocks(), bm.idle_cached_blocks()
    assert len(free) == len(set(free)), "a block is on the free list twice (double free)"
    in_use = set(holders)
    assert not set(free) & set(idle) and not set(free) & in_use and not set(idle) & in_use
    assert len(free) + len(idle) + len(in_use) == bm.num_blocks, "a block leaked"
    assert bm.num_free_blocks == len(free) and bm.num_cached_blocks == len(idle)
    assert all(bm.is_cached(b) for b in idle) and not any(bm.is_cached(b) for b in free)
    for seq in sched.running:
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
        assert seq.num_cached_blocks <= seq.num_computed_tokens // bm.block_size
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
        assert seq.num_cached_blocks == 0


def check_writes_are_private(out: SchedulerOutput, bm: BlockManager) -> None:
    """Every block a step writes K/V into is held by its sequence alone and is not in the
    prefix cache (so no other sequence can be reading it, now or later, as a cached prefix)."""
    for s in out.scheduled:
        start = s.seq.num_computed_tokens
        for i in range(start // bm.block_size, (start + s.num_new_tokens - 1) // bm.block_size + 1):
            block = s.seq.block_table[i]
            assert bm.ref_count(block) == 1, f"block {block} is shared yet written"
            assert not bm.is_cached(block), f"cached block {block} is written"


def _identity(seq: Sequence, position: int) -> tuple[str | None, tuple[int, ...]]:
    """What the K/V at ``position`` of ``seq`` is a function of: every token up to it."""
    return seq.extra_hash_key, tuple(seq.token_ids(0, position + 1))


class ShadowKV:
    """slot -> the identity of the K/V last written there."""

    def __init__(self, bm: BlockManager) -> None:
        self.block_size = bm.block_size
        self.slots: dict[int, tuple[str | None, tuple[int, ...]]] = {}

    def write(self, out: SchedulerOutput) -> None:
        """What the model does to the cache for this step (call before on_step_launched)."""
        for s in out.scheduled:
            seq = s.seq
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens):
                self.slots[self._slot(seq, p)] = _identity(seq, p)

    def check(self, sched: Scheduler) -> None:
        """Every running sequence's computed positions hold its own K/V."""
        for seq in sched.running:
            for p in range(seq.num_computed_tokens):
                assert self.slots.get(self._slot(seq, p)) == _identity(seq, p), \
                    f"{seq.request_id} position {p} holds another sequence's K/V"

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size \
            + position % self.block_size
