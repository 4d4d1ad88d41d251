"""Content identity of full KV blocks, and the index of blocks whose content can be reused.

Torch-free. A full block's K/V is a function of every token up to its end (attention looks
back), of the model, and of whatever else changes the activations (the LoRA adapter it runs
with). Its hash therefore chains over the blocks before it:

    hash(block i) = sha256(hash(block i - 1) || extra key || token ids of block i)

so two sequences share the hash of block i only if they agree on every token of blocks 0..i
and on the extra key. The model is not in the hash: the index lives and dies with one engine,
which serves one model.

SHA-256 (hashlib, no dependency) rather than Python's ``hash()``: the latter is randomised per
process and only 64 bits, and a collision here would silently hand one request another's K/V.
At about a microsecond per 16-token block it is noise next to a model step.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from engine.core.sequence import Sequence

BlockHash = bytes  # a 32-byte SHA-256 digest

# The parent of a sequence's first block.
ROOT_HASH: BlockHash = hashlib.sha256(b"gptq-serve kv block v1").digest()


def _key_bytes(extra_key: str | None) -> bytes:
    """An unambiguous encoding: None and "" differ, and the length fences the key off from the
    token ids that follow it."""
    if extra_key is None:
        return b"\x00"
    raw = extra_key.encode("utf-8")
    return b"\x01" + len(raw).to_bytes(4, "little") + raw


def hash_block(parent: BlockHash, token_ids: list[int], extra_key: str | None) -> BlockHash:
    """The hash of one full block whose predecessor hashes to ``parent``."""
    h = hashlib.sha256(parent)
    h.update(_key_bytes(extra_key))
    h.update(array("I", token_ids).tobytes())  # token ids are validated non-negative < 2^32
    return h.digest()


def extend_block_hashes(seq: Sequence, block_size: int, num_blocks: int) -> None:
    """Make ``seq.block_hashes`` cover its first ``num_blocks`` blocks of tokens (each must be
    full). Hashes already there are kept: a sequence's tokens never change under them."""
    hashes = seq.block_hashes
    assert num_blocks * block_size <= seq.num_known_tokens, "only full, known blocks have a hash"
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), num_blocks):
        parent = hash_block(parent, seq.token_ids(i * block_size, (i + 1) * block_size),
                            seq.extra_hash_key)
        hashes.append(parent)


@dataclass
class PrefixCacheStats:
    """Totals since start, with vLLM's meaning: ``queries`` counts the prompt tokens of every
    request looked up in the cache at its first admission, ``hits`` those found cached."""

    queries: int = 0
    hits: int = 0


class CachedBlockIndex:
    """Which block holds each cached hash, and the LRU of cached blocks no sequence holds.

    Invariants: ``hash_of`` and ``block_of`` are inverse maps (one block per hash, one hash per
    block); a block is in ``idle`` only if it is cached and its reference count is 0. Reference
    counts live in the BlockManager, which tells this index when a block goes idle or is taken.
    """

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        # Cached blocks held by no sequence, least recently released first.
        self._idle: OrderedDict[int, None] = OrderedDict()

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def is_idle(self, block: int) -> bool:
        return block in self._idle

    def register(self, block_hash: BlockHash, block: int) -> bool:
        """Record that ``block`` holds ``block_hash``. Returns False (and records nothing) if
        another block already holds that content: the first copy stays the shared one."""
        assert block not in self._hash_of, "a cached block is immutable"
        if block_hash in self._block_of:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def forget(self, block: int) -> None:
        """Drop ``block``'s hash (its content is about to change). It must not be idle."""
        assert block not in self._idle
        del self._block_of[self._hash_of.pop(block)]

    def park(self, block: int) -> None:
        """A cached block's last holder let go: it becomes the most recently used idle one."""
        assert block in self._hash_of and block not in self._idle
        self._idle[block] = None

    def unpark(self, block: int) -> None:
        """An idle cached block is taken by a sequence (a cache hit)."""
        del self._idle[block]

    def evict(self) -> int:
        """Forget the least recently used idle block and return it, empty, for reuse."""
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def idle_blocks(self) -> list[int]:
        """Idle blocks, least recently used first (for tests and invariant checks)."""
        return list(self._idle)
