"""The HTTP/1.1 connection: uvicorn's h11 protocol plus the limits it does not enforce.

uvicorn bounds a request head's size (h11's incomplete-event limit) and idle keep-alive
connections, and nothing else: a client that sends its headers one byte a minute (slowloris),
or a body that never ends, holds a connection for ever, and a client that stops reading a
stream holds the response and its engine request for ever (uvicorn's ``send`` waits for the
socket to drain). It also takes a request that carries both Content-Length and
Transfer-Encoding, which RFC 9112 section 6.3 calls a request-smuggling attempt. This protocol
adds, per connection:

- a deadline for the request head (``header_timeout``), from the connection's start or from the
  first byte of a keep-alive request; past it the connection is closed;
- a deadline for the body (``body_timeout``), from the end of the head;
- a send timeout (``send_timeout``): a connection whose writes have been blocked that long (the
  client reads nothing while the transport's buffer is over its high-water mark, 64 KiB) is
  dropped, so the app sees the disconnect and aborts the engine request;
- refusals that name the problem, in OpenAI's error envelope: 431 for an oversized head, 400
  for a malformed request or conflicting framing headers, 501 for an unknown transfer coding.
"""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    send_timeout: float


class _Deadline(enum.Enum):
    HEAD = "head"
    BODY = "body"
    SEND = "send"


class _CheckedConnection(h11.Connection):
    """h11's server connection that also enforces the head-size limit on heads that arrive
    whole (h11 checks it only while a head is incomplete, so a 200 KB head read in one go
    passed), refuses conflicting framing headers, and remembers the protocol error it raised,
    so the refusal can say what was wrong."""

    def __init__(self, max_header_bytes: int) -> None:
        super().__init__(h11.SERVER, max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self.last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:  # noqa: ANN401 - h11's own return type is a union of classes
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise
        if isinstance(event, h11.Request):
            self._check_head(event)
        return event

    def _check_head(self, request: h11.Request) -> None:
        size = len(request.method) + len(request.target) + sum(
            len(name) + len(value) + 4 for name, value in request.headers)
        if size > self.max_header_bytes:
            self.last_error = h11.RemoteProtocolError("request head too long",
                                                      error_status_hint=431)
            raise self.last_error
        names = {name for name, _ in request.headers}  # h11 lower-cases names
        if b"content-length" in names and b"transfer-encoding" in names:
            self.last_error = h11.RemoteProtocolError(
                "the request has both Content-Length and Transfer-Encoding headers",
                error_status_hint=400)
            raise self.last_error


def _refusal_message(error: h11.RemoteProtocolError | None, max_header_bytes: int) -> str:
    if error is None:
        return "malformed HTTP request"
    if error.error_status_hint == 431:
        return f"the request line and headers exceed {max_header_bytes} bytes"
    return f"malformed HTTP request: {error}"


class GuardedH11Protocol(H11Protocol):
    """Build with ``functools.partial(GuardedH11Protocol, limits=...)`` as uvicorn's ``http``."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.conn = _CheckedConnection(limits.max_header_bytes)
        self._timers: dict[_Deadline, asyncio.TimerHandle] = {}

    # ---- deadlines ---------------------------------------------------------------------------

    def _arm(self, which: _Deadline, seconds: float) -> None:
        if which not in self._timers:
            self._timers[which] = self.loop.call_later(seconds, self._expired, which)

    def _disarm(self, which: _Deadline) -> None:
        timer = self._timers.pop(which, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, which: _Deadline) -> None:
        self._timers.pop(which, None)
        if self.transport.is_closing():
            return
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        self.logger.info("closing a connection from %s: its %s deadline passed", peer,
                         which.value)
        if which is _Deadline.SEND:
            self.transport.abort()  # close() would wait for a buffer nobody reads
        else:
            self.transport.close()

    def _track_request(self) -> None:
        """Arm or disarm the head and body deadlines for the client's side of the exchange."""
        state = self.conn.their_state
        if state is h11.IDLE:
            # A fresh connection, or bytes of a keep-alive request: the head must follow soon.
            # An idle keep-alive connection with nothing sent is uvicorn's keep-alive timer's.
            if self.cycle is None or self.conn.trailing_data[0]:
                self._arm(_Deadline.HEAD, self.limits.header_timeout)
            return
        self._disarm(_Deadline.HEAD)
        if state is h11.SEND_BODY:
            self._arm(_Deadline.BODY, self.limits.body_timeout)
        else:
            self._disarm(_Deadline.BODY)

    # ---- uvicorn's protocol hooks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._track_request()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.transport.is_closing():
            self._track_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._track_request()

    def connection_lost(self, exc: Exception | None) -> None:
        for which in list(self._timers):
            self._disarm(which)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm(_Deadline.SEND, self.limits.send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm(_Deadline.SEND)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's refusal of a request h11 could not parse, as an OpenAI error that names
        the problem (and with h11's status hint: 431, 501) instead of a plain-text 400."""
        error = self.conn.last_error
        status = error.error_status_hint if error is not None else 400
        body = json.dumps({"error": {
            "message": _refusal_message(error, self.limits.max_header_bytes),
            "type": "invalid_request_error", "param": None, "code": None}}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            for event in (h11.Response(status_code=status, headers=headers,
                                       reason=STATUS_PHRASES.get(status, b"")),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # the connection is past the point of a response
            pass
        self.transport.close()
