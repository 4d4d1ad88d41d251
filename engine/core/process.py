"""The engine core process's entry point (started with multiprocessing's ``spawn`` method by
engine/frontend/client.py). Importing this module imports no torch: the front names it as the
process's target, and the child imports the engine once it runs.

Life of the process:

1. Load the model and warm it up (engine/core/warmup.py), reporting ``CoreStarting``
   (checkpoint on disk) then ``CoreReady``, or ``CoreFailed`` and exit 1, over the start-up
   pipe.
2. Run the core loop until the front says shut down (engine/core/core_loop.py).
3. Exit as soon as the front is gone, whatever this process is doing: a thread waits on the
   pipe multiprocessing keeps to the parent, which reads end-of-file when the parent exits or
   is killed (SIGKILL included), and ends the process at once.

SIGINT and SIGTERM are ignored: a terminal's Ctrl-C or a signal to the whole process group
reaches the front too, which drains and then stops the core; the core must not die under its
in-flight requests first. SIGKILL still ends it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from engine.config import EngineConfig
from engine.ipc.messages import CoreFailed, CoreReady, CoreStarting
from engine.ipc.transport import Addresses

log = logging.getLogger(__name__)

# The exit status of a core whose front went away.
EXIT_FRONT_GONE = 3


def main(config: EngineConfig, addresses: Addresses, startup: Connection, warmup: bool,
         configure_logging: Callable[[], None] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if configure_logging is not None:
        configure_logging()
    else:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(processName)s %(name)s: "
                                   "%(message)s")
    _exit_with_the_front()
    try:
        import zmq

        from engine.core.core_loop import EngineCoreLoop
        from engine.core.llm_engine import LLMEngine
        from engine.core.warmup import warm_up
        from engine.ipc.transport import core_sockets

        engine = LLMEngine.from_config(
            config, on_checkpoint=lambda folder: startup.send(CoreStarting(str(folder))))
        warmup_s = warm_up(engine).seconds if warmup else 0.0
        context = zmq.Context()
        commands, outputs = core_sockets(context, addresses)
        startup.send(CoreReady(engine.model_info, warmup_s, engine.lora_adapters()))
    except Exception as exc:
        log.exception("the engine core failed to start")
        startup.send(CoreFailed(f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    finally:
        startup.close()
    t0 = time.monotonic()
    try:
        EngineCoreLoop(engine, commands, outputs).run()
    except BaseException:
        log.critical("the engine core loop died after %.0f s", time.monotonic() - t0,
                     exc_info=True)
        raise
    finally:
        commands.close()
        outputs.close()  # lingers until the last message is out
        context.term()


def _exit_with_the_front() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        log.error("the front process (pid %s) is gone; the engine core exits", parent.pid)
        os._exit(EXIT_FRONT_GONE)

    threading.Thread(target=watch, name="front-watch", daemon=True).start()
