"""``EngineClient`` over an engine core in its own process: the engine the server runs.

The front (this object, in the HTTP process) owns a tokenizer, checks prompts, and turns each
step's token ids into deltas (engine/frontend/output_processor.py) on the event loop; the core
process (engine/core/process.py) owns the model. They talk over two ZeroMQ pipes
(engine/ipc/transport.py): one ``Commands`` message per event-loop turn that queued adds or
aborts, one ``StepOutputs`` message per engine step back.

Threads: every request table and queue is touched on the event loop only. A receiver thread
blocks on the outputs socket and hands each batch of messages to the loop in one
``call_soon_threadsafe``; the commands socket is written from the loop.

Faults: the core process exiting (its sentinel becomes readable) or falling silent for
``hang_timeout_s`` while it should report at least once a second (then it is killed) ends every
request in flight with ``FinishReason.ERROR`` at once, turns ``stats().loop_alive`` false
(/health answers 503) and makes later ``generate`` calls raise ``EngineDeadError``. No process
outlives the front: the core exits by itself when the front is gone (engine/core/process.py),
and an exit of the front's interpreter kills a core still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import msgspec
import zmq

from engine.client import EngineDeadError, RequestRefused
from engine.config import EngineConfig
from engine.faults import FaultPlan
from engine.frontend.lora_calls import LoraCalls
from engine.frontend.output_processor import OutputProcessor, RequestState
from engine.frontend.spawn import CoreProcessOptions, kill_if_running, start_core
from engine.ipc.messages import (
    AddRequest,
    Codec,
    Commands,
    CoreStopped,
    LoadLora,
    RefusalKind,
    StepOutputs,
    UnloadLora,
)
from engine.lora.registry import LoraAdapterInfo
from engine.lora.spec import LoraError, LoraSpec
from engine.outputs import EngineStats, FinishReason, GenerationDelta, ModelInfo
from engine.params import SamplingParams
from engine.prompt import validate_prompt
from engine.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_POLL_MS = 100  # how often the receiver thread looks for the stop flag
_WATCH_S = 0.5  # how often the hang watchdog looks


@dataclass
class _Request:
    state: RequestState
    queue: asyncio.Queue[GenerationDelta | BaseException] = field(
        default_factory=asyncio.Queue)


class EngineProcessClient:
    """Implements ``engine.client.EngineClient``. Build it with ``launch`` (blocking)."""

    def __init__(self, process: BaseProcess, model_info: ModelInfo, tokenizer: Tokenizer,
                 commands: zmq.Socket, outputs: zmq.Socket, options: CoreProcessOptions,
                 adapters: tuple[LoraAdapterInfo, ...] = (),
                 faults: FaultPlan | None = None) -> None:
        self._process = process
        self._info = model_info
        self._tokenizer = tokenizer
        self._commands = commands
        self._outputs_socket = outputs
        self._options = options
        self._codec = Codec()
        self._faults = faults or FaultPlan.none()
        self._processor = OutputProcessor(tokenizer)
        self._requests: dict[str, _Request] = {}
        self._lora = LoraCalls(adapters)
        self._adds: list[AddRequest] = []
        self._aborts: list[str] = []
        self._lora_commands: list[LoadLora | UnloadLora] = []
        self._flush_scheduled = False
        self._stats: EngineStats | None = None
        # Adds sent since the core's last stats: they count as waiting.
        self._unseen_adds = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: threading.Thread | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = threading.Event()
        self._last_heard = time.monotonic()
        self._stopped: asyncio.Event | None = None
        self._shutting_down = False
        # Why the core is gone for good, once it is.
        self._dead: str | None = None

    # ---- start-up --------------------------------------------------------------------------

    @classmethod
    def launch(cls, config: EngineConfig,
               options: CoreProcessOptions | None = None) -> EngineProcessClient:
        """Start the engine core process and wait until its model is loaded and warmed up
        (engine/frontend/spawn.py). Blocking (minutes for a large model): run it in a
        thread."""
        options = options or CoreProcessOptions()
        core = start_core(config, options)
        log.info("engine core process %d ready (warm-up %.2f s)", core.process.pid,
                 core.warmup_s)
        return cls(core.process, core.model_info, core.tokenizer, core.commands, core.outputs,
                   options, core.adapters, core.faults)

    # ---- EngineClient ----------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def stats(self) -> EngineStats:
        alive = self._loop is not None and self._dead is None and not self._shutting_down
        if self._stats is None:
            return EngineStats(0, self._unseen_adds, 0, 0, 0, 0, 0, 0, 0, 0, 0, alive)
        return msgspec.structs.replace(self._stats, loop_alive=alive,
                                       num_waiting=self._stats.num_waiting + self._unseen_adds)

    async def start(self) -> None:
        if self._loop is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._last_heard = time.monotonic()
        loop.add_reader(self._process.sentinel, self._on_process_exit)
        self._receiver = threading.Thread(target=self._receive, name="engine-outputs",
                                          daemon=True)
        self._receiver.start()
        self._watchdog = loop.create_task(self._watch())

    async def shutdown(self) -> None:
        """Stop the core: requests still running end with FinishReason.ABORT."""
        if self._shutting_down:
            return
        self._shutting_down = True
        timeout = self._options.stop_timeout_s
        if self._loop is not None and self._dead is None and self._stopped is not None:
            self._send(Commands(shutdown=True))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout)
        await asyncio.to_thread(self._process.join, timeout)
        kill_if_running(self._process)
        self._end_all(FinishReason.ABORT, "the server is shutting down")
        self._lora.fail_all("the server is shutting down")
        self._close()

    def lora_adapters(self) -> tuple[LoraAdapterInfo, ...]:
        return self._lora.adapters

    async def load_lora(self, spec: LoraSpec, replace: bool = False) -> LoraAdapterInfo:
        """The core reads the adapter off its loop, then serves it. Raises LoraError, or
        EngineDeadError if the core has stopped or stops before answering."""
        self._check_running()
        call_id, done = self._lora.new()
        self._lora_commands.append(LoadLora(call_id, spec, replace))
        self._schedule_flush()
        info = await done
        assert info is not None
        return info

    async def unload_lora(self, name: str) -> None:
        self._check_running()
        call_id, done = self._lora.new()
        self._lora_commands.append(UnloadLora(call_id, name))
        self._schedule_flush()
        await done

    def _check_running(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._loop is None or self._shutting_down:
            raise EngineDeadError("the engine is not running")

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                       request_id: str, lora: str | None = None
                       ) -> AsyncIterator[GenerationDelta]:
        self._check_running()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = list(prompt_token_ids)
        validate_prompt(prompt, self._tokenizer.vocab_size, self._info.max_model_len)
        arrival = time.monotonic()
        request = _Request(self._processor.new_state(request_id, prompt, params, arrival))
        if self._faults.active:
            request.state.faults = self._faults.kinds_for(self._tokenizer.decode(prompt))
        self._requests[request_id] = request
        self._adds.append(AddRequest(request_id, prompt, params, arrival, lora))
        self._schedule_flush()
        finished = False
        try:
            while not finished:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        request.queue.put_nowait(self._processor.end(request.state, FinishReason.ABORT))
        self._aborts.append(request_id)
        self._schedule_flush()

    # ---- commands ------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        """Send this event-loop turn's adds and aborts as one message, once the turn ends."""
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._adds and not self._aborts and not self._lora_commands:
            return
        changes = self._lora_commands
        commands = Commands(adds=self._adds, aborts=self._aborts,
                            loads=[c for c in changes if isinstance(c, LoadLora)],
                            unloads=[c for c in changes if isinstance(c, UnloadLora)])
        self._unseen_adds += len(self._adds)
        self._adds, self._aborts, self._lora_commands = [], [], []
        self._send(commands)

    def _send(self, commands: Commands) -> None:
        if self._dead is not None:
            return
        try:
            self._commands.send(self._codec.encode(commands), zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # no core to take it: the watchdog or sentinel reports it
            log.error("could not send commands to the engine core: %r", exc)

    # ---- outputs -------------------------------------------------------------------------

    def _receive(self) -> None:
        """The receiver thread: every message as it arrives, in batches, to the event loop."""
        socket, codec, loop = self._outputs_socket, Codec(), self._loop
        assert loop is not None
        while not self._closing.is_set():
            if not socket.poll(_POLL_MS):
                continue
            batch: list[StepOutputs | CoreStopped] = []
            with contextlib.suppress(zmq.Again):
                while True:
                    batch.append(codec.decode_core(socket.recv(zmq.NOBLOCK, copy=False).buffer))
            self._last_heard = time.monotonic()
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(self._on_messages, batch)

    def _on_messages(self, batch: list[StepOutputs | CoreStopped]) -> None:
        for message in batch:
            if isinstance(message, CoreStopped):
                if self._stopped is not None:
                    self._stopped.set()
                continue
            self._stats = message.stats
            self._unseen_adds = 0
            for result in message.lora_results:
                self._lora.answer(result)
            for refusal in message.refused:
                request = self._requests.pop(refusal.request_id, None)
                if request is not None:
                    request.queue.put_nowait(
                        LoraError(refusal.message, refusal.code or "lora_not_found")
                        if refusal.kind is RefusalKind.LORA
                        else RequestRefused(refusal.message, refusal.param, refusal.code))
            for out in message.outputs:
                request = self._requests.get(out.request_id)
                if request is None:
                    continue  # ended here already (abort, stop string): later tokens are void
                try:
                    delta = self._processor.process(request.state, out)
                except Exception as exc:  # noqa: BLE001 - this request alone ends
                    log.error("output processing failed for request %s: %r", out.request_id,
                              exc, exc_info=exc)
                    delta = self._processor.end(request.state, FinishReason.ERROR,
                                                f"output processing failed: {exc!r}")
                request.queue.put_nowait(delta)
                if delta.finished:
                    del self._requests[out.request_id]
                    if out.finish is None:  # ended here (a stop string): the core stops too
                        self._aborts.append(out.request_id)
                        self._schedule_flush()

    # ---- faults ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        timeout = self._options.hang_timeout_s
        while self._dead is None and not self._shutting_down:
            await asyncio.sleep(_WATCH_S)
            silent = time.monotonic() - self._last_heard
            if silent > timeout and self._dead is None and not self._shutting_down:
                self._die(f"the engine core sent nothing for {silent:.0f} s (hung); "
                          "it was killed")
                kill_if_running(self._process)

    def _on_process_exit(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._process.sentinel)
        self._process.join(1.0)  # it has exited; this reaps it (its exit code)
        if self._stopped is not None:
            self._stopped.set()
        if not self._shutting_down:
            self._die(f"the engine core process exited (code {self._process.exitcode})")

    def _die(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        log.critical("%s; every request in flight ends with an error and /health reports "
                     "503 until the server is restarted", reason)
        self._end_all(FinishReason.ERROR, reason)
        self._lora.fail_all(reason)

    def _end_all(self, reason: FinishReason, error: str) -> None:
        for request in self._requests.values():
            request.queue.put_nowait(self._processor.end(request.state, reason, error))
        self._requests.clear()

    def _close(self) -> None:
        self._closing.set()
        if self._receiver is not None:
            self._receiver.join(5)
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._process.sentinel)
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._commands.close()
        self._outputs_socket.close()
