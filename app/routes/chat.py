"""POST /v1/chat/completions"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app import sse
from app.errors import OpenAIError, bad_request
from app.generation import (
    ChoiceJob,
    Generation,
    openai_finish_reason,
    run_until_disconnect,
    seeds_for,
)
from app.logprobs import chat_entries
from app.params import check_limits, resolve_max_tokens, sampling_params
from app.protocol.chat import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
)
from app.protocol.common import Usage, new_id, now
from app.routes.common import (
    check_model,
    encode_text,
    http_request_id,
    refuse,
    render_chat,
    server_state,
    system_fingerprint,
    usage,
)
from app.templates import ChatMessage
from engine.client import EngineClient
from engine.outputs import GenerationDelta

router = APIRouter()
MAX_TOP_LOGPROBS = 20
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(raw: list[Any]) -> list[ChatMessage]:
    if not raw:
        raise bad_request("'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if role in ("tool", "function"):
            raise refuse(f"{where}.role", f"'{role}' messages need tool calling")
        if role not in _ROLES:
            raise bad_request(f"{where}.role must be one of system, developer, user, "
                              f"assistant; got {role!r}", f"{where}.role")
        if m.get("tool_calls"):
            raise refuse(f"{where}.tool_calls", "tool calling is not available")
        extra = set(m) - {"role", "content", "name", "refusal", "tool_calls", "function_call"}
        if extra:
            raise bad_request(f"unrecognized field(s) in {where}: {', '.join(sorted(extra))}",
                              where)
        out.append(ChatMessage(_ROLES[role], _content_text(m.get("content"), role,
                                                            f"{where}.content")))
    return out


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


def check_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise refuse("tools", "tool calling is not available")
    if body.tool_choice not in (None, "none", "auto"):
        raise refuse("tool_choice", "tool calling is not available")
    if body.functions:
        raise refuse("functions", "function calling is not available")
    if body.function_call not in (None, "none", "auto"):
        raise refuse("function_call", "function calling is not available")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise refuse("response_format", "only {\"type\": \"text\"} is available")
    if body.audio is not None or (body.modalities and set(body.modalities) - {"text"}):
        raise refuse("modalities" if body.audio is None else "audio", "text output only")
    if body.prediction is not None:
        raise refuse("prediction", "predicted outputs are not available")
    if body.web_search_options is not None:
        raise refuse("web_search_options", "web search is not available")
    if body.moderation is not None:
        raise refuse("moderation", "moderation is not available; the output is not screened")


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):  # noqa: ANN201
    state = server_state(request)
    engine = state.require_engine()
    check_model(state, body.model)
    check_unsupported(body)
    if body.top_logprobs is not None:
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}",
                              "top_logprobs")
        if not body.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    requested, param = ((body.max_completion_tokens, "max_completion_tokens")
                        if body.max_completion_tokens is not None
                        else (body.max_tokens, "max_tokens"))
    max_len = engine.model_info.max_model_len
    check_limits(body, state.settings, engine.tokenizer.vocab_size, max_len, requested, param)
    rendered = render_chat(state, body.messages)
    prompt_ids = encode_text(engine, rendered.text, "messages", rendered.add_special_tokens)
    n = 1 if body.n is None else body.n
    max_tokens = resolve_max_tokens(requested, param, len(prompt_ids), max_len, state.settings,
                                    prompt_param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs = [ChoiceJob(j, prompt_ids, sampling_params(body, max_tokens=max_tokens, seed=seed,
                                                     extra_stop=rendered.stop,
                                                     logprobs=logprobs))
            for j, seed in enumerate(seeds_for(body.seed, n))]
    generation = Generation(state, engine, jobs, http_request_id=http_request_id(request))
    ctx = _Context(engine, body, len(prompt_ids), n, new_id("chatcmpl"), now())
    if body.stream:
        return sse.EventStreamResponse(_stream(ctx, generation), generation.release)
    results = await run_until_disconnect(request.is_disconnected, generation)
    return JSONResponse(_response(ctx, results).model_dump())


class _Context:
    def __init__(self, engine: EngineClient, body: ChatCompletionRequest, num_prompt: int,
                 n: int, request_id: str, created: int) -> None:
        self.engine = engine
        self.body = body
        self.num_prompt = num_prompt
        self.n = n
        self.id = request_id
        self.created = created

    def logprobs(self, delta: GenerationDelta) -> dict | None:
        if not self.body.logprobs:
            return None
        content = chat_entries(self.engine.tokenizer, delta.logprobs or ())
        return ChoiceLogprobs(content=content, refusal=None).model_dump()

    def usage(self, finals: dict[int, GenerationDelta]) -> Usage:
        return usage(self.num_prompt, finals, self.n)

    def chunk(self, choices: list[dict], usage: Usage | None = None,
              with_usage_key: bool = False) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.body.model, "system_fingerprint": system_fingerprint(self.engine),
               "choices": choices}
        if usage is not None or with_usage_key:
            out["usage"] = None if usage is None else usage.model_dump()
        return out


def _response(ctx: _Context, results: dict[int, list[GenerationDelta]]
              ) -> ChatCompletionResponse:
    choices = []
    finals: dict[int, GenerationDelta] = {}
    for index in sorted(results):
        deltas = results[index]
        final = deltas[-1]
        finals[index] = final
        logprobs = None
        if ctx.body.logprobs:
            entries = [e for d in deltas for e in (d.logprobs or ())]
            logprobs = ChoiceLogprobs(content=chat_entries(ctx.engine.tokenizer, entries),
                                      refusal=None)
        choices.append(ChatChoice(index=index, message=ChatMessageOut(
            content="".join(d.text for d in deltas)), logprobs=logprobs,
            finish_reason=openai_finish_reason(final)))
    return ChatCompletionResponse(id=ctx.id, created=ctx.created, model=ctx.body.model,
                                  system_fingerprint=system_fingerprint(ctx.engine),
                                  choices=choices, usage=ctx.usage(finals))


async def _stream(ctx: _Context, generation: Generation) -> AsyncIterator[str]:
    include_usage = bool(ctx.body.stream_options and ctx.body.stream_options.include_usage)
    finals: dict[int, GenerationDelta] = {}
    keepalive = generation.state.settings.keepalive_interval
    # OpenAI sends the role first, with empty content, for every choice.
    for job in generation.jobs:
        yield sse.event(ctx.chunk([{"index": job.index, "delta": {"role": "assistant",
                                                                   "content": ""},
                                    "logprobs": None, "finish_reason": None}],
                                  with_usage_key=include_usage))
    try:
        async for item in generation.stream(keepalive):
            if item is None:
                yield sse.KEEPALIVE_COMMENT
                continue
            index, delta = item
            if delta.text or delta.logprobs:
                yield sse.event(ctx.chunk([{"index": index, "delta": {"content": delta.text},
                                            "logprobs": ctx.logprobs(delta),
                                            "finish_reason": None}],
                                          with_usage_key=include_usage))
            if delta.finished:
                finals[index] = delta
                yield sse.event(ctx.chunk([{"index": index, "delta": {}, "logprobs": None,
                                            "finish_reason": openai_finish_reason(delta)}],
                                          with_usage_key=include_usage))
        if include_usage:
            yield sse.event(ctx.chunk([], usage=ctx.usage(finals)))
    except OpenAIError as err:
        yield sse.error_event(err)
    yield sse.DONE
