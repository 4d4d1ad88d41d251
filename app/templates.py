"""Chat prompt templates: the model card's default, Llama-2-chat, or a Jinja template.

A template turns OpenAI messages into one prompt string and may declare stop strings that keep
a base model from writing the user's next turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" ("developer" arrives here as "system")
    content: str


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

    def render(self, messages: list[ChatMessage]) -> RenderedPrompt:
        raise NotImplementedError


class DefaultTemplate(ChatTemplate):
    """The model card's format:

        ### System:\\n{system}\\n\\n### User:\\n{instruction}\\n\\n### Response:

    Without a system message the System block is left out. Earlier turns are rendered the same
    way, each assistant reply after its "### Response:" and followed by a blank line.
    """

    name = "default"
    STOP = ("### User:",)

    def render(self, messages: list[ChatMessage]) -> RenderedPrompt:
        parts: list[str] = []
        for m in messages:
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

    def render(self, messages: list[ChatMessage]) -> RenderedPrompt:
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
        except Exception as exc:
            raise TemplateError(f"chat template {name} does not parse: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[ChatMessage]) -> RenderedPrompt:
        try:
            text = self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token)
        except TemplateError:
            raise
        except Exception as exc:
            raise TemplateError(f"the chat template failed: {exc}") from exc
        # Templates that write BOS themselves must not get a second one from the tokenizer.
        return RenderedPrompt(text, (), add_special_tokens=not text.startswith(self.bos_token))


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
