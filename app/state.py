"""The server's shared state: the engine (once loaded), readiness, drain, admission."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from app.errors import OpenAIError, engine_unavailable
from app.lora_metrics import LoraView
from app.metrics import Metrics
from app.settings import Settings
from app.structured import ConstraintChecker
from app.templates import ChatTemplate
from engine.client import EngineClient
from engine.outputs import EngineStats
from engine.structured.grammar import GrammarLimits


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    engine: EngineClient | None = None
    template: ChatTemplate | None = None
    # Requests are served once the engine runs; /ready reports ready only after the warm-up
    # requests went through the app.
    serving: bool = False
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    # Generation requests past admission, not yet finished (the drain waits for these).
    in_flight: int = 0
    # Engine requests admitted that have not yet produced a token: queued or prefilling. The
    # app counts these itself because the engine's stats lag by up to one step.
    awaiting_first_token: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Set from the settings in __post_init__.
    constraints: ConstraintChecker = field(init=False)

    def __post_init__(self) -> None:
        self.constraints = ConstraintChecker(GrammarLimits(), self.settings.max_grammar_bytes,
                                             self.settings.grammar_compile_timeout)

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    def lora_view(self) -> LoraView | None:
        if self.engine is None:
            return None
        stats = self.engine.stats()
        return LoraView(self.engine.lora_adapters(), stats.running_lora_adapters,
                        stats.waiting_lora_adapters, self.engine.model_info.max_loras)

    def require_engine(self) -> EngineClient:
        """The engine, or 503 while loading / warming up / draining."""
        if self.draining:
            self.metrics.requests_rejected.labels(reason="draining").inc()
            raise OpenAIError(503, "the server is shutting down; retry on another replica",
                              code="server_shutting_down", headers={"Retry-After": "5"})
        if not self.serving or self.engine is None:
            self.metrics.requests_rejected.labels(reason="not_ready").inc()
            # The load error itself (it may name files) is in the log and on /ready.
            message = ("the model failed to load; see the server log" if self.load_error
                       else "the model is still loading")
            raise OpenAIError(503, message, code="model_not_ready",
                              headers={"Retry-After": "10"})
        if not self.engine.stats().loop_alive:
            self.metrics.requests_rejected.labels(reason="engine_stopped").inc()
            raise engine_unavailable()
        return self.engine

    def check_queue(self, num_requests: int) -> None:
        """429 when admitting ``num_requests`` more engine requests would overfill the queue."""
        waiting = self.awaiting_first_token
        if waiting + num_requests > self.settings.max_queued_requests:
            self.metrics.requests_rejected.labels(reason="queue_full").inc()
            raise OpenAIError(429, f"the server is busy: {waiting} requests are waiting; "
                              "retry shortly", code="queue_full", error_type="rate_limit_error",
                              headers={"Retry-After": "1"})

    def begin(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()
