"""ASGI middleware: API-key auth, body-size limit, HTTP metrics. Pure ASGI so that streaming
responses pass through untouched and the metrics see the stream's true end."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match

from app.errors import OpenAIError
from app.logs import REQUEST_ID
from app.state import ServerState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SLASHES = re.compile(r"/+")
# A client's own X-Request-Id is kept only when it is a plain token (it goes into the logs).
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def canonical_path(path: str) -> str:
    """How auth sees a path: case-folded, repeated and trailing slashes collapsed, so that
    '//V1/models/' cannot slip past a check for '/v1/'."""
    return _SLASHES.sub("/", path).lower().rstrip("/") or "/"


async def _send_error(send: Send, err: OpenAIError) -> None:
    response = err.response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class RequestIdMiddleware:
    """Gives every request an id: the client's X-Request-Id when it is a plain token, else a
    new one. It is echoed in the X-Request-Id response header, named in the log lines of any
    fault and carried by every log record of the request (the ``request_id`` field of JSON
    logs), so a user's report can be matched to the server's log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"")
        request_id = (given.decode() if _CLIENT_REQUEST_ID.fullmatch(given)
                      else f"req-{uuid.uuid4().hex}")
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        # Every record logged while this request is handled carries its id (app/logs.py).
        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


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
        return api_key_matches(token.strip().encode(), self.state.settings.api_keys)


def api_key_matches(supplied: bytes, keys: Sequence[str]) -> bool:
    """Whether ``supplied`` is one of ``keys``, in time that depends on neither: SHA-256
    digests make every comparison the same length (compare_digest alone leaks a length
    mismatch), and every key is compared, whichever matches."""
    digest = hashlib.sha256(supplied).digest()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return ok


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while reading it in.

    The body is read here, before the app sees it, so an oversized chunked upload is refused
    with 413 rather than surfacing as a parse error; the app then gets the body in one message
    and, after it, the client's own receive channel (so disconnects are still seen).
    """

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
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                await _send_error(send, too_big)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def route_template(scope: Scope, routes: list[BaseRoute]) -> str:
    """The route template a request matched ("/v1/models/{model_id:path}"), never the raw path:
    a label per raw path would let any client grow the metrics without bound. Requests answered
    before routing (401, 413) are matched here so they count under their route too."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path", None) or "unmatched"


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by route template, method and status; a request
    refused as invalid (400, 413, or a 404 on a known route such as an unknown model) also
    counts in gptq_requests_rejected_total{reason="invalid"}."""

    def __init__(self, app: ASGIApp, state: ServerState, routes: list[BaseRoute]) -> None:
        self.app = app
        self.state = state
        self.routes = routes

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
            template = route_template(scope, self.routes)
            m = self.state.metrics
            m.http_requests.labels(route=template, method=scope["method"],
                                   status=str(status)).inc()
            m.http_duration.labels(route=template).observe(time.monotonic() - start)
            if status in (400, 413, 415) or (status == 404 and template != "unmatched"):
                m.requests_rejected.labels(reason="invalid").inc()
