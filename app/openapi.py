"""What /openapi.json says about the generation routes, so that it describes what the server
really takes and answers (tests/test_fuzz.py fuzzes the server from it).

The request models validate loosely on purpose (the routes then refuse bad values with
OpenAI's messages), so the ranges and the message shapes are added here as documentation only;
the fuzz test's negative cases check that the server refuses everything outside them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app import __version__


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, the body of every refusal."""

    error: ErrorBody


# Documentation-only constraints, as OpenAI documents them (and the server enforces them).
RANGES: dict[str, dict[str, Any]] = {
    "temperature": {"minimum": 0, "maximum": 2},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "n": {"minimum": 1},
    "max_tokens": {"minimum": 1},
    "max_completion_tokens": {"minimum": 1},
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "min_p": {"minimum": 0, "maximum": 1},
    "repetition_penalty": {"exclusiveMinimum": 0, "maximum": 10},
    "min_tokens": {"minimum": 0},
    "top_logprobs": {"minimum": 0, "maximum": 20},
}

_TEXT_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
MESSAGE = {
    "type": "object", "required": ["role", "content"], "additionalProperties": False,
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"},
                              {"type": "array", "items": _TEXT_PART, "minItems": 1}]},
        "name": {"type": "string"},
    },
}

# One server-sent event: its data is a JSON chunk, an error envelope, or "[DONE]" last.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"const": "message"}}}

_ERRORS = {400: "invalid request", 401: "missing or wrong API key",
           404: "unknown model or route", 413: "body too large",
           415: "the body is not JSON", 429: "the queue is full (Retry-After)",
           500: "internal fault (the message names the request id)",
           503: "loading, draining or engine stopped (Retry-After)"}


def generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a generation route: its JSON body, or an SSE stream with
    ``stream: true``, and the error envelope for every refusal."""
    return {200: {"model": model, "description": "the completion, or with stream=true an SSE "
                  "stream of chunks ending in data: [DONE]",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}},
            **{status: {"model": ErrorResponse, "description": why}
               for status, why in _ERRORS.items()}}


def _tighten(schemas: dict[str, Any]) -> None:
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field, bounds in RANGES.items():
            if field in props:
                props[field] = {**props[field], **bounds}
        if "logprobs" in props and name == "CompletionRequest":
            props["logprobs"] = {**props["logprobs"], "minimum": 0, "maximum": 5}
        props["stop"] = {"anyOf": [{"type": "string", "minLength": 1},
                                   {"type": "array", "maxItems": 4,
                                    "items": {"type": "string", "minLength": 1}},
                                   {"type": "null"}]}
    schemas["ChatCompletionRequest"]["properties"]["messages"] = {
        "type": "array", "items": MESSAGE, "minItems": 1}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the schema described above (built once)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=__version__, routes=app.routes)
            for methods in schema["paths"].values():
                for operation in methods.values():
                    # FastAPI documents a 422 the error handlers never send (they answer 400).
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            _tighten(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
