"""Chat prompt templates: the model card's default, Llama-2-chat, or a Jinja template.

A template turns OpenAI messages into one prompt string and may declare stop strings that keep
a base model from writing the user's next turn.

Tools: the built-in templates put the tool prompt (app.tools) at the end of the system text,
render an assistant's earlier calls as ``<tool_call>`` lines after its content, and a run of
tool results as one user turn of ``<tool_result name="...">...</tool_result>`` blocks. A Jinja
template that reads ``tools`` gets them (OpenAI's tool objects, as transformers passes them)
and the messages in transformers' tool-calling shape; one that does not is rendered like the
built-in ones, the calls and results flattened into text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCallMessage:
    """An earlier call in the history (an assistant message's ``tool_calls`` entry)."""

    id: str
    name: str
    arguments: str  # JSON text, as the client sent it


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool" ("developer" arrives as "system")
    content: str
    tool_calls: tuple[ToolCallMessage, ...] = ()
    # For role "tool": the call it answers and that call's function name.
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ToolPrompt:
    """The tools of a request as a template shows them."""

    text: str  # the instructions and tool list, for templates without tool support
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's tool objects


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    # Stop strings the template declares, added to the request's own.
    stop: tuple[str, ...]
    # Whether the tokenizer should still add BOS (Jinja templates usually write it themselves).
    add_special_tokens: bool = True


class TemplateError(ValueError):
    pass


class ChatTemplate:
    name: str

    def render(self, messages: list[ChatMessage],
               tools: ToolPrompt | None = None) -> RenderedPrompt:
        raise NotImplementedError


def call_line(call: ToolCallMessage) -> str:
    """An earlier call in the model's own call format (app.tools)."""
    try:
        json.loads(call.arguments)
        arguments = call.arguments
    except json.JSONDecodeError:  # OpenAI passes them through unchecked; keep them readable
        arguments = json.dumps(call.arguments, ensure_ascii=False)
    return f'{CALL_OPEN}{{"name": {json.dumps(call.name)}, "arguments": {arguments}}}{CALL_CLOSE}'


def flatten_tools(messages: Sequence[ChatMessage],
                  tools: ToolPrompt | None) -> list[ChatMessage]:
    """Messages with only system/user/assistant roles and text: the tool prompt appended to
    the (first) system message, calls as lines after the assistant's content, each run of tool
    results one user message."""
    out: list[ChatMessage] = []
    results = False  # whether out[-1] is a user message of tool results
    for m in messages:
        if m.role == "tool":
            block = f'<tool_result name="{m.name}">\n{m.content}\n</tool_result>'
            if results:
                out[-1] = replace(out[-1], content=out[-1].content + "\n" + block)
            else:
                out.append(ChatMessage("user", block))
            results = True
            continue
        results = False
        if m.tool_calls:
            lines = "\n".join(call_line(c) for c in m.tool_calls)
            out.append(ChatMessage("assistant", f"{m.content}\n{lines}" if m.content
                                   else lines))
        else:
            out.append(m)
    if tools is not None:
        if out and out[0].role == "system":
            out[0] = replace(out[0], content=f"{out[0].content}\n\n{tools.text}")
        else:
            out.insert(0, ChatMessage("system", tools.text))
    return out


class DefaultTemplate(ChatTemplate):
    """The model card's format:

        ### System:\\n{system}\\n\\n### User:\\n{instruction}\\n\\n### Response:

    Without a system message the System block is left out. Earlier turns are rendered the same
    way, each assistant reply after its "### Response:" and followed by a blank line.
    """

    name = "default"
    STOP = ("### User:",)

    def render(self, messages: list[ChatMessage],
               tools: ToolPrompt | None = None) -> RenderedPrompt:
        parts: list[str] = []
        for m in flatten_tools(messages, tools):
            if m.role == "system":
                parts.append(f"### System:\n{m.content}\n\n")
            elif m.role == "user":
                parts.append(f"### User:\n{m.content}\n\n")
            else:
                parts.append(f"### Response:\n{m.content}\n\n")
        parts.append("### Response:")
        return RenderedPrompt("".join(parts), self.STOP)


class Llama2ChatTemplate(ChatTemplate):
    """Meta's Llama-2-chat format: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]
    {assistant} </s><s>[INST] ...``. BOS/EOS are written as text here and tokenised as
    special tokens, so the tokenizer must not add another BOS."""

    name = "llama-2-chat"

    def render(self, messages: list[ChatMessage],
               tools: ToolPrompt | None = None) -> RenderedPrompt:
        messages = flatten_tools(messages, tools)
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns = [m for m in messages if m.role != "system"]
        out: list[str] = []
        pending_user: str | None = None
        for m in turns:
            if m.role == "user":
                if pending_user is not None:
                    out.append(f"<s>[INST] {pending_user.strip()} [/INST]</s>")
                pending_user = m.content
            else:
                user = pending_user if pending_user is not None else ""
                out.append(f"<s>[INST] {user.strip()} [/INST] {m.content.strip()} </s>")
                pending_user = None
        if pending_user is not None:
            out.append(f"<s>[INST] {pending_user.strip()} [/INST]")
        text = "".join(out)
        if system:
            # The system prompt goes inside the first [INST].
            text = text.replace("[INST] ", f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n", 1)
        if not out:
            text = f"<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n [/INST]"
        return RenderedPrompt(text, (), add_special_tokens=False)


class JinjaTemplate(ChatTemplate):
    """A Hugging Face style Jinja chat template, rendered in a sandbox as transformers does."""

    def __init__(self, source: str, name: str, bos_token: str = "<s>",
                 eos_token: str = "</s>") -> None:
        self.name = name
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
            self.reads_tools = "tools" in meta.find_undeclared_variables(env.parse(source))
        except Exception as exc:
            raise TemplateError(f"chat template {name} does not parse: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[ChatMessage],
               tools: ToolPrompt | None = None) -> RenderedPrompt:
        extra: dict[str, Any] = {}
        if tools is not None and self.reads_tools:
            extra["tools"] = tools.tools
            dicts = [_hf_message(m) for m in messages]
        else:
            dicts = [{"role": m.role, "content": m.content}
                     for m in flatten_tools(messages, tools)]
        try:
            text = self._template.render(messages=dicts, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token,
                                         **extra)
        except TemplateError:
            raise
        except Exception as exc:
            raise TemplateError(f"the chat template failed: {exc}") from exc
        # Templates that write BOS themselves must not get a second one from the tokenizer.
        return RenderedPrompt(text, (), add_special_tokens=not text.startswith(self.bos_token))


def _hf_message(m: ChatMessage) -> dict[str, Any]:
    """A message in transformers' tool-calling shape: calls with parsed arguments."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": _parsed(c.arguments)}} for c in m.tool_calls]
    if m.role == "tool":
        out["tool_call_id"], out["name"] = m.tool_call_id, m.name
    return out


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _raise(message: str) -> None:
    raise TemplateError(message)


def load_template(spec: str, tokenizer_template: str | None) -> ChatTemplate:
    """``spec``: "default" (alias "alpaca-system"), "llama-2-chat", "tokenizer", or a path to
    a Jinja file."""
    if spec in ("default", "alpaca-system"):
        return DefaultTemplate()
    if spec == "llama-2-chat":
        return Llama2ChatTemplate()
    if spec == "tokenizer":
        if not tokenizer_template:
            raise TemplateError("chat_template=tokenizer, but the checkpoint's "
                                "tokenizer_config.json has no chat_template")
        return JinjaTemplate(tokenizer_template, "tokenizer")
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(f"chat_template must be default (alpaca-system), llama-2-chat, "
                            f"tokenizer or a Jinja file; {spec!r} is none of these")
    return JinjaTemplate(path.read_text(), str(path))
