"""Per-sequence grammar state and the per-step token masks built from it.

Each constrained sequence owns one matcher, advanced with every token it accepts; the step's
masks are computed for the constrained rows only, in llguidance's threads (no GIL), while the
device still runs the step's forward pass (nothing has waited for it yet when the sampler asks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance

if TYPE_CHECKING:
    import torch

    from engine.sampling.grammar_mask import GrammarMasks


class SequenceGrammar:
    """One sequence's matcher: the text so far is a prefix the grammar accepts."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar refuses it (then the matcher is in
        an error state for good; the sampler's mask makes this an engine fault, never input)."""
        return self.matcher.consume_token(token_id)

    @property
    def finished(self) -> bool:
        """The output is complete and nothing but EOS may follow: the request ends here."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class StepGrammars:
    """The grammars of one step's constrained sequences, by index into
    ``SchedulerOutput.scheduled``; built only when some sampling sequence has one."""

    def __init__(self, executor: llguidance.LLExecutor | None,
                 by_scheduled_index: dict[int, SequenceGrammar]) -> None:
        # None: compute the masks on the calling thread (a pool of one thread only adds a
        # hand-off, which on a busy machine waits for the scheduler).
        self.executor = executor
        self.by_scheduled_index = by_scheduled_index

    def masks_for(self, sampling_seq_indices: Sequence[int]) -> GrammarMasks | None:
        """The sampler's side input: which of its rows (row k samples for scheduled sequence
        ``sampling_seq_indices[k]``) are constrained, and how to write their masks."""
        from engine.sampling.grammar_mask import GrammarMasks

        pairs = [(row, self.by_scheduled_index[i]) for row, i in enumerate(sampling_seq_indices)
                 if i in self.by_scheduled_index]
        if not pairs:
            return None
        matchers = [g.matcher for _, g in pairs]

        def fill(bitmask: torch.Tensor) -> None:
            # bitmask: [R, ceil(V / 32)] int32, host memory, contiguous; row j for pairs[j].
            assert bitmask.is_contiguous() and bitmask.dtype.itemsize == 4
            assert bitmask.device.type == "cpu" and bitmask.shape[0] == len(matchers)
            row_bytes = bitmask.shape[1] * 4
            if self.executor is None or len(matchers) == 1:
                for j, m in enumerate(matchers):
                    m.unsafe_compute_mask_ptr(bitmask.data_ptr() + j * row_bytes, row_bytes)
                return
            self.executor.unsafe_compute_mask_ptr(
                [(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(), row_bytes,
                len(matchers))

        return GrammarMasks(rows=tuple(row for row, _ in pairs), fill=fill)
