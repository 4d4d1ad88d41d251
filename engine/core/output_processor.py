"""Per-request output state: detokenising, stop conditions, and the deltas callers receive.

Owned by LLMEngine. Decides when a request is finished; the engine then tells the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.core.runner import SampledToken
from engine.core.sequence import Sequence
from engine.faults import FaultKind, InjectedFault
from engine.outputs import FinishReason, GenerationDelta, RequestTimings, TokenLogprob
from engine.structured.matchers import SequenceGrammar
from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.stop import StopStringMatcher
from engine.tokenizer.tokenizer import Tokenizer


@dataclass
class RequestState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None
    # Accumulates over prefill chunks; entry 0 (the first prompt token) has no logprob.
    prompt_logprobs: list[TokenLogprob | None] | None
    prompt_logprobs_sent: bool = False
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    pending_text: list[str] = field(default_factory=list)
    # The matcher of a constrained request, set when its grammar is ready.
    grammar: SequenceGrammar | None = None
    # Test-only faults armed for this request (engine/faults.py); empty in production.
    faults: frozenset[FaultKind] = frozenset()


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def new_state(self, seq: Sequence) -> RequestState:
        params = seq.params
        return RequestState(
            seq=seq,
            detokenizer=IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids,
                                               skip_special_tokens=params.skip_special_tokens),
            stop_matcher=StopStringMatcher(params.stop) if params.stop else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    def add_prompt_logprobs(self, state: RequestState, entries: list[TokenLogprob]) -> None:
        """Prompt logprobs arrive chunk by chunk; a recomputed prefill (after preemption)
        repeats entries we already hold, which are skipped."""
        held = state.prompt_logprobs
        if held is None or len(held) >= state.seq.num_prompt_tokens:
            return
        held.extend(entries[:state.seq.num_prompt_tokens - len(held)])

    def on_token(self, state: RequestState, sampled: SampledToken,
                 grammar_accepted: bool | None = None) -> GenerationDelta:
        """Append a sampled token, apply every stop rule, and build the delta.

        A constrained request also ends (stop) once its grammar is complete with nothing but
        EOS allowed after it: the text is then exactly a string the grammar accepts. Running
        out of max_tokens before that is ``length``, never ``stop``. ``grammar_accepted``: the
        matcher was already advanced by this token (the engine does a step's at once) and
        this is what it said; None advances it here.
        """
        seq = state.seq
        params = seq.params
        token_id = sampled.token_id
        seq.append_token(token_id)
        now = time.monotonic()
        if state.first_token_time is None:
            state.first_token_time = now
        state.last_token_time = now

        if FaultKind.DETOKENIZE_ERROR in state.faults and seq.num_output_tokens >= 2:
            raise InjectedFault("injected detokenizer fault")
        text = ""
        error = None
        if grammar_accepted is None and state.grammar is not None:
            grammar_accepted = state.grammar.accept(token_id)
        if state.grammar is not None and not grammar_accepted:
            # The sampler masked every token the grammar refuses: this is an engine fault.
            state.finish_reason = FinishReason.ERROR
            error = f"the grammar refused sampled token {token_id}: {state.grammar.error}"
        elif token_id == self.tokenizer.eos_token_id and not params.ignore_eos:
            state.finish_reason = FinishReason.STOP
        elif token_id in params.stop_token_ids:
            state.finish_reason, state.stop_reason = FinishReason.STOP, token_id
        else:
            text = self._feed(state, state.detokenizer.add([token_id]))
        if (state.finish_reason is None and state.grammar is not None
                and state.grammar.finished):
            state.finish_reason = FinishReason.STOP
        if state.finish_reason is None and (
                seq.num_output_tokens >= params.max_tokens
                or seq.num_tokens >= self.max_model_len):
            state.finish_reason = FinishReason.LENGTH
        # A stop string discards what follows it; any other ending releases held-back text.
        if state.finish_reason is not None and not isinstance(state.stop_reason, str):
            text += self._drain(state)
        return self._delta(state, (token_id,), text,
                           None if sampled.logprob is None else (sampled.logprob,), error)

    def on_finish(self, state: RequestState, reason: FinishReason,
                  error: str | None = None) -> GenerationDelta:
        """A delta that ends a request from outside (abort, engine fault)."""
        state.finish_reason = reason
        return self._delta(state, (), "", () if state.seq.params.logprobs is not None else None,
                           error=error)

    def _feed(self, state: RequestState, text: str) -> str:
        if state.stop_matcher is None or not text:
            return text
        result = state.stop_matcher.feed(text)
        if result.stop is not None:
            state.finish_reason, state.stop_reason = FinishReason.STOP, result.stop
        return result.text

    def _drain(self, state: RequestState) -> str:
        """The text still held back when a request ends without a stop string."""
        text = self._feed(state, state.detokenizer.flush())
        if not isinstance(state.stop_reason, str) and state.stop_matcher is not None:
            text += state.stop_matcher.flush()
        return text

    def _delta(self, state: RequestState, token_ids: tuple[int, ...], text: str,
               logprobs: tuple[TokenLogprob, ...] | None,
               error: str | None = None) -> GenerationDelta:
        seq = state.seq
        prompt_logprobs = None
        if state.prompt_logprobs is not None and not state.prompt_logprobs_sent:
            prompt_logprobs = tuple(state.prompt_logprobs)
            state.prompt_logprobs_sent = True
        finished = state.finish_reason is not None
        timings = None
        if finished:
            timings = RequestTimings(arrival=seq.arrival_time,
                                     first_scheduled=seq.first_scheduled_time,
                                     first_token=state.first_token_time,
                                     finished=time.monotonic(),
                                     last_token=state.last_token_time)
        return GenerationDelta(
            request_id=seq.request_id,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
            prompt_logprobs=prompt_logprobs,
            timings=timings,
            num_preemptions=seq.num_preemptions,
            error=error,
        )
