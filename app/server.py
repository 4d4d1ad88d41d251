"""Running the app under uvicorn, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app import lifecycle
from app.http_protocol import ConnectionLimits, GuardedH11Protocol
from app.logs import configure_logging
from app.main import create_app
from app.settings import Settings, environment_snapshot
from app.state import ServerState
from engine.client import EngineClient

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT starts a drain (readiness 503 at once, new work refused,
    in-flight requests finish within shutdown_timeout); a second one exits at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.state: ServerState = app.state.server
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        # Exit when start-up failed, so the pod restarts and the failure is visible.
        task = self.startup_task
        if task is not None and task.done() and not task.cancelled() \
                and task.exception() is not None:
            self.should_exit = True
        return await super().on_tick(counter)

    @property
    def startup_task(self) -> asyncio.Task[None] | None:
        return getattr(self.app.state, "startup_task", None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self._loop is None:
            super().handle_exit(sig, frame)
            self.force_exit = True
            return
        self.state.draining = True
        log.info("signal %d: draining", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def run() -> None:
            try:
                await lifecycle.drain(self.state)
            finally:
                self.should_exit = True

        self._drain_task = asyncio.get_running_loop().create_task(run())


def serve(settings: Settings, engine: EngineClient | None = None) -> int:
    configure_logging(settings.log_level, settings.log_format)
    log.info("settings from the environment: %s", environment_snapshot())
    app = create_app(settings, engine)
    limits = ConnectionLimits(max_header_bytes=settings.max_header_bytes,
                              header_timeout=settings.header_timeout,
                              body_timeout=settings.body_timeout,
                              send_timeout=settings.send_timeout)
    # log_config=None: uvicorn's records go through the root handler configure_logging set
    # up (JSON lines included), not through uvicorn's own console formatter.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level, access_log=False,
                            http=functools.partial(GuardedH11Protocol, limits=limits),
                            timeout_keep_alive=30, timeout_graceful_shutdown=10)
    server = DrainingServer(config, app)
    asyncio.run(server.serve())
    return 1 if server.state.load_error else 0
