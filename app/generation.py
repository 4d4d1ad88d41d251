"""Running a request's engine generations: n choices per prompt, merged into one stream, with
per-request metrics and aborts when the caller goes away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from app.errors import OpenAIError
from app.state import ServerState
from engine.outputs import FinishReason, GenerationDelta
from engine.params import SamplingParams

KEEPALIVE = None  # what merged() yields when nothing arrived within the keep-alive interval


@dataclass
class ChoiceJob:
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceTrace:
    """Per-choice bookkeeping for metrics."""

    arrival: float
    last_token: float | None = None
    num_tokens: int = 0


@dataclass
class Generation:
    """All engine requests of one HTTP request."""

    state: ServerState
    jobs: list[ChoiceJob]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    async def stream(self, keepalive: float | None = None
                     ) -> AsyncIterator[tuple[int, GenerationDelta] | None]:
        """Yield (choice index, delta) as they come, or KEEPALIVE after ``keepalive`` seconds of
        silence. Closing this iterator (client gone) aborts every engine request."""
        engine = self.state.require_engine()
        queue: asyncio.Queue[tuple[int, GenerationDelta | BaseException | None]] = \
            asyncio.Queue()
        arrival = time.monotonic()
        traces = {job.index: ChoiceTrace(arrival) for job in self.jobs}
        self.state.begin()
        self.state.awaiting_first_token += len(self.jobs)
        awaiting = {job.index for job in self.jobs}
        unfinished = {job.index for job in self.jobs}

        async def pump(job: ChoiceJob) -> None:
            try:
                async for delta in engine.generate(job.prompt_token_ids, job.params,
                                                   f"{self.request_id}-{job.index}"):
                    await queue.put((job.index, delta))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((job.index, exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                await queue.put((job.index, None))

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
                    if index in awaiting:
                        awaiting.discard(index)
                        self.state.awaiting_first_token -= 1
                    continue
                if isinstance(item, BaseException):
                    raise _as_openai_error(item)
                if index in awaiting and (item.token_ids or item.finished):
                    awaiting.discard(index)
                    self.state.awaiting_first_token -= 1
                self._observe(traces[index], item)
                if item.finished:
                    unfinished.discard(index)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.state.awaiting_first_token -= len(awaiting)
            if unfinished:  # the client went away or an error ended the request early
                self.state.metrics.request_success.labels(
                    finish_reason="abort").inc(len(unfinished))
            self.state.end()

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
            t = delta.timings
            if t is not None and t.first_scheduled is not None:
                m.queue_time.observe(max(0.0, t.first_scheduled - t.arrival))


def _as_openai_error(exc: BaseException) -> BaseException:
    if isinstance(exc, OpenAIError | asyncio.CancelledError):
        return exc
    if isinstance(exc, ValueError):
        return OpenAIError(400, str(exc), param=getattr(exc, "param", "prompt"),
                           code=getattr(exc, "code", None))
    return OpenAIError(500, f"internal error: {exc}", code="internal_error")


def delta_error(delta: GenerationDelta) -> OpenAIError | None:
    """An engine-side ending the client must hear about as an error (abort, fault)."""
    if delta.finish_reason == FinishReason.ERROR:
        return OpenAIError(500, delta.error or "internal engine error", code="internal_error")
    if delta.finish_reason == FinishReason.ABORT:
        return OpenAIError(503, delta.error or "the request was aborted",
                           code="request_aborted", headers={"Retry-After": "5"})
    return None


def openai_finish_reason(delta: GenerationDelta) -> str | None:
    if delta.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        return str(delta.finish_reason)
    return None


async def run_until_disconnect(request_is_disconnected, generation: Generation,  # noqa: ANN001
                               poll_s: float = 0.25) -> dict[int, list[GenerationDelta]]:
    """Collect a non-streaming generation, aborting it if the client disconnects."""
    task = asyncio.create_task(generation.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request_is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise OpenAIError(499, "client closed the request")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def seeds_for(seed: int | None, count: int) -> Sequence[int | None]:
    """Choice i of a seeded request uses seed + i: reproducible, yet the n choices differ."""
    return [None if seed is None else seed + i for i in range(count)]
