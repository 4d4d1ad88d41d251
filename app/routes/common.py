"""Helpers every generation route uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request

from app.errors import OpenAIError, bad_request
from app.protocol.common import PromptTokensDetails, Usage
from app.state import ServerState
from app.templates import RenderedPrompt, TemplateError, ToolPrompt
from engine.client import EngineClient
from engine.outputs import GenerationDelta


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def http_request_id(request: Request) -> str:
    """The id RequestIdMiddleware gave this request (also in its X-Request-Id header)."""
    return getattr(request.state, "request_id", "-")


def check_model(state: ServerState, name: str) -> str | None:
    """The LoRA adapter a request's ``model`` names, None for the base model; 404 for a name
    this server does not serve."""
    engine = state.engine
    known = set(state.settings.model_names) | {state.settings.model}
    if engine is not None:
        known.add(engine.model_info.model)
    if name in known:
        return None
    adapters = [] if engine is None else [a.name for a in engine.lora_adapters()]
    if name in adapters:
        return name
    raise OpenAIError(404, f"the model '{name}' does not exist; this server serves "
                      f"{', '.join([*state.settings.model_names, *adapters])}", param="model",
                      code="model_not_found")


def check_token_ids(engine: EngineClient, ids: list[int], param: str) -> None:
    vocab = engine.tokenizer.vocab_size
    for t in ids:
        if not 0 <= t < vocab:
            raise bad_request(f"token id {t} in '{param}' is outside the vocabulary "
                              f"[0, {vocab})", param)


def refuse(param: str, what: str) -> OpenAIError:
    return bad_request(f"'{param}' is not supported by this server: {what}", param)


def system_fingerprint(engine: EngineClient) -> str:
    info = engine.model_info
    group = info.group_size if info.group_size is not None else -1
    return f"gptq-{info.bits}b-g{group}-{info.linear_backend}"


def encode_text(engine: EngineClient, text: str, param: str,
                add_special_tokens: bool = True) -> list[int]:
    """Tokenise request text. JSON can carry lone UTF-16 surrogates ("\\ud800"), which are no
    text at all: refuse them as bad input rather than let the tokenizer fail."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"'{param}' is not valid Unicode text (a lone surrogate at "
                          f"character {exc.start})", param) from exc
    return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def usage(prompt_tokens: int, finals: Mapping[int, GenerationDelta], n: int) -> Usage:
    """Usage of a response whose choice ``index`` is choice ``index % n`` of prompt
    ``index // n``. Like ``prompt_tokens`` (each prompt once, whatever n), ``cached_tokens``
    counts each prompt once: the prompt tokens that every one of its choices found in the
    prefix cache (the fewest over its choices; choices admitted in the same step all miss
    what none of them had computed before)."""
    cached: dict[int, int] = {}
    for index, final in finals.items():
        prompt = index // n
        cached[prompt] = min(cached.get(prompt, final.num_cached_tokens),
                             final.num_cached_tokens)
    completion = sum(d.num_output_tokens for d in finals.values())
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())))


def render_chat(state: ServerState, raw_messages: list[Any],
                tools: ToolPrompt | None = None) -> RenderedPrompt:
    """Messages -> the template's prompt; a conversation the template refuses is a 400."""
    from app.messages import parse_messages

    assert state.template is not None
    try:
        return state.template.render(parse_messages(raw_messages), tools)
    except TemplateError as exc:
        raise bad_request(str(exc), "messages") from exc
