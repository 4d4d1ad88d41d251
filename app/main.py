"""The app factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__, lifecycle
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    HTTPMetricsMiddleware,
    RequestIdMiddleware,
)
from app.openapi import install_openapi
from app.routes import chat, completions, health, lora, metrics, models, tokenize
from app.settings import Settings
from app.state import ServerState
from engine.client import EngineClient
from engine.outputs import EngineStats

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: EngineClient | None = None) -> FastAPI:
    """An app serving ``engine``, or the engine ``settings`` describe, loaded after the port
    opens so /health answers during a long load and /ready turns 200 only when it is done."""
    def stats() -> EngineStats | None:  # read at scrape time, once the engine exists
        return state.stats()

    state = ServerState(settings=settings,
                        metrics=Metrics(stats, settings, lambda: state.lora_view()))
    state.idle.set()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(lifecycle.start(state, engine, app))
        app.state.startup_task = task
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if state.engine is not None:
                await state.engine.shutdown()

    # The OpenAPI schema is served (behind the API key when keys are set, like every route
    # but the probes); the interactive docs pages are not.
    app = FastAPI(title="gptq-serve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = state
    install_error_handlers(app)
    install_openapi(app)
    for router in (completions.router, chat.router, models.router, health.router,
                   tokenize.router, metrics.router):
        app.include_router(router)
    if settings.allow_runtime_lora_updating:  # as vLLM: the routes exist only when allowed
        app.include_router(lora.router)
    # Outermost last: every response carries a request id, metrics see every response, auth
    # runs before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, state=state)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(HTTPMetricsMiddleware, state=state, routes=app.router.routes)
    app.add_middleware(RequestIdMiddleware)
    return app
