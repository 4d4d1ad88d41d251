"""Running a request's engine generations: n choices per prompt, merged into one stream, with
admission, per-request metrics and aborts when the caller goes away."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from app.errors import OpenAIError, engine_unavailable, internal_error
from app.state import ServerState
from engine.client import EngineClient, EngineDeadError
from engine.lora.spec import LoraError
from engine.outputs import FinishReason, GenerationDelta
from engine.params import SEED_MIN, SamplingParams

log = logging.getLogger(__name__)

KEEPALIVE = None  # what stream() yields when nothing arrived within the keep-alive interval


@dataclass
class ChoiceJob:
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: str | None = None  # the LoRA adapter to run with (None: the base model)


@dataclass
class ChoiceTrace:
    """Per-choice bookkeeping for metrics."""

    arrival: float
    last_token: float | None = None
    num_tokens: int = 0


@dataclass
class Generation:
    """All engine requests of one HTTP request, admitted on construction.

    Admission (429 when the queue is full) reserves the request's place at once: it counts as
    in flight (the drain waits for it) and its choices count as waiting until each produces a
    token, so a burst of requests cannot all slip past the queue limit before any of them
    starts streaming. ``release()`` gives the place back; it is idempotent and the stream's
    end, the non-streaming path and the SSE response's close all call it.
    """

    state: ServerState
    engine: EngineClient
    jobs: list[ChoiceJob]
    # Shown in logs next to the HTTP request id; engine request ids are "<this>-<index>".
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    http_request_id: str = "-"
    # The request's "model" (a served base name or an adapter): the per-model metrics' label.
    model: str = ""
    _awaiting: set[int] = field(default_factory=set, init=False)
    _open: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.state.check_queue(len(self.jobs))
        self._awaiting = {job.index for job in self.jobs}
        self.state.awaiting_first_token += len(self._awaiting)
        self.state.begin()
        self._open = True

    def release(self) -> None:
        self.state.awaiting_first_token -= len(self._awaiting)
        self._awaiting.clear()
        if self._open:
            self._open = False
            self.state.end()

    def _first_output(self, index: int) -> None:
        if index in self._awaiting:
            self._awaiting.discard(index)
            self.state.awaiting_first_token -= 1

    async def stream(self, keepalive: float | None = None
                     ) -> AsyncIterator[tuple[int, GenerationDelta] | None]:
        """Yield (choice index, delta) as they come, or KEEPALIVE after ``keepalive`` seconds of
        silence. Closing this iterator (client gone) aborts every engine request. A choice
        that ends by abort or engine fault raises its OpenAIError here, for every caller."""
        queue: asyncio.Queue[tuple[int, GenerationDelta | BaseException | None]] = \
            asyncio.Queue()
        arrival = time.monotonic()
        traces = {job.index: ChoiceTrace(arrival) for job in self.jobs}
        unfinished = {job.index for job in self.jobs}

        async def pump(job: ChoiceJob) -> None:
            try:
                async for delta in self.engine.generate(job.prompt_token_ids, job.params,
                                                        f"{self.request_id}-{job.index}",
                                                        lora=job.lora):
                    queue.put_nowait((job.index, delta))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                queue.put_nowait((job.index, exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                queue.put_nowait((job.index, None))

        tasks = [asyncio.create_task(pump(job)) for job in self.jobs]
        try:
            remaining = len(tasks)
            while remaining:
                try:
                    index, item = await asyncio.wait_for(queue.get(), keepalive)
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                if item is None:
                    remaining -= 1
                    self._first_output(index)
                    continue
                if isinstance(item, BaseException):
                    raise self._as_openai_error(item)
                if item.token_ids or item.finished:
                    self._first_output(index)
                self._observe(traces[index], item)
                if item.finished:
                    unfinished.discard(index)
                err = delta_error(item, self.http_request_id)
                if err is not None:  # an abort or engine fault ends the whole response
                    raise err
                yield index, item
        finally:
            # No await in here: a client that hangs up cancels this generator inside an anyio
            # cancel scope, which cancels every later await too, and the bookkeeping below must
            # run whatever happens. Cancelling a pump closes its engine.generate() iterator,
            # which aborts the engine request (its KV blocks are freed by the engine).
            for task in tasks:
                task.cancel()
            if unfinished:  # the client went away or an error ended the request early
                self.state.metrics.request_success.labels(
                    finish_reason="abort").inc(len(unfinished))
            self.release()

    async def collect(self, keepalive: float = 1.0) -> dict[int, list[GenerationDelta]]:
        """Every choice's deltas (non-streaming requests)."""
        out: dict[int, list[GenerationDelta]] = {job.index: [] for job in self.jobs}
        async for item in self.stream(keepalive):
            if item is not None:
                out[item[0]].append(item[1])
        return out

    def _observe(self, trace: ChoiceTrace, delta: GenerationDelta) -> None:
        m = self.state.metrics
        now = time.monotonic()
        if delta.token_ids:
            if trace.last_token is None:
                m.ttft.observe(now - trace.arrival)
            else:
                m.itl.observe((now - trace.last_token) / len(delta.token_ids))
            trace.last_token = now
            trace.num_tokens += len(delta.token_ids)
        if delta.finished:
            m.request_success.labels(finish_reason=str(delta.finish_reason)).inc()
            m.e2e.observe(now - trace.arrival)
            m.prompt_tokens.observe(delta.num_prompt_tokens)
            m.generation_tokens.observe(delta.num_output_tokens)
            self._observe_phases(delta)
            m.observe_model_request(self.model, delta.num_prompt_tokens,
                                    delta.num_output_tokens)
            if delta.finish_reason == FinishReason.ERROR:
                log.error("request %s (engine request %s) failed in the engine: %s",
                          self.http_request_id, delta.request_id, delta.error)

    def _observe_phases(self, delta: GenerationDelta) -> None:
        """A finished request's phases, as vLLM defines them: queued until first scheduled,
        prefill until the first token, decode until the last one. A preemption does not
        restart a phase (it lengthens the one it interrupted); a phase whose end never came
        (aborted while waiting) is not observed."""
        m = self.state.metrics
        t, num_output_tokens = delta.timings, delta.num_output_tokens
        if t is None or t.first_scheduled is None:
            return
        m.queue_time.observe(max(0.0, t.first_scheduled - t.arrival))
        if t.first_token is None or t.last_token is None:
            return
        decode = t.last_token - t.first_token
        m.prefill_time.observe(t.first_token - t.first_scheduled)
        m.decode_time.observe(decode)
        m.inference_time.observe(t.last_token - t.first_scheduled)
        m.time_per_output_token.observe(
            decode / (num_output_tokens - 1) if num_output_tokens > 1 else 0.0)

    def _as_openai_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, OpenAIError | asyncio.CancelledError):
            return exc
        if isinstance(exc, EngineDeadError):
            return engine_unavailable()
        if isinstance(exc, LoraError) and exc.code == "lora_not_found":  # unloaded meanwhile
            return OpenAIError(404, str(exc), param="model", code="model_not_found")
        if isinstance(exc, ValueError):  # the engine refused the prompt (EngineClient contract)
            return OpenAIError(400, str(exc), param=getattr(exc, "param", "prompt"),
                               code=getattr(exc, "code", None))
        log.error("request %s (engine request %s) failed", self.http_request_id,
                  self.request_id, exc_info=exc)
        return internal_error(self.http_request_id)


