"""POST /v1/completions"""

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
from app.logprobs import CompletionLogprobBuilder, concat, echo_logprobs
from app.openapi import generation_responses
from app.params import check_limits, resolve_max_tokens, sampling_params
from app.protocol.common import Usage, drop_none, new_id, now
from app.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from app.routes.common import (
    check_model,
    check_token_ids,
    encode_text,
    http_request_id,
    refuse,
    server_state,
    system_fingerprint,
    usage,
)
from app.structured import request_constraint
from engine.client import EngineClient
from engine.outputs import GenerationDelta

router = APIRouter(route_class=JSONBodyRoute)
MAX_LEGACY_LOGPROBS = 5


class PromptInput:
    """One prompt of the request: its token ids and the text that echo repeats."""

    def __init__(self, token_ids: list[int], text: str) -> None:
        self.token_ids = token_ids
        self.text = text


def parse_prompts(engine: EngineClient, prompt: object, max_prompts: int) -> list[PromptInput]:
    tok = engine.tokenizer
    if isinstance(prompt, str):
        items: list[object] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    elif isinstance(prompt, list):
        items = list(prompt)
    else:
        raise bad_request("'prompt' must be a string, a list of strings, a list of token ids "
                          "or a list of lists of token ids", "prompt")
    if not items:
        raise bad_request("'prompt' must not be empty", "prompt")
    if len(items) > max_prompts:
        raise bad_request(f"at most {max_prompts} prompts per request", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("'prompt' must not be an empty string", "prompt")
            out.append(PromptInput(encode_text(engine, item, "prompt"), item))
        else:
            ids = list(item)  # type: ignore[call-overload]
            if not ids:
                raise bad_request("a token-id prompt must not be empty", "prompt")
            check_token_ids(engine, ids, "prompt")
            out.append(PromptInput(ids, tok.decode(ids)))
    return out


@router.post("/v1/completions", response_model=None,
             responses=generation_responses(CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request):  # noqa: ANN201
    state = server_state(request)
    engine = state.require_engine()
    lora = check_model(state, body.model)
    if body.suffix:
        raise refuse("suffix", "insertion (fill-in-the-middle) needs a model trained for it")
    n = 1 if body.n is None else body.n
    if body.best_of is not None and body.best_of != n:
        raise refuse("best_of", "best_of must equal n when given")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LEGACY_LOGPROBS:
        raise bad_request(f"'logprobs' must be between 0 and {MAX_LEGACY_LOGPROBS}", "logprobs")
    max_len = engine.model_info.max_model_len
    check_limits(body, state.settings, engine.tokenizer.vocab_size, max_len, body.max_tokens,
                 "max_tokens")
    constraint = request_constraint(body)
    if constraint is not None:
        await state.constraints.check(constraint)
    prompts = parse_prompts(engine, body.prompt, state.settings.max_prompts)
    jobs: list[ChoiceJob] = []
    for i, prompt in enumerate(prompts):
        max_tokens = resolve_max_tokens(body.max_tokens, "max_tokens", len(prompt.token_ids),
                                        max_len, state.settings)
        for j, seed in enumerate(seeds_for(body.seed, n)):
            params = sampling_params(
                body, max_tokens=max_tokens, seed=seed, logprobs=body.logprobs,
                prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None
                else None, constraint=constraint)
            jobs.append(ChoiceJob(i * n + j, prompt.token_ids, params, lora))
    generation = Generation(state, engine, jobs, http_request_id=http_request_id(request),
                            model=body.model)
    ctx = _Context(engine, body, prompts, n, new_id("cmpl"), now())
    if body.stream:
        return sse.EventStreamResponse(_stream(ctx, generation), generation.release)
    results = await run_until_disconnect(request.is_disconnected, generation)
    return JSONResponse(_response(ctx, results).model_dump(exclude_none=False))


class _Context:
    def __init__(self, engine: EngineClient, body: CompletionRequest,
                 prompts: list[PromptInput], n: int, request_id: str, created: int) -> None:
        self.engine = engine
        self.body = body
        self.prompts = prompts
        self.n = n
        self.id = request_id
        self.created = created

    def prompt_of(self, index: int) -> PromptInput:
        return self.prompts[index // self.n]

    def logprob_builder(self, index: int) -> CompletionLogprobBuilder | None:
        if self.body.logprobs is None:
            return None
        return CompletionLogprobBuilder(self.engine.tokenizer, len(self.prompt_of(index).text),
                                        self.body.skip_special_tokens is not False)

    def echo_part(self, index: int, first: GenerationDelta
                  ) -> tuple[str, CompletionLogprobs | None]:
        """The echoed prompt text and, with logprobs, its logprobs (from the first delta)."""
        if not self.body.echo:
            return "", None
        prompt = self.prompt_of(index)
        if self.body.logprobs is None:
            return prompt.text, None
        return prompt.text, echo_logprobs(self.engine.tokenizer, prompt.token_ids,
                                          first.prompt_logprobs, prompt.text)


def _usage(ctx: _Context, finals: dict[int, GenerationDelta]) -> Usage:
    return usage(sum(len(p.token_ids) for p in ctx.prompts), finals, ctx.n)


def _response(ctx: _Context, results: dict[int, list[GenerationDelta]]) -> CompletionResponse:
    choices = []
    finals: dict[int, GenerationDelta] = {}
    for index in sorted(results):
        deltas = results[index]
        final = deltas[-1]
        finals[index] = final
        builder = ctx.logprob_builder(index)
        echo_text, echo_lp = ctx.echo_part(index, deltas[0])
        text = echo_text + "".join(d.text for d in deltas)
        logprobs = None
        if builder is not None:
            logprobs = concat([echo_lp, builder.build(
                [e for d in deltas for e in (d.logprobs or ())])])
        choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                        finish_reason=openai_finish_reason(final)))
    return CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.body.model,
                              system_fingerprint=system_fingerprint(ctx.engine),
                              choices=choices, usage=_usage(ctx, finals))


