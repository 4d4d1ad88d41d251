"""Tool calls out of a choice's generated text, as it streams.

``ToolCallStream`` turns text chunks (split anywhere: the engine's deltas) into events: content
text, the start of a call (id and name), and fragments of its arguments. The non-streaming
response feeds the whole text through the same parser, so a reassembled stream and the
non-streamed message always agree.

Two regimes (the call format is app.tools'):
- forced (``required`` or a named tool_choice): the grammar wrote every byte of the call
  lines, so a call starts as soon as its name is complete and its arguments stream as they
  are generated; the text between lines is only their separator.
- auto: the model wrote freely. Text outside ``<tool_call>`` blocks is content (a partial
  marker at the end of a chunk is held back); a block becomes a call only once it is closed and
  parses as {"name": <one of the tools>, "arguments": {...}}; anything else is content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from app.templates import CALL_CLOSE, CALL_OPEN

_FORCED_HEAD = re.compile(r'\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Event = Content | CallStart | CallArguments


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class _JsonEnd:
    """Finds where one JSON value that starts with '{' or '[' ends, chunk by chunk."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def feed(self, text: str) -> int | None:
        """The index in ``text`` just past the value's end, or None if it goes on."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


@dataclass
class ToolCallStream:
    names: frozenset[str]
    forced: bool
    calls: list[ParsedCall] = field(default_factory=list)
    _buffer: str = ""
    # outside: between calls; block: inside an auto-regime <tool_call>; head, args, tail: a
    # forced call before, inside and after its arguments.
    _state: str = "outside"
    _args: _JsonEnd = field(default_factory=_JsonEnd)

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while (step := self._step()) is not None:
            events += step
        return events

    def finish(self) -> list[Event]:
        """Whatever is left when the output ends (an unclosed block in auto is content)."""
        rest, self._buffer = self._buffer, ""
        if self._state == "block":
            rest = CALL_OPEN + rest
        if self.forced or not rest:
            return []
        return [Content(rest)]

    def _step(self) -> list[Event] | None:
        return {"outside": self._outside, "block": self._block, "head": self._head,
                "args": self._args_, "tail": self._tail}[self._state]()

    # ---- states: each returns the events it produced, or None when it needs more text ----

    def _outside(self) -> list[Event] | None:
        start = self._buffer.find(CALL_OPEN)
        if start < 0:
            keep = _partial_suffix(self._buffer, CALL_OPEN)
            text = self._buffer[:len(self._buffer) - keep]
            self._buffer = self._buffer[len(text):]
            return self._content(text) if text else None
        before, self._buffer = self._buffer[:start], self._buffer[start + len(CALL_OPEN):]
        self._state = "head" if self.forced else "block"
        return self._content(before)

    def _content(self, text: str) -> list[Event]:
        # Forced output has only separators between its calls: nothing the client should see.
        return [] if self.forced or not text else [Content(text)]

    def _block(self) -> list[Event] | None:
        end = self._buffer.find(CALL_CLOSE)
        if end < 0:
            return None
        body, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_CLOSE):]
        self._state = "outside"
        call = self._parse_block(body)
        if call is None:
            return [Content(CALL_OPEN + body + CALL_CLOSE)]
        name, arguments = call
        start = self._start(name)
        self.calls[-1].arguments = arguments
        return [start, CallArguments(start.index, arguments)]

    def _head(self) -> list[Event] | None:
        head = _FORCED_HEAD.match(self._buffer)
        if head is None:
            return None
        self._buffer = self._buffer[head.end():]
        self._state, self._args = "args", _JsonEnd()
        return [self._start(head.group(1))]

    def _args_(self) -> list[Event] | None:
        if not self._buffer:
            return None
        end = self._args.feed(self._buffer)
        if end is None:
            fragment, self._buffer = self._buffer, ""
        else:
            fragment, self._buffer = self._buffer[:end], self._buffer[end:]
            self._state = "tail"
        self.calls[-1].arguments += fragment
        return [CallArguments(len(self.calls) - 1, fragment)]

    def _tail(self) -> list[Event] | None:
        tail = "}" + CALL_CLOSE
        if len(self._buffer) < len(tail):
            return None
        self._buffer = self._buffer[len(tail):]
        self._state = "outside"
        return []

    def _start(self, name: str) -> CallStart:
        call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name)
        self.calls.append(call)
        return CallStart(len(self.calls) - 1, call.id, name)

    def _parse_block(self, body: str) -> tuple[str, str] | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return value["name"], json.dumps(arguments, ensure_ascii=False)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def split_tool_calls(text: str, names: frozenset[str], forced: bool
                     ) -> tuple[str, list[ParsedCall]]:
    """A whole output's content (text outside calls) and its calls."""
    stream = ToolCallStream(names, forced)
    events = stream.feed(text) + stream.finish()
    return "".join(e.text for e in events if isinstance(e, Content)), stream.calls
