"""Tool calling for models without a tool format of their own (Llama 2): the request's tools,
the prompt that describes them, and the grammar that forces a call.

The model writes each call on its own line as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

``auto`` leaves the output free and parses calls from it (app.tool_calls); ``required`` and a
named ``tool_choice`` constrain the output to such lines with arguments matching the tools'
parameter schemas (one line, or one or more with ``parallel_tool_calls``). The same format
renders earlier calls in the history, so the prompt, the history and the grammar agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from app.errors import bad_request
from app.structured import check_schema
from app.templates import CALL_CLOSE, CALL_OPEN, ToolPrompt
from engine.params import Constraint, ConstraintKind
from engine.structured.grammar import JSON_OPTIONS

CALL_SEPARATOR = "\n"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {},
                                  "additionalProperties": False}

Mode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The tool as OpenAI's request spells it (what Jinja chat templates receive)."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[ToolSpec, ...]
    mode: Mode
    name: str | None  # the function a named tool_choice forces
    parallel: bool

    @property
    def active(self) -> bool:
        """Whether the model is told about the tools and its output parsed for calls."""
        return bool(self.tools) and self.mode != "none"

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)

    def constraint(self, answer_schema: str | None = None) -> Constraint | None:
        """The forced call's grammar (required, named), or with ``answer_schema`` (auto with a
        JSON response_format) the choice of calls or an answer matching that schema."""
        if self.forced:
            tools = [t for t in self.tools if self.mode == "required" or t.name == self.name]
            return Constraint(ConstraintKind.GRAMMAR,
                              _calls_lark(tools, self.parallel and self.mode == "required"),
                              "tools")
        if answer_schema is not None and self.active:
            lark = _calls_lark(list(self.tools), self.parallel, start="calls")
            lark = f"start: calls | answer\nanswer: %json {answer_schema}\n" + lark
            return Constraint(ConstraintKind.GRAMMAR, lark, "response_format")
        return None

    def template_prompt(self) -> ToolPrompt | None:
        """What the chat template shows of the tools; None when they are not active."""
        if not self.active:
            return None
        return ToolPrompt(self.prompt(), [t.openai() for t in self.tools])

    def prompt(self) -> str:
        """The system text that describes the tools and the call format."""
        lines = ["You can call the following tools. To call a tool, write one line per call, "
                 "exactly:",
                 f'{CALL_OPEN}{{"name": "<tool name>", "arguments": <the arguments as a JSON '
                 f'object>}}{CALL_CLOSE}']
        if self.mode == "named":
            lines.append(f"You must call the tool {self.name} now.")
        elif self.mode == "required":
            lines.append("You must call at least one tool now." if self.parallel
                         else "You must call exactly one tool now.")
        else:
            lines.append("Call tools only when they help; otherwise answer normally."
                         + ("" if self.parallel else " Call at most one tool."))
        lines.append("Each call's result comes back in a <tool_result> block.")
        lines.append("Tools:")
        lines += [json.dumps({"name": t.name, "description": t.description or "",
                              "parameters": t.parameters}, ensure_ascii=False)
                  for t in self.tools]
        return "\n".join(lines)


def parse_tools(tools: Any, tool_choice: Any, parallel: bool | None) -> ToolRequest:
    specs = _parse_specs(tools)
    mode, name = _parse_choice(tool_choice, specs)
    return ToolRequest(specs, mode, name, True if parallel is None else parallel)


def _parse_specs(tools: Any) -> tuple[ToolSpec, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list", "tools")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"'{where}' must be {{\"type\": \"function\", \"function\": "
                              "{...}}; only function tools are supported", where)
        extra = set(tool) - {"type", "function"}
        if extra:
            raise bad_request(f"unrecognized field(s) in '{where}': {', '.join(sorted(extra))}",
                              where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"'{where}.function' must be an object", f"{where}.function")
        extra = set(fn) - {"name", "description", "parameters", "strict"}
        if extra:
            raise bad_request(f"unrecognized field(s) in '{where}.function': "
                              f"{', '.join(sorted(extra))}", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad_request(f"'{where}.function.name' must be 1-64 letters, digits, '_' or "
                              "'-'", f"{where}.function.name")
        if any(s.name == name for s in specs):
            raise bad_request(f"tool name {name!r} is given twice", f"{where}.function.name")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request(f"'{where}.function.description' must be a string",
                              f"{where}.function.description")
        parameters = fn.get("parameters", _NO_PARAMETERS)
        check_schema(parameters, f"{where}.function.parameters", "tools")
        if parameters.get("type", "object") != "object":
            raise bad_request(f"'{where}.function.parameters' must describe an object",
                              "tools")
        specs.append(ToolSpec(name, description, parameters))
    return tuple(specs)


def _parse_choice(choice: Any, specs: tuple[ToolSpec, ...]) -> tuple[Mode, str | None]:
    if choice is None:
        return ("auto" if specs else "none"), None
    if choice in ("none", "auto", "required"):
        if choice == "required" and not specs:
            raise bad_request("tool_choice 'required' needs 'tools'", "tool_choice")
        return choice, None
    if (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
        if name not in {s.name for s in specs}:
            raise bad_request(f"tool_choice names the function {name!r}, which is not in "
                              "'tools'", "tool_choice")
        return "named", name
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": "
                      "\"function\", \"function\": {\"name\": ...}}", "tool_choice")


def _calls_lark(tools: list[ToolSpec], parallel: bool, start: str = "start") -> str:
    """Lark (llguidance's dialect) for one call line, or several with ``parallel``; each
    call's arguments are the tool's parameter schema, generated as compact JSON."""
    rules = [f"{start}: call" + (f" ({json.dumps(CALL_SEPARATOR)} call)*" if parallel else ""),
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        head = f'{CALL_OPEN}{{"name": {json.dumps(tool.name)}, "arguments": '
        schema = {"x-guidance": JSON_OPTIONS, **tool.parameters}
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps('}' + CALL_CLOSE)}")
        rules.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    return "\n".join(rules) + "\n"


def answer_schema_text(constraint: Constraint) -> str | None:
    """The JSON schema text a response_format constraint puts on an answer, for combining
    with auto tool calls; None for constraints that are not JSON."""
    if constraint.kind == ConstraintKind.JSON_SCHEMA:
        schema = json.loads(constraint.text)
        return json.dumps({"x-guidance": JSON_OPTIONS, **schema}, ensure_ascii=False)
    if constraint.kind == ConstraintKind.JSON_OBJECT:
        return json.dumps({"x-guidance": JSON_OPTIONS, "type": "object"})
    return None
