"""Logging for the server process: one handler on the root logger for every record (the app's,
the engine's, uvicorn's, huggingface_hub's), as text or as one JSON object a line.

The request id of the HTTP request being handled travels in a context variable, set by
RequestIdMiddleware: asyncio copies the context into every task a request starts, so any record
logged on its behalf carries it (the ``request_id`` field of a JSON line). Records from the
engine's own thread carry none.

What is never logged at INFO: API keys (the settings snapshot masks them; keys are never
formatted into messages) and prompt or completion text (no INFO line quotes a request).
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

# The process name tells the front (MainProcess) from the engine core process
# (gptq-engine-core), which logs through the same configuration.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

# A context variable is the one module-level object here: it holds no value itself, each
# task's context does (the default, None, outside a request).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gptq_request_id", default=None)


class _RequestContext(logging.Filter):
    """Puts the current request id on the record, and drops uvicorn's ``color_message`` (the
    same text with terminal colour codes, which a JSON line would otherwise repeat)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
        record.__dict__.pop("color_message", None)
        return True


def json_formatter() -> logging.Formatter:
    """Fields: timestamp (ISO 8601, UTC), level, logger, process, message, then request_id and any
    ``extra`` the call passed (e.g. a loading stage's progress), and exc_info for exceptions."""
    return JsonFormatter("%(levelname)s %(name)s %(processName)s %(message)s", timestamp=True,
                         rename_fields={"levelname": "level", "name": "logger",
                                        "processName": "process"})


def configure_logging(level: str, log_format: Literal["text", "json"],
                      stream: TextIO | None = None) -> None:
    """Route every logger through one handler on ``stream`` (stderr) in ``log_format``, and
    turn huggingface_hub's download progress bars off unless a person is watching: they are
    carriage-return animations, which a log collector or a JSON line cannot take."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestContext())
    handler.setFormatter(json_formatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if log_format == "json" or not stream.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
