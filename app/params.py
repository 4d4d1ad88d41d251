"""OpenAI request fields -> engine SamplingParams, with every limit checked up front."""

from __future__ import annotations

from app.errors import OpenAIError, bad_request
from app.protocol.common import SamplingFields
from app.settings import Settings
from engine.params import Constraint, SamplingParams, SamplingParamsError

MAX_STOP = 4


def normalise_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' takes at most {MAX_STOP} sequences", "stop")
    if any(s == "" for s in stops):
        raise bad_request("stop sequences must not be empty", "stop")
    return tuple(stops)


def check_limits(req: SamplingFields, settings: Settings, vocab_size: int,
                 max_model_len: int, max_tokens: int | None, max_tokens_param: str) -> None:
    """Cheap checks before any tokenising work. ``max_tokens`` is what the request asked for
    under the name ``max_tokens_param``; the check that needs the prompt's length is
    resolve_max_tokens'."""
    if max_tokens is not None:
        _check_max_tokens(max_tokens, max_tokens_param, max_model_len, settings)
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true",
                          "stream_options")
    n = 1 if req.n is None else req.n
    if n < 1 or n > settings.max_n:
        raise bad_request(f"'n' must be between 1 and {settings.max_n}", "n")
    if req.logit_bias is not None:
        if len(req.logit_bias) > settings.max_logit_bias:
            raise bad_request(f"'logit_bias' takes at most {settings.max_logit_bias} entries",
                              "logit_bias")
        for key in req.logit_bias:
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
                raise bad_request(f"logit_bias key {key!r} is not a token id in [0, "
                                  f"{vocab_size})", "logit_bias")
    for token in req.stop_token_ids or ():
        if not 0 <= token < vocab_size:
            raise bad_request(f"stop_token_ids entry {token} is outside the vocabulary",
                              "stop_token_ids")
    normalise_stop(req.stop)


def _check_max_tokens(requested: int, param: str, max_model_len: int,
                      settings: Settings) -> None:
    if requested < 1:
        raise bad_request(f"'{param}' must be at least 1", param)
    # A prompt has at least one token, so this much can never fit, whatever the prompt.
    if requested >= max_model_len:
        raise OpenAIError(400, f"this model's maximum context length is {max_model_len} tokens; "
                          f"'{param}' asks for {requested} to generate, which leaves no room "
                          f"for the prompt. Lower {param}.", param=param,
                          code="context_length_exceeded")
    if requested > settings.max_tokens_limit:
        raise bad_request(f"'{param}' must be at most {settings.max_tokens_limit}", param)


def resolve_max_tokens(requested: int | None, param: str, prompt_len: int, max_model_len: int,
                       settings: Settings, prompt_param: str = "prompt") -> int:
    """The request's max_tokens, or by default the rest of the context within the limits."""
    room = max_model_len - prompt_len
    if requested is None:
        default = settings.default_max_tokens or settings.max_tokens_limit
        if room < 1:
            raise OpenAIError(400, f"this model's maximum context length is {max_model_len} "
                              f"tokens; the prompt has {prompt_len}", param=prompt_param,
                              code="context_length_exceeded")
        return min(default, room)
    if requested < 1:
        raise bad_request(f"'{param}' must be at least 1", param)
    if prompt_len + requested > max_model_len:
        raise OpenAIError(400, f"this model's maximum context length is {max_model_len} tokens; "
                          f"the request asks for {prompt_len + requested} ({prompt_len} in the "
                          f"prompt and {requested} to generate). Shorten the prompt or lower "
                          f"{param}.", param=param, code="context_length_exceeded")
    if requested > settings.max_tokens_limit:
        raise bad_request(f"'{param}' must be at most {settings.max_tokens_limit}", param)
    return requested


def sampling_params(req: SamplingFields, *, max_tokens: int, seed: int | None,
                    extra_stop: tuple[str, ...] = (), logprobs: int | None = None,
                    prompt_logprobs: int | None = None,
                    constraint: Constraint | None = None) -> SamplingParams:
    stops = normalise_stop(req.stop) + tuple(s for s in extra_stop
                                             if s not in normalise_stop(req.stop))
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=None if req.top_k in (None, 0, -1) else req.top_k,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            seed=seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=bool(req.ignore_eos),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            stop=stops,
            skip_special_tokens=True if req.skip_special_tokens is None
            else req.skip_special_tokens,
            constraint=constraint,
        )
    except SamplingParamsError as exc:
        raise bad_request(str(exc), exc.param) from exc
