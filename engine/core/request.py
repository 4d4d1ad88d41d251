"""A request as the engine core holds it: its sequence, the token-level stop rules applied to
each step's tokens, and the outputs it sends to the front. Torch-free.

The rules, in the order they are checked for each new token: a token the request's grammar
refuses (the sampler masks them all, so this is an engine fault), EOS (unless ignore_eos), a
stop token id, a grammar that is complete with nothing but EOS allowed after it (the text is
then a string the grammar accepts), max_tokens, the model's context length. Stop strings are
the front's (engine/frontend/output_processor.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.sequence import Sequence
from engine.faults import FaultKind
from engine.ipc.messages import CoreFinish, RequestOutput
from engine.outputs import TokenLogprob
from engine.structured.matchers import SequenceGrammar


@dataclass(frozen=True)
class Accepted:
    """What a step's tokens did to a request."""

    token_ids: list[int]  # the tokens it keeps, in order
    finish: CoreFinish | None
    error: str | None = None


@dataclass
class CoreRequest:
    seq: Sequence
    # Accumulates over prefill chunks; entry 0 (the first prompt token) has no logprob.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    # Test-only faults armed for this request (engine/faults.py); empty in production.
    faults: frozenset[FaultKind] = frozenset()

    def accept(self, token_ids: tuple[int, ...], eos_token_id: int, max_model_len: int,
               grammar: SequenceGrammar | None = None,
               first_ok: bool | None = None) -> Accepted:
        """Make a step's tokens known, in order, until a rule ends the request. ``first_ok``:
        what ``grammar`` said of the first token when the step's matchers were advanced
        together (the other tokens are given to it here)."""
        seq, params = self.seq, self.seq.params
        kept: list[int] = []
        for j, token_id in enumerate(token_ids):
            seq.resolve_pending(token_id)
            kept.append(token_id)
            finish: CoreFinish | None = None
            if grammar is not None and not (first_ok if j == 0 and first_ok is not None
                                            else grammar.accept(token_id)):
                return Accepted(kept, CoreFinish.ERROR,
                                f"the grammar refused sampled token {token_id}: {grammar.error}")
            if token_id == eos_token_id and not params.ignore_eos:
                finish = CoreFinish.EOS
            elif token_id in params.stop_token_ids:
                finish = CoreFinish.STOP_TOKEN
            elif grammar is not None and grammar.finished:
                finish = CoreFinish.GRAMMAR_COMPLETE
            elif (len(seq.output_token_ids) >= params.max_tokens
                  or seq.num_known_tokens >= max_model_len):
                finish = CoreFinish.LENGTH
            if finish is not None:
                return Accepted(kept, finish)
        return Accepted(kept, None)

    def add_prompt_logprobs(self, entries: list[TokenLogprob]) -> None:
        """Prompt logprobs arrive chunk by chunk; a recomputed prefill (after preemption)
        repeats entries already held, which are skipped."""
        held, n = self.prompt_logprobs, self.seq.num_prompt_tokens
        if held is not None and len(held) < n:
            held.extend(entries[:n - len(held)])

    def output(self, token_ids: list[int], logprobs: list[TokenLogprob] | None,
               finish: CoreFinish | None, error: str | None = None) -> RequestOutput:
        """The request's part of a step's message; prompt logprobs go with the first."""
        seq = self.seq
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            prompt_logprobs = self.prompt_logprobs
            self.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=seq.request_id, token_ids=token_ids, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, finish=finish, error=error,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            num_preemptions=seq.num_preemptions, first_scheduled=seq.first_scheduled_time)
