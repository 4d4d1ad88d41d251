"""POST /v1/chat/completions"""

from __future__ import annotations

from collections.abc import AsyncIterator

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
from app.json_body import JSONBodyRoute
from app.logprobs import chat_entries
from app.openapi import generation_responses
from app.params import check_limits, resolve_max_tokens, sampling_params
from app.protocol.chat import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    FunctionCallOut,
    ToolCallOut,
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
from app.state import ServerState
from app.structured import request_constraint
from app.tool_calls import (
    CallArguments,
    CallStart,
    Content,
    Event,
    ToolCallStream,
    split_tool_calls,
)
from app.tools import ToolRequest, answer_schema_text, parse_tools
from engine.client import EngineClient
from engine.outputs import FinishReason, GenerationDelta
from engine.params import Constraint

router = APIRouter(route_class=JSONBodyRoute)
MAX_TOP_LOGPROBS = 20


def check_unsupported(body: ChatCompletionRequest) -> None:
    if body.functions:
        raise refuse("functions", "the deprecated functions API (use tools)")
    if body.function_call not in (None, "none", "auto"):
        raise refuse("function_call", "the deprecated functions API (use tool_choice)")
    if body.audio is not None or (body.modalities and set(body.modalities) - {"text"}):
        raise refuse("modalities" if body.audio is None else "audio", "text output only")
    if body.prediction is not None:
        raise refuse("prediction", "predicted outputs are not available")
    if body.web_search_options is not None:
        raise refuse("web_search_options", "web search is not available")
    if body.moderation is not None:
        raise refuse("moderation", "moderation is not available; the output is not screened")


@router.post("/v1/chat/completions", response_model=None,
             responses=generation_responses(ChatCompletionResponse))
async def create_chat_completion(body: ChatCompletionRequest, request: Request):  # noqa: ANN201
    state = server_state(request)
    engine = state.require_engine()
    lora = check_model(state, body.model)
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
    tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    constraint = await chat_constraint(state, body, tools)
    rendered = render_chat(state, body.messages, tools.template_prompt())
    prompt_ids = encode_text(engine, rendered.text, "messages", rendered.add_special_tokens)
    n = 1 if body.n is None else body.n
    max_tokens = resolve_max_tokens(requested, param, len(prompt_ids), max_len, state.settings,
                                    prompt_param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    # The template's stop strings keep a free-running model from writing the next turn; a
    # grammar decides where a constrained output ends, and a stop string inside it (a JSON
    # string may well contain "### User:") would cut it.
    extra_stop = () if constraint is not None else rendered.stop
    jobs = [ChoiceJob(j, prompt_ids, sampling_params(body, max_tokens=max_tokens, seed=seed,
                                                     extra_stop=extra_stop, logprobs=logprobs,
                                                     constraint=constraint), lora)
            for j, seed in enumerate(seeds_for(body.seed, n))]
    generation = Generation(state, engine, jobs, http_request_id=http_request_id(request),
                            model=body.model)
    ctx = _Context(engine, body, len(prompt_ids), n, new_id("chatcmpl"), now(), tools)
    if body.stream:
        return sse.EventStreamResponse(_stream(ctx, generation), generation.release)
    results = await run_until_disconnect(request.is_disconnected, generation)
    return JSONResponse(response_body(_response(ctx, results)))


async def chat_constraint(state: ServerState, body: ChatCompletionRequest,
                          tools: ToolRequest) -> Constraint | None:
    """The output constraint: a forced tool call's grammar, the request's own constraint, or
    (auto tool choice with a JSON response_format) calls or an answer of that format."""
    own = request_constraint(body)
    if tools.forced:
        # response_format shapes an answer, and a forced call leaves no answer: nothing to do.
        if own is not None and own.param != "response_format":
            raise bad_request(f"'{own.param}' cannot be combined with tool_choice "
                              f"{tools.mode!r}: the tool call decides the output", own.param)
        constraint = tools.constraint()
    elif own is not None and tools.active and (answer := answer_schema_text(own)) is not None:
        constraint = tools.constraint(answer)
    else:
        constraint = own
    if constraint is not None:
        await state.constraints.check(constraint)
    return constraint


class _Context:
    def __init__(self, engine: EngineClient, body: ChatCompletionRequest, num_prompt: int,
                 n: int, request_id: str, created: int, tools: ToolRequest) -> None:
        self.engine = engine
        self.body = body
        self.num_prompt = num_prompt
        self.n = n
        self.id = request_id
        self.created = created
        self.tools = tools

    def tool_stream(self) -> ToolCallStream | None:
        if not self.tools.active:
            return None
        return ToolCallStream(self.tools.names, self.tools.forced)

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
        text = "".join(d.text for d in deltas)
        message = ChatMessageOut(content=text)
        finish = openai_finish_reason(final)
        if ctx.tools.active:
            content, calls = split_tool_calls(text, ctx.tools.names, ctx.tools.forced)
            if calls:
                message = ChatMessageOut(content=content.strip() or None, tool_calls=[
                    ToolCallOut(id=c.id, function=FunctionCallOut(
                        name=c.name, arguments=c.arguments)) for c in calls])
                finish = tool_finish_reason(final, True)
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs,
                                  finish_reason=finish))
    return ChatCompletionResponse(id=ctx.id, created=ctx.created, model=ctx.body.model,
                                  system_fingerprint=system_fingerprint(ctx.engine),
                                  choices=choices, usage=ctx.usage(finals))


