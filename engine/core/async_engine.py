"""The asyncio front of the engine: a background thread owns the model and steps while work
exists; callers on the event loop see ``generate()`` as an async iterator of deltas.

Threading contract: only the engine thread touches LLMEngine's mutable state (scheduler, runner,
request states, the LoRA registry and slots). Callers talk to it through a locked inbox of
commands; the thread hands deltas back with one ``call_soon_threadsafe`` per step. Loading a
LoRA adapter reads and checks its files on a worker thread first; only registering it is an
engine-thread command.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from engine.client import EngineDeadError
from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine
from engine.lora.peft import LoraAdapter
from engine.lora.registry import LoraAdapterInfo
from engine.lora.spec import LoraSpec
from engine.outputs import EngineStats, FinishReason, GenerationDelta, ModelInfo
from engine.params import SamplingParams
from engine.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# How long the idle loop sleeps before re-checking for shutdown; requests wake it at once.
_IDLE_WAIT_S = 0.5
# Model steps failing this many times in a row mean a broken device (a sticky CUDA error, say):
# the loop stops, /health turns 503 and the orchestrator restarts the server.
MAX_CONSECUTIVE_FAILED_STEPS = 3


class _EngineDied:
    """Put in every caller's queue when the loop dies; generate() turns it into an error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: str | None = None


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _LoadLora:
    adapter: LoraAdapter
    replace: bool
    done: asyncio.Future[LoraAdapterInfo]


@dataclass(frozen=True)
class _UnloadLora:
    name: str
    done: asyncio.Future[None]


