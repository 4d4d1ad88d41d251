"""The engine core's loop in its own process: commands in, steps, one message per step out.

While there is work it steps without pause, taking whatever commands arrived before each step
(an abort therefore lands within a step); while idle it waits for commands and sends a sign of
life every ``HEARTBEAT_S``, so the front can tell a hung core from an idle one. Each step's
outputs go out in one message with the engine's stats; ZeroMQ's I/O thread writes it, so a slow
front never holds up a step.

LoRA adapters: a load is read and checked (files, perhaps a download) on a worker thread while
the loop goes on stepping; it is registered between two steps once read, and its answer goes
out with the next message. Model steps failing ``MAX_CONSECUTIVE_FAILED_STEPS`` times in a row
mean a broken device (a sticky CUDA error, say): the loop raises, the process ends, and the
front reports the engine dead (/health 503) so the orchestrator restarts the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import zmq

from engine.core.llm_engine import LLMEngine
from engine.ipc.messages import (
    Codec,
    Commands,
    CoreFinish,
    CoreStopped,
    LoadLora,
    LoraResult,
    Refusal,
    RefusalKind,
    RequestOutput,
    StepOutputs,
)
from engine.lora.peft import LoraAdapter
from engine.lora.registry import LoraAdapterInfo
from engine.lora.spec import LoraError
from engine.prompt import PromptError

log = logging.getLogger(__name__)

# Most seconds between two messages of a healthy core (idle or between slow steps).
HEARTBEAT_S = 1.0
# How long an idle loop waits for commands while an adapter is being read.
_READ_POLL_S = 0.01
MAX_CONSECUTIVE_FAILED_STEPS = 3


class EngineCoreLoop:
    def __init__(self, engine: LLMEngine, commands: zmq.Socket, outputs: zmq.Socket) -> None:
        self.engine = engine
        self._commands = commands
        self._outputs = outputs
        self._codec = Codec()
        self._refused: list[Refusal] = []
        self._lora_results: list[LoraResult] = []
        self._reading: list[tuple[LoadLora, Future[LoraAdapter]]] = []
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="lora-read")
        self._shutdown = False
        self._last_sent = 0.0

    def run(self) -> None:
        """Until the front says shut down; then every request still held ends (ABORT)."""
        engine = self.engine
        try:
            while not self._shutdown:
                wait = (0.0 if engine.has_work else _READ_POLL_S if self._reading
                        else HEARTBEAT_S)
                self._receive(wait)
                if self._shutdown:
                    break
                self._register_read_adapters()
                outputs = engine.step() if engine.has_work else []
                # Grammars that failed to compile: their requests are refused, not run.
                self._refused += [Refusal(request_id, RefusalKind.GRAMMAR, str(error),
                                          error.param, error.code)
                                  for request_id, error in engine.take_refused()]
                self._send(outputs)
                failed = engine.counters.num_consecutive_failed_steps
                if failed >= MAX_CONSECUTIVE_FAILED_STEPS:
                    raise RuntimeError(f"{failed} engine steps failed in a row")
        finally:
            self._reader.shutdown(wait=False, cancel_futures=True)
        self._send(engine.abort_all(CoreFinish.ABORT, "the server is shutting down"),
                   force=True)
        engine.shutdown()
        self._outputs.send(self._codec.encode(CoreStopped()))
        log.info("engine core stopped")

    def _receive(self, wait_s: float) -> None:
        """Apply every command batch that has arrived, waiting up to ``wait_s`` for the
        first."""
        if not self._commands.poll(int(wait_s * 1000)):
            return
        while True:
            try:
                frame = self._commands.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._apply(self._codec.decode_commands(frame.buffer))

    def _apply(self, commands: Commands) -> None:
        for add in commands.adds:
            try:
                self.engine.add_request(add.request_id, add.prompt_token_ids, add.params,
                                        arrival_time=add.arrival_time, lora=add.lora)
            except LoraError as exc:
                self._refused.append(Refusal(add.request_id, RefusalKind.LORA, str(exc),
                                             "model", exc.code))
            except PromptError as exc:
                self._refused.append(Refusal(add.request_id, RefusalKind.PROMPT, str(exc),
                                             exc.param, exc.code))
            except ValueError as exc:
                self._refused.append(Refusal(add.request_id, RefusalKind.PROMPT, str(exc),
                                             "prompt", None))
        for request_id in commands.aborts:
            # The front has ended the request already: nothing to send back.
            self.engine.abort_request(request_id)
        for load in commands.loads:
            self._reading.append((load, self._reader.submit(self.engine.read_adapter,
                                                            load.spec)))
        for unload in commands.unloads:
            self._answer(unload.call_id, lambda name=unload.name: self.engine.unload_lora(name))
        if commands.shutdown:
            self._shutdown = True

    def _register_read_adapters(self) -> None:
        """Serve the adapters whose files have been read (between two steps)."""
        still: list[tuple[LoadLora, Future[LoraAdapter]]] = []
        for load, future in self._reading:
            if not future.done():
                still.append((load, future))
                continue
            self._answer(load.call_id,
                         lambda f=future, r=load.replace: self.engine.load_lora(f.result(), r))
        self._reading = still

    def _answer(self, call_id: int, change: Callable[[], LoraAdapterInfo | None]) -> None:
        info: LoraAdapterInfo | None = None
        error: str | None = None
        code: str | None = None
        try:
            info = change()
        except LoraError as exc:
            error, code = str(exc), exc.code
        except Exception as exc:  # noqa: BLE001 - a bad adapter must not stop the loop
            log.exception("LoRA change %d failed", call_id)
            error, code = f"the adapter could not be used: {exc}", "invalid_lora"
        self._lora_results.append(LoraResult(call_id, info, error, code,
                                             list(self.engine.lora_adapters())))

    def _send(self, outputs: list[RequestOutput], force: bool = False) -> None:
        now = time.monotonic()
        pending = outputs or self._refused or self._lora_results
        if not (pending or force or now - self._last_sent >= HEARTBEAT_S):
            return
        message = StepOutputs(outputs, self.engine.stats(), self._refused, self._lora_results)
        self._refused, self._lora_results = [], []
        self._outputs.send(self._codec.encode(message), copy=False)
        self._last_sent = now