async def _stream(ctx: _Context, generation: Generation) -> AsyncIterator[str]:
    include_usage = bool(ctx.body.stream_options and ctx.body.stream_options.include_usage)
    builders = {job.index: ctx.logprob_builder(job.index) for job in generation.jobs}
    started: set[int] = set()
    finals: dict[int, GenerationDelta] = {}
    keepalive = generation.state.settings.keepalive_interval
    try:
        async for item in generation.stream(keepalive):
            if item is None:
                yield sse.KEEPALIVE_COMMENT
                continue
            index, delta = item
            builder = builders[index]
            text, echo_lp = delta.text, None
            if index not in started:
                started.add(index)
                echo_text, echo_lp = ctx.echo_part(index, delta)
                text = echo_text + text
            logprobs = None if builder is None else concat(
                [echo_lp, builder.build(delta.logprobs or ())])
            if not text and not delta.finished and not (logprobs and logprobs.tokens):
                continue
            choice = {"index": index, "text": text,
                      "logprobs": None if logprobs is None else logprobs.model_dump(),
                      "finish_reason": openai_finish_reason(delta)}
            yield sse.event(_chunk(ctx, [choice]))
            if delta.finished:
                finals[index] = delta
        if include_usage:
            yield sse.event(_chunk(ctx, [], usage=_usage(ctx, finals).model_dump()))
    except OpenAIError as err:
        yield sse.error_event(err)
    yield sse.DONE


def _chunk(ctx: _Context, choices: list[dict], usage: dict | None = None) -> dict:
    return drop_none({"id": ctx.id, "object": "text_completion", "created": ctx.created,
                      "model": ctx.body.model, "system_fingerprint":
                      system_fingerprint(ctx.engine), "choices": choices, "usage": usage})
