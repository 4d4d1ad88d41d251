"""A request's token sequence and its lifecycle state. Torch-free."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.lora.registry import LoraHandle
from engine.params import SamplingParams


class SequenceStatus(enum.IntEnum):
    """Ordered so that "finished" is one comparison: ``status >= SequenceStatus.FINISHED``."""

    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(eq=False)
class Sequence:
    """One generation stream. Invariants:

    - ``num_computed_tokens`` tokens (a prefix of ``all_token_ids``) have their K/V in the
      blocks of ``block_table``; ``len(block_table) * block_size >= num_computed_tokens``.
    - A WAITING sequence holds no blocks and has ``num_computed_tokens == 0`` (preemption is by
      recompute: its prompt and outputs so far are prefilled again when it is readmitted, less
      whatever prefix the prefix cache still holds).
    - The first ``num_cached_blocks`` entries of ``block_table`` are full of computed tokens and
      were offered to the prefix cache (taken from it, or registered once computed); such a
      block is never written again. ``block_hashes[i]`` is the content hash of token block
      ``i`` (see engine/core/prefix_cache.py), computed lazily and kept across preemptions.
    - A step samples a new token for a sequence only when it computes the sequence's last
      token (the final chunk of a prefill, or a decode step); earlier prefill chunks only fill
      the cache.
    - Tokens sampled by a step still running on the device are counted, but not yet known:
      ``num_pending_tokens`` of them follow ``output_token_ids`` (the engine overlaps the next
      step with the device, see engine/core/llm_engine.py). The next step reads them on the
      device; ``token_ids`` serves known tokens only, and a block is hashed only once every
      token in it is known. A waiting sequence is admitted only with none pending.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # What else shapes this sequence's K/V besides its token ids (e.g. the LoRA adapter it
    # runs with); part of every block hash, so sequences whose keys differ never share KV
    # blocks. None: the base model alone.
    extra_hash_key: str | None = None
    # The LoRA adapter this sequence runs with (None: the base model). Its hash_key is the
    # sequence's extra_hash_key.
    lora: LoraHandle | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Sampled tokens the host knows, in order.
    output_token_ids: list[int] = field(default_factory=list)
    # Sampled tokens still on the device (they follow output_token_ids).
    num_pending_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_blocks: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    # Prompt tokens found in the prefix cache when the sequence was first admitted (usage).
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Sampled tokens, pending ones included."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt and sampled tokens, pending ones included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Prompt and sampled tokens whose ids the host has."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status >= SequenceStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the concatenation; all of
        them must be known."""
        assert end <= self.num_known_tokens, "pending tokens are only on the device"
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n_prompt]

    def append_token(self, token_id: int) -> None:
        """A sampled token the host knows at once (nothing pending)."""
        assert self.num_pending_tokens == 0, "a pending token comes first"
        self.output_token_ids.append(token_id)

    def resolve_pending(self, token_id: int) -> None:
        """The oldest pending token's id has reached the host."""
        assert self.num_pending_tokens > 0, "no token is pending"
        self.num_pending_tokens -= 1
        self.output_token_ids.append(token_id)
