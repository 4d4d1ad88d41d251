"""OpenAI's error envelope for every failure: {"error": {"message", "type", "param", "code"}}.

Every exception handler of the app lives here, so no route can leak FastAPI's
``{"detail": ...}`` or a 422: the official SDKs read ``error.message`` and retry 5xx (never
send a 5xx for bad input).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def internal_error(request_id: str) -> OpenAIError:
    """A fault's error for the client: the request id to report, never the exception's text
    (it may name files or hold prompt text); the log has the details under the same id."""
    return OpenAIError(500, f"internal server error (request id {request_id})",
                       code="internal_error")


def engine_unavailable() -> OpenAIError:
    """The engine has stopped for good (/health is 503): the server must be restarted."""
    return OpenAIError(503, "the engine has stopped; this server is restarting, retry on "
                       "another replica", code="engine_unavailable", headers={"Retry-After": "5"})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as a readable sentence and the parameter it concerns."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # Drop pydantic's union-branch tags (e.g. "str", "list[int]") from the location.
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in {"str", "int", "list"}]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind == "missing":
        return f"'{param}' is a required parameter", param
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    msg = err.get("msg", "invalid value")
    return (f"invalid value for '{param}': {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        if exc.status >= 500 and exc.status != 503:
            log.error("request %s: %d %s", _request_id(request), exc.status, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return OpenAIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return OpenAIError(exc.status_code, message,
                           headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        request_id = _request_id(request)
        log.exception("request %s: internal error on %s %s", request_id, request.method,
                      request.url.path)
        response = internal_error(request_id).response()
        # Starlette sends this from its outermost layer, past RequestIdMiddleware.
        response.headers["X-Request-Id"] = request_id
        return response


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")
