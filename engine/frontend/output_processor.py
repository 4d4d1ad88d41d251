"""The front's half of a request's output: detokenising, stop strings, and the deltas callers
receive. Torch-free; runs in the HTTP process, on the event loop, so none of it stalls an
engine step.

The engine core sends each step's token ids per request (``RequestOutput``) and decides the
token-level endings (EOS, stop token ids, length). Stop strings are found here; when one is,
the request ends here at once and the caller (engine/frontend/client.py) tells the core to
abort it, which it does within a step. Tokens the core sent past that point are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine.faults import FaultKind, InjectedFault
from engine.ipc.messages import CoreFinish, RequestOutput
from engine.outputs import FinishReason, GenerationDelta, RequestTimings, TokenLogprob
from engine.params import SamplingParams
from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.stop import StopStringMatcher
from engine.tokenizer.tokenizer import Tokenizer

_FINISH = {CoreFinish.EOS: FinishReason.STOP, CoreFinish.STOP_TOKEN: FinishReason.STOP,
           CoreFinish.GRAMMAR_COMPLETE: FinishReason.STOP,
           CoreFinish.LENGTH: FinishReason.LENGTH, CoreFinish.ABORT: FinishReason.ABORT,
           CoreFinish.ERROR: FinishReason.ERROR}


@dataclass
class RequestState:
    request_id: str
    num_prompt_tokens: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None
    arrival_time: float
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # Test-only faults armed for this request (engine/faults.py); empty in production.
    faults: frozenset[FaultKind] = frozenset()


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def new_state(self, request_id: str, prompt_token_ids: Sequence[int],
                  params: SamplingParams, arrival_time: float) -> RequestState:
        return RequestState(
            request_id=request_id, num_prompt_tokens=len(prompt_token_ids), params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                               skip_special_tokens=params.skip_special_tokens),
            stop_matcher=StopStringMatcher(params.stop) if params.stop else None,
            arrival_time=arrival_time)

    def process(self, state: RequestState, out: RequestOutput) -> GenerationDelta:
        """One step's output of the core for this request -> the caller's delta. Sets
        ``state.finish_reason`` when the request ends (by the core's ending or a stop
        string)."""
        assert state.finish_reason is None, "the request has already ended"
        state.num_cached_tokens = out.num_cached_tokens
        state.num_preemptions = out.num_preemptions
        if state.first_scheduled is None:
            state.first_scheduled = out.first_scheduled
        tokens = out.token_ids
        if (FaultKind.DETOKENIZE_ERROR in state.faults
                and state.num_output_tokens + len(tokens) >= 2):
            raise InjectedFault("injected detokenizer fault")  # on the request's 2nd token
        if tokens:
            state.last_token_time = time.monotonic()
            if state.first_token_time is None:
                state.first_token_time = state.last_token_time
        # EOS and a stop token end the text before themselves.
        silent_last = out.finish in (CoreFinish.EOS, CoreFinish.STOP_TOKEN)
        text = ""
        kept = len(tokens)
        for j, token_id in enumerate(tokens):
            if silent_last and j == len(tokens) - 1:
                break
            text += self._feed(state, state.detokenizer.add([token_id]))
            if state.finish_reason is not None:  # a stop string: what follows is dropped
                kept = j + 1
                break
        state.num_output_tokens += kept
        if state.finish_reason is None and out.finish is not None:
            state.finish_reason = _FINISH[out.finish]
            if out.finish is CoreFinish.STOP_TOKEN:
                state.stop_reason = tokens[-1]
        # A stop string discards what follows it; any other ending releases held-back text.
        if state.finish_reason is not None and not isinstance(state.stop_reason, str):
            text += self._drain(state)
        logprobs = None if out.logprobs is None else tuple(out.logprobs[:kept])
        prompt = None if out.prompt_logprobs is None else tuple(out.prompt_logprobs)
        return self._delta(state, tuple(tokens[:kept]), text, logprobs, prompt, out.error)

    def end(self, state: RequestState, reason: FinishReason,
            error: str | None = None) -> GenerationDelta:
        """A delta that ends a request from the front (abort, a core that died)."""
        state.finish_reason = reason
        return self._delta(state, (), "", () if state.params.logprobs is not None else None,
                           None, error)

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
               prompt_logprobs: tuple[TokenLogprob | None, ...] | None,
               error: str | None) -> GenerationDelta:
        finished = state.finish_reason is not None
        timings = None
        if finished:
            timings = RequestTimings(arrival=state.arrival_time,
                                     first_scheduled=state.first_scheduled,
                                     first_token=state.first_token_time,
                                     finished=time.monotonic(),
                                     last_token=state.last_token_time)
        return GenerationDelta(
            request_id=state.request_id,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            num_prompt_tokens=state.num_prompt_tokens,
            num_cached_tokens=state.num_cached_tokens,
            num_output_tokens=state.num_output_tokens,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
            prompt_logprobs=prompt_logprobs,
            timings=timings,
            num_preemptions=state.num_preemptions,
            error=error,
        )
