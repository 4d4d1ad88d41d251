"""ASGI middleware: API-key auth, body-size limit, HTTP metrics. Pure ASGI so that streaming
responses pass through untouched and the metrics see the stream's true end."""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app.errors import OpenAIError
from app.state import ServerState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SLASHES = re.compile(r"/+")


def canonical_path(path: str) -> str:
    """How auth sees a path: case-folded, repeated and trailing slashes collapsed, so that
    '//V1/models/' cannot slip past a check for '/v1/'."""
    return _SLASHES.sub("/", path).lower().rstrip("/") or "/"


async def _send_error(send: Send, err: OpenAIError) -> None:
    response = err.response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class AuthMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self._needs_key(canonical_path(scope["path"]))
                and not self._authorised(scope)):
            await _send_error(send, OpenAIError(
                401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                code="invalid_api_key", error_type="authentication_error",
                headers={"WWW-Authenticate": "Bearer"}))
            return
        await self.app(scope, receive, send)

    def _needs_key(self, path: str) -> bool:
        settings = self.state.settings
        if not settings.api_keys:
            return False
        if path in ("/health", "/ready"):
            return False
        if path == "/metrics":
            return settings.metrics_require_auth
        return True  # /v1/*, /tokenize, /detokenize, /version and anything unknown

    def _authorised(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        supplied = token.strip().encode()
        # Compare against every key, always, in constant time per key.
        ok = False
        for key in self.state.settings.api_keys:
            ok |= hmac.compare_digest(supplied, key.encode())
        return ok


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = OpenAIError(413, f"the request body exceeds {self.max_bytes} bytes",
                              code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_error(send, too_big)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_big
            return message

        try:
            await self.app(scope, limited_receive, send)
        except OpenAIError as err:
            if err is not too_big:
                raise
            await _send_error(send, err)


class HTTPMetricsMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            m = self.state.metrics
            m.http_requests.labels(route=template, method=scope["method"],
                                   status=str(status)).inc()
            m.http_duration.labels(route=template).observe(time.monotonic() - start)
