"""Starting the engine core process and seeing it through its start-up. Torch-free.

The core is started with multiprocessing's ``spawn`` method: a fresh interpreter that inherits
no CUDA state, file descriptors or threads of the HTTP process. It reports over a one-way
start-up pipe: ``CoreStarting`` once the checkpoint is on disk (the front loads its tokenizer
from there meanwhile), then ``CoreReady`` after its warm-up, or ``CoreFailed``.
"""

from __future__ import annotations

import atexit
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import zmq

from engine.config import EngineConfig
from engine.core import process as core_process
from engine.faults import FaultPlan
from engine.ipc.messages import CoreFailed, CoreReady, CoreStarting
from engine.ipc.transport import Addresses, front_sockets
from engine.lora.registry import LoraAdapterInfo
from engine.outputs import ModelInfo
from engine.tokenizer.tokenizer import Tokenizer


class EngineStartError(RuntimeError):
    """The engine core process failed to load or warm up the model."""


@dataclass(frozen=True)
class CoreProcessOptions:
    # Seconds without any message from the core after which it counts as hung (it sends one
    # after every step that produced anything, and at least one a second).
    hang_timeout_s: float = 60.0
    # Seconds the core gets to end its requests and exit on shutdown before it is killed.
    stop_timeout_s: float = 10.0
    # Run every step shape once before reporting ready (engine/core/warmup.py).
    warmup: bool = True
    # Sets up logging in the core process as in the front (picklable: a module-level
    # function, or a functools.partial of one). None: the level INFO, plain text.
    configure_logging: Callable[[], None] | None = None


@dataclass
class StartedCore:
    process: BaseProcess
    model_info: ModelInfo
    tokenizer: Tokenizer
    commands: zmq.Socket  # PUSH, to the core
    outputs: zmq.Socket  # PULL, from the core
    warmup_s: float
    adapters: tuple[LoraAdapterInfo, ...]  # loaded at start-up
    # The test-only fault hooks of the front's half (the core reads the same variable).
    faults: FaultPlan


def start_core(config: EngineConfig, options: CoreProcessOptions) -> StartedCore:
    """Spawn the core and wait until it has loaded and warmed up the model (blocking). The
    sockets exist before the core does, so neither side waits for the other's to be up."""
    addresses = Addresses.new()
    commands, outputs = front_sockets(zmq.Context.instance(), addresses)
    spawn = multiprocessing.get_context("spawn")
    reader, writer = spawn.Pipe(duplex=False)
    process = spawn.Process(target=core_process.main, name="gptq-engine-core", args=(
        config, addresses, writer, options.warmup, options.configure_logging))
    process.start()
    writer.close()
    # However this interpreter ends, a core still running goes with it (the core also exits
    # by itself when this process is gone, SIGKILL included).
    atexit.register(kill_if_running, process)
    try:
        starting = _startup_report(reader, process, CoreStarting)
        faults = FaultPlan.from_environment()
        tokenizer = Tokenizer.from_pretrained(starting.checkpoint_path, faults)
        ready = _startup_report(reader, process, CoreReady)
    except BaseException:
        kill_if_running(process)
        commands.close()
        outputs.close()
        raise
    finally:
        reader.close()
    return StartedCore(process, ready.model_info, tokenizer, commands, outputs,
                       ready.warmup_s, ready.adapters, faults)


def kill_if_running(process: BaseProcess) -> None:
    if process.is_alive():
        process.kill()
        process.join(5)


def _startup_report(reader: Connection, process: BaseProcess, expected: type) -> object:
    """The core's next start-up report, which must be ``expected``; raises EngineStartError
    if the core failed or exited instead."""
    while True:
        if reader.poll(0.5):
            try:
                report = reader.recv()
            except EOFError:
                process.join(5)
                raise EngineStartError(f"the engine core process exited during start-up "
                                       f"(code {process.exitcode})") from None
            if isinstance(report, CoreFailed):
                raise EngineStartError(f"the engine core failed to start: {report.error}")
            if not isinstance(report, expected):
                raise EngineStartError(f"unexpected start-up report {report!r}")
            return report
        if not process.is_alive():
            raise EngineStartError(f"the engine core process exited during start-up "
                                   f"(code {process.exitcode})")
