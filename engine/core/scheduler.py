"""Continuous batching over the paged KV cache. Torch-free.

NOTE: there is no separate prefill phase or decode phase. Each step hands every scheduled
sequence a number of new tokens to compute: 1 for a decoding sequence, up to the rest of the
prompt for a prefilling one (chunked when the step's token budget runs short). Policy:

1. Running sequences first, oldest first. Each needs KV blocks for its new tokens; when the pool
   is dry the youngest running sequence is preempted (its block references dropped, recomputed
   later) until the older one fits. Older requests therefore always make progress. A preempted
   sequence's full blocks stay in the prefix cache until evicted, which often shortens its
   recompute.
2. Then waiting sequences in arrival order, while the token budget, ``max_num_seqs`` and free
   blocks allow. Admission stops at the first one that does not fit (no overtaking), so nothing
   starves: the head of the queue gets the next blocks to come free.
3. An admitted sequence first takes the longest run of its leading full blocks that the prefix
   cache holds (references on them, no compute) and is scheduled for the rest only. Requests
   that want prompt logprobs take no hits: every prompt position's logits must be computed.
   Blocks join the cache once they are full of computed tokens whose ids are known (after the
   step that filled them), so a prefix computed in this step is shared from the next one on.
4. With LoRA, the running sequences use at most ``max_loras`` distinct adapters (the device
   holds that many): a waiting sequence whose adapter would be one too many is not admitted,
   and admission stops there (no overtaking) until a running adapter's last sequence ends.
   Every step's adapters are a subset of the running ones, so no step needs more.

The engine schedules step n + 1 while step n still runs on the device (engine/core/
llm_engine.py), so a running sequence may hold a token that is sampled but not yet known
(``Sequence.num_pending_tokens``). The scheduler plans as if it were known: the device feeds
it to the next step. Two consequences: a running sequence whose pending tokens already reach
``max_tokens`` or ``max_model_len`` is not scheduled again (it ends when they arrive), and a
waiting sequence (preempted while a token was pending) is admitted only once none is, because
its recompute needs every token id on the host.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.prefix_cache import PrefixCacheStats
from engine.core.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # Distinct LoRA adapters the running sequences may use at once (None: LoRA off).
    max_loras: int | None = None


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step, fixed when it is scheduled (the sequence itself moves
    on when the step is launched, before its results are known)."""

    seq: Sequence
    # Compute tokens [start, start + num_new_tokens) this step.
    num_new_tokens: int
    start: int = field(init=False)
    # Whether this step yields logits for a new token of the sequence.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        start = self.seq.num_computed_tokens
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "samples", start + self.num_new_tokens == self.seq.num_tokens)

    @property
    def num_new_prompt_tokens(self) -> int:
        """How many of this step's new tokens are prompt tokens."""
        return max(0, min(self.start + self.num_new_tokens, self.seq.num_prompt_tokens)
                   - self.start)


@dataclass(frozen=True)
class SchedulerOutput:
    """The only thing the runner receives. Sequences appear in batch order."""

    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions_total = 0
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._done_pending(seq):
                i += 1
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_new, preempted):
                break  # seq itself was the youngest and got preempted
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1

        # Admit waiting sequences only when no running one had to give way this step.
        adapters = {s.lora.id for s in self.running if s.lora is not None}
        while self.waiting and budget > 0 and not preempted \
                and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # its tokens arrive with the step in flight; admitted after that
            if not self._adapter_fits(seq, adapters):
                break
            num_new = self._admit(seq, budget)
            if num_new is None:
                break
            self.waiting.popleft()
            self.running.append(seq)
            if seq.lora is not None:
                adapters.add(seq.lora.id)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _adapter_fits(self, seq: Sequence, adapters: set[int]) -> bool:
        limit = self.config.max_loras
        return (seq.lora is None or limit is None or seq.lora.id in adapters
                or len(adapters) < limit)
    def _done_pending(self, seq: Sequence) -> bool:
        """Whether ``seq``'s pending tokens already end it by length: nothing more to run."""
        return seq.num_pending_tokens > 0 and (
            seq.num_output_tokens >= seq.params.max_tokens
            or seq.num_tokens >= self.config.max_model_len)

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Give a waiting sequence its blocks (cached prefix first) and start it running.
        Returns how many tokens it computes this step, or None if its blocks do not fit."""
        blocks = self.block_manager
        use_cache = blocks.enable_caching and seq.params.prompt_logprobs is None
        hit = blocks.find_cached_prefix(seq) if use_cache else []
        num_cached = len(hit) * blocks.block_size
        num_new = min(seq.num_tokens - num_cached, budget)
        if not blocks.can_allocate(seq, num_cached + num_new, hit):
            return None
        blocks.allocate(seq, num_cached + num_new, hit)
        seq.num_computed_tokens = num_cached
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            # First admission; a readmission after preemption counts in neither usage nor the
            # metrics (as its recomputed prefill counts in no prompt-token total).
            seq.first_scheduled_time = time.monotonic()
            seq.num_cached_prompt_tokens = num_cached
            if use_cache:
                self.prefix_cache_stats.queries += seq.num_prompt_tokens
                self.prefix_cache_stats.hits += num_cached
        return num_new

    def _make_room(self, seq: Sequence, num_new: int, preempted: list[Sequence]) -> bool:
        """Allocate blocks for ``seq``'s next ``num_new`` tokens, preempting the youngest running
        sequences as needed. Returns False if ``seq`` itself had to be preempted."""
        target = seq.num_computed_tokens + num_new
        while not self.block_manager.can_allocate(seq, target):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        # Back to the head of the queue: it is older than everything waiting behind it.
        self.waiting.appendleft(seq)

    def on_step_launched(self, output: SchedulerOutput) -> None:
        """Advance each scheduled sequence once its step is queued on the device (the next step
        is planned from there), and offer the blocks it fills to the prefix cache. Later steps
        read those blocks after this one wrote them: the device runs steps in order."""
        for s in output.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence) -> None:
        """End ``seq`` (stopped, length, aborted or failed) and free all its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
