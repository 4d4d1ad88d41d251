"""Server-sent events: framing and the streaming response, in one place."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import OpenAIError

DONE = "data: [DONE]\n\n"
KEEPALIVE_COMMENT = ": keep-alive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_event(err: OpenAIError) -> str:
    """An error after the stream began: the status line is gone, so it travels as data."""
    return event(err.body())


class EventStreamResponse(StreamingResponse):
    """An SSE response that calls ``on_close`` however it ends: finished, client gone,
    cancelled, or cancelled before its body iterator ever started (whose own cleanup then never
    runs, so resources reserved for the stream would leak without this)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type=MEDIA_TYPE, headers=HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