def tool_finish_reason(final: GenerationDelta, called: bool) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when the output is complete and called tools;
    "length" when it was cut, whatever it holds."""
    if called and final.finish_reason == FinishReason.STOP:
        return "tool_calls"
    return openai_finish_reason(final)


def response_body(response: ChatCompletionResponse) -> dict:
    """The JSON body: a message without tool calls has no tool_calls key (the schema's
    tool_calls is an array, never null)."""
    out = response.model_dump()
    for choice in out["choices"]:
        if choice["message"]["tool_calls"] is None:
            del choice["message"]["tool_calls"]
    return out


async def _stream(ctx: _Context, generation: Generation) -> AsyncIterator[str]:
    include_usage = bool(ctx.body.stream_options and ctx.body.stream_options.include_usage)
    finals: dict[int, GenerationDelta] = {}
    keepalive = generation.state.settings.keepalive_interval
    parsers = {job.index: ctx.tool_stream() for job in generation.jobs}
    # OpenAI sends the role first, with empty content (null when a tool call is forced).
    first = {"role": "assistant", "content": None if ctx.tools.forced else ""}
    for job in generation.jobs:
        yield sse.event(ctx.chunk([{"index": job.index, "delta": first, "logprobs": None,
                                    "finish_reason": None}], with_usage_key=include_usage))
    try:
        async for item in generation.stream(keepalive):
            if item is None:
                yield sse.KEEPALIVE_COMMENT
                continue
            index, delta = item
            parser = parsers[index]
            deltas = (_tool_deltas(parser, delta) if parser is not None
                      else [{"content": delta.text}] if delta.text or delta.logprobs else [])
            logprobs = ctx.logprobs(delta) if delta.logprobs else None
            if logprobs is not None and not deltas:
                deltas = [{}]
            for k, d in enumerate(deltas):
                yield sse.event(ctx.chunk([{"index": index, "delta": d,
                                            "logprobs": logprobs if k == 0 else None,
                                            "finish_reason": None}],
                                          with_usage_key=include_usage))
            if delta.finished:
                finals[index] = delta
                called = parser is not None and bool(parser.calls)
                yield sse.event(ctx.chunk([{"index": index, "delta": {}, "logprobs": None,
                                            "finish_reason": tool_finish_reason(delta, called)}],
                                          with_usage_key=include_usage))
        if include_usage:
            yield sse.event(ctx.chunk([], usage=ctx.usage(finals)))
    except OpenAIError as err:
        yield sse.error_event(err)
    yield sse.DONE


def _tool_deltas(parser: ToolCallStream, delta: GenerationDelta) -> list[dict]:
    """Stream deltas of one engine delta's text, shaped as OpenAI's: a call's first delta has
    its index, id, type, name and empty arguments; later ones carry argument fragments."""
    events: list[Event] = parser.feed(delta.text)
    if delta.finished:
        events += parser.finish()
    out: list[dict] = []
    for e in events:
        if isinstance(e, Content):
            out.append({"content": e.text})
        elif isinstance(e, CallStart):
            out.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                        "function": {"name": e.name, "arguments": ""}}]})
        elif isinstance(e, CallArguments):
            out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return out