_Command = _Add | _Abort | _LoadLora | _UnloadLora


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._inbox: deque[_Command] = deque()
        self._inbox_lock = threading.Lock()
        self._num_pending_adds = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # request_id -> its delta queue; touched only on the event loop.
        self._queues: dict[str, asyncio.Queue[GenerationDelta | BaseException | _EngineDied]] = {}
        # Set by the engine thread, once, when the loop dies; read by generate().
        self._death: str | None = None
        # load_lora / unload_lora calls the engine thread has not answered yet.
        self._lora_waiters: set[asyncio.Future] = set()
        self._stats = self._snapshot(alive=False)
        # Replaced whole by the engine thread after each load or unload: readers see either.
        self._lora_infos = engine.lora_adapters()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine.from_config(config))

    @property
    def model_info(self) -> ModelInfo:
        return self._engine.model_info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    def stats(self) -> EngineStats:
        return self._stats

    def lora_adapters(self) -> tuple[LoraAdapterInfo, ...]:
        return self._lora_infos

    async def load_lora(self, spec: LoraSpec, replace: bool = False) -> LoraAdapterInfo:
        """Read and check the adapter off the event loop, then serve it. Raises LoraError, or
        EngineDeadError once the loop has stopped."""
        self._check_running()
        adapter = await asyncio.to_thread(self._engine.read_adapter, spec)
        done: asyncio.Future[LoraAdapterInfo] = self._lora_waiter()
        self._post(_LoadLora(adapter, replace, done))
        return await done

    async def unload_lora(self, name: str) -> None:
        self._check_running()
        done: asyncio.Future[None] = self._lora_waiter()
        self._post(_UnloadLora(name, done))
        await done

    def _lora_waiter(self) -> asyncio.Future:
        """A future the engine thread settles; kept until then, so that a loop that stops
        first fails it instead of leaving its caller waiting (``_fail_all_callers``)."""
        self._check_running()  # again: the loop may have stopped while the files were read
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._lora_waiters.add(done)
        done.add_done_callback(self._lora_waiters.discard)
        return done

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        self._stats = self._snapshot(alive=True)

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_lora_waiters("the server is shutting down")  # commands left in the inbox

    def _check_running(self) -> None:
        """Commands posted to a loop that is not running would never be answered."""
        if self._death is not None:
            raise EngineDeadError(self._death)
        thread = self._thread
        if self._loop is None or self._stop.is_set() or thread is None \
                or not thread.is_alive():
            raise EngineDeadError("the engine is not running")

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                       request_id: str, lora: str | None = None
                       ) -> AsyncIterator[GenerationDelta]:
        if self._death is not None:
            raise EngineDeadError(self._death)
        if self._loop is None or self._stop.is_set():
            raise EngineDeadError("the engine is not running")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._engine.validate_prompt(prompt_token_ids)  # reads only immutable state
        queue: asyncio.Queue[GenerationDelta | BaseException | _EngineDied] = asyncio.Queue()
        self._queues[request_id] = queue
        self._post(_Add(request_id, list(prompt_token_ids), params, lora))
        finished = False
        num_output_tokens = 0
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _EngineDied):
                    # No step will ever finish this request: end it here, as a fault.
                    item = GenerationDelta(
                        request_id=request_id, token_ids=(), text="",
                        logprobs=() if params.logprobs is not None else None,
                        num_prompt_tokens=len(prompt_token_ids),
                        num_output_tokens=num_output_tokens,
                        finish_reason=FinishReason.ERROR, error=item.reason)
                finished = item.finished
                num_output_tokens = item.num_output_tokens
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._post(_Abort(request_id))

    def _post(self, command: _Command) -> None:
        with self._inbox_lock:
            self._inbox.append(command)
            if isinstance(command, _Add):
                self._num_pending_adds += 1
        self._wake.set()

    # ---- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        try:
            while not self._stop.is_set():
                if not engine.has_work:
                    self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
                out = self._drain_inbox()
                if engine.has_work:
                    out.extend(self._step())
                    out.extend(engine.take_refused())
                self._stats = self._snapshot(alive=True)
                self._deliver(out)
                failed = engine.counters.num_consecutive_failed_steps
                if failed >= MAX_CONSECUTIVE_FAILED_STEPS:
                    raise RuntimeError(f"{failed} engine steps failed in a row")
            self._deliver(engine.abort_all(FinishReason.ABORT, "the server is shutting down"))
            engine.structured.shutdown()
        except BaseException as exc:
            # Whatever killed the loop, no caller may wait forever: every one still waiting
            # gets an error, and later calls are refused (EngineDeadError).
            self._death = f"the engine loop stopped: {exc!r}"
            self._stats = self._snapshot(alive=False)
            log.critical("the engine loop died; every request in flight ends with an error",
                         exc_info=exc)
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all_callers, self._death)
            raise
        finally:
            self._stats = self._snapshot(alive=False)

    def _step(self) -> list[GenerationDelta]:
        try:
            return self._engine.step()
        except Exception as exc:  # a fault in one step must not take the server down
            log.exception("engine step failed; ending the requests in flight")
            self._engine.counters.num_consecutive_failed_steps += 1
            return self._engine.abort_all(FinishReason.ERROR, f"internal engine error: {exc!r}")

    def _fail_all_callers(self, reason: str) -> None:
        for queue in self._queues.values():
            queue.put_nowait(_EngineDied(reason))
        self._fail_lora_waiters(reason)

    def _fail_lora_waiters(self, reason: str) -> None:
        for done in list(self._lora_waiters):
            if not done.done():
                done.set_exception(EngineDeadError(reason))

    def _drain_inbox(self) -> list[GenerationDelta | tuple[str, BaseException]]:
        with self._inbox_lock:
            commands = list(self._inbox)
            self._inbox.clear()
            self._num_pending_adds = 0
        out: list[GenerationDelta | tuple[str, BaseException]] = []
        for command in commands:
            if isinstance(command, _Add):
                try:
                    self._engine.add_request(command.request_id, command.prompt_token_ids,
                                             command.params, lora=command.lora)
                except Exception as exc:
                    out.append((command.request_id, exc))
            elif isinstance(command, _Abort):
                delta = self._engine.abort_request(command.request_id)
                if delta is not None:
                    out.append(delta)
            else:
                self._change_loras(command)
        return out

    def _change_loras(self, command: _LoadLora | _UnloadLora) -> None:
        result: LoraAdapterInfo | None = None
        error: Exception | None = None
        try:
            if isinstance(command, _LoadLora):
                result = self._engine.load_lora(command.adapter, command.replace)
            else:
                self._engine.unload_lora(command.name)
        except Exception as exc:  # a refusal (name taken, not found) goes back to the caller
            error = exc
        self._lora_infos = self._engine.lora_adapters()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_settle, command.done, result, error)

    def _deliver(self, items: list) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, items)

    def _dispatch(self, items: list[GenerationDelta | tuple[str, BaseException]]) -> None:
        for item in items:
            if isinstance(item, GenerationDelta):
                request_id, payload = item.request_id, item
            else:
                request_id, payload = item
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(payload)

    def _snapshot(self, alive: bool) -> EngineStats:
        engine = self._engine
        blocks = engine.scheduler.block_manager
        running = sorted({s.lora.name for s in engine.scheduler.running if s.lora is not None})
        waiting = sorted({s.lora.name for s in engine.scheduler.waiting if s.lora is not None})
        return EngineStats(
            num_running=len(engine.scheduler.running),
            num_waiting=(len(engine.scheduler.waiting) + engine.structured.num_compiling
                         + self._num_pending_adds),
            num_kv_blocks_total=blocks.num_blocks,
            num_kv_blocks_free=blocks.num_free_blocks,
            num_kv_blocks_cached=blocks.num_cached_blocks,
            num_preemptions_total=engine.scheduler.num_preemptions_total,
            num_prompt_tokens_total=engine.counters.num_prompt_tokens,
            num_generation_tokens_total=engine.counters.num_generation_tokens,
            num_steps_total=engine.counters.num_steps,
            num_prefix_cache_queries_total=engine.scheduler.prefix_cache_stats.queries,
            num_prefix_cache_hits_total=engine.scheduler.prefix_cache_stats.hits,
            loop_alive=alive,
            running_lora_adapters=tuple(running),
            waiting_lora_adapters=tuple(waiting),
        )


def _settle(future: asyncio.Future, result: object, error: Exception | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