def delta_error(delta: GenerationDelta, http_request_id: str) -> OpenAIError | None:
    """An engine-side ending the client must hear about as an error (abort, fault). A fault's
    details stay in the log (Generation._observe), under the request id the error names."""
    if delta.finish_reason == FinishReason.ERROR:
        return internal_error(http_request_id)
    if delta.finish_reason == FinishReason.ABORT:
        return OpenAIError(503, delta.error or "the request was aborted",
                           code="request_aborted", headers={"Retry-After": "5"})
    return None


def openai_finish_reason(delta: GenerationDelta) -> str | None:
    if delta.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        return str(delta.finish_reason)
    return None


async def run_until_disconnect(is_disconnected: Callable[[], Awaitable[bool]],
                               generation: Generation, poll_s: float = 0.25
                               ) -> dict[int, list[GenerationDelta]]:
    """Collect a non-streaming generation, aborting it if the client disconnects."""
    task = asyncio.create_task(generation.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await is_disconnected():
                raise OpenAIError(499, "client closed the request")
    finally:
        if not task.done():
            task.cancel()
        generation.release()  # also when the task never got to start its stream


def seeds_for(seed: int | None, count: int) -> Sequence[int | None]:
    """Choice i of a seeded request uses seed + i (wrapping within int64, so the largest seed
    still works with n > 1): reproducible, yet the n choices differ."""
    if seed is None:
        return [None] * count
    return [(seed + i - SEED_MIN) % 2**64 + SEED_MIN for i in range(count)]
