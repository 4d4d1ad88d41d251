"""Server-sent events framing, in one place."""

from __future__ import annotations

import json
from typing import Any

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
