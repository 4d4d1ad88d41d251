"""OpenAI chat messages -> ChatMessage, checked by hand to give OpenAI's errors.

Roles: system, developer (as system), user, assistant (with ``tool_calls``) and tool (the
result of an earlier call: its ``tool_call_id`` must name a call of a preceding assistant
message, as OpenAI requires). Content is a string or a list of text parts.
"""

from __future__ import annotations

from typing import Any

from app.errors import bad_request
from app.routes.common import refuse
from app.templates import ChatMessage, ToolCallMessage

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}
_FIELDS = {"role", "content", "name", "refusal", "tool_calls", "function_call", "tool_call_id"}


def parse_messages(raw: list[Any]) -> list[ChatMessage]:
    if not raw:
        raise bad_request("'messages' must not be empty", "messages")
    out: list[ChatMessage] = []
    calls: dict[str, str] = {}  # tool_call_id -> function name, of the calls so far
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if role == "function":
            raise refuse(f"{where}.role", "'function' messages (use tools and 'tool' "
                         "messages)")
        if role not in _ROLES:
            raise bad_request(f"{where}.role must be one of system, developer, user, "
                              f"assistant, tool; got {role!r}", f"{where}.role")
        extra = set(m) - _FIELDS
        if extra:
            raise bad_request(f"unrecognized field(s) in {where}: {', '.join(sorted(extra))}",
                              where)
        if m.get("function_call"):
            raise refuse(f"{where}.function_call", "function_call (use tool_calls)")
        tool_calls = _tool_calls(m.get("tool_calls"), role, f"{where}.tool_calls")
        content = _content_text(m.get("content"), role, f"{where}.content")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise bad_request(f"{where}.tool_call_id must name a tool call of an earlier "
                                  "assistant message", f"{where}.tool_call_id")
            out.append(ChatMessage("tool", content, tool_call_id=call_id,
                                   name=calls[call_id]))
            continue
        calls.update((c.id, c.name) for c in tool_calls)
        out.append(ChatMessage(_ROLES[role], content, tool_calls=tool_calls))
    return out


def _tool_calls(value: Any, role: str, where: str) -> tuple[ToolCallMessage, ...]:
    if not value:
        return ()
    if role != "assistant":
        raise bad_request(f"{where} is only allowed on assistant messages", where)
    if not isinstance(value, list):
        raise bad_request(f"{where} must be a list", where)
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call, dict) or call.get("type", "function") != "function"
                or not isinstance(call.get("id"), str) or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("arguments"), str)):
            raise bad_request(f"{at} must be {{\"id\": str, \"type\": \"function\", "
                              "\"function\": {\"name\": str, \"arguments\": str}}", at)
        out.append(ToolCallMessage(call["id"], fn["name"], fn["arguments"]))
    return tuple(out)


def _content_text(content: Any, role: str, where: str) -> str:
    if content is None:
        if role == "assistant":
            return ""
        raise bad_request(f"{where} is required", where)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio", "file", "refusal", "image", "audio"):
            raise refuse(f"{where}[{j}]", f"'{kind}' content; this model reads text only")
        else:
            raise bad_request(f"{where}[{j}] must be a text part "
                              "({\"type\": \"text\", \"text\": ...})", f"{where}[{j}]")
    return "".join(texts)
