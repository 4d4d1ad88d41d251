"""Reading a request's JSON body strictly, with errors that name what is wrong.

FastAPI alone answers a body sent as ``text/plain`` with pydantic's "Input should be a valid
dictionary", invalid UTF-8 or a 100,000-deep array with "There was an error parsing the body",
and takes duplicated keys silently (the last one wins, which another parser in front of us may
read the other way). Routes built with ``JSONBodyRoute`` parse the body here first:

- the Content-Type must be JSON (``application/json`` or ``application/*+json``): else 415;
- the bytes must be UTF-8 (RFC 8259 section 8.1): else 400 naming the offending byte;
- no object may repeat a key: else 400 naming the key;
- nesting is at most ``MAX_DEPTH`` deep: else 400.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from app.errors import OpenAIError, bad_request

# Deeper than OpenAI requests go (a chat message with content parts is 4 deep; a JSON schema
# in a request nests twice per level it describes), shallow enough that nothing downstream
# recurses into trouble.
MAX_DEPTH = 64


def _check_content_type(value: str | None) -> None:
    message = Message()
    message["content-type"] = value or ""
    subtype = message.get_content_subtype()
    if value and message.get_content_maintype() == "application" and (
            subtype == "json" or subtype.endswith("+json")):
        return
    got = f"got '{value}'" if value else "the request has no Content-Type header"
    raise OpenAIError(415, "the request body must be JSON sent with 'Content-Type: "
                      f"application/json'; {got}", code="unsupported_media_type")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise bad_request(f"the request body repeats the key '{key}' in one object")
        out[key] = value
    return out


def _depth_exceeds(value: Any, limit: int) -> bool:  # noqa: ANN401 - any JSON value
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json_body(body: bytes, content_type: str | None) -> Any:  # noqa: ANN401
    """The JSON value of a non-empty request body, or an OpenAIError saying what is wrong."""
    _check_content_type(content_type)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} "
                          f"at offset {exc.start})") from exc
    too_deep = bad_request(f"the request body nests JSON deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError as exc:
        raise too_deep from exc
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from exc
    if isinstance(value, dict | list) and _depth_exceeds(value, MAX_DEPTH):
        raise too_deep
    return value


class _ParsedRequest(Request):
    """A request whose JSON body was parsed (and checked) before FastAPI reads it."""

    async def json(self) -> Any:  # noqa: ANN401
        if not hasattr(self, "_parsed"):
            self._parsed = parse_json_body(await self.body(), self.headers.get("content-type"))
        return self._parsed


class JSONBodyRoute(APIRoute):
    """A route whose JSON body goes through ``parse_json_body`` (use as a router's
    ``route_class``). The body is checked before FastAPI sees it, so its errors are ours."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            parsed = _ParsedRequest(request.scope, request.receive)
            if await parsed.body():
                await parsed.json()  # raises here, where the app's error handlers apply
            return await handler(parsed)

        return checked
