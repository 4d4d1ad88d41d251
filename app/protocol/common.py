"""Pieces shared by the completions and chat protocols."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.params import SEED_MAX, SEED_MIN


class RequestModel(BaseModel):
    """Strict like OpenAI: "temperature": "0.5" is a type error, NaN and Infinity are refused,
    and an unknown field is an error rather than silently ignored."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class SamplingFields(RequestModel):
    """Fields both endpoints share, including the vLLM-style extensions."""

    model: str
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = 1
    # int64, as OpenAI's schema says.
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    user: str | None = None
    # Extensions, spelled as vLLM spells them.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    # Structured outputs (checked by hand in app.structured, for errors that name the field):
    # OpenAI's response_format (an extension on /v1/completions), vLLM's structured_outputs
    # and its older guided_* fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class PromptTokensDetails(BaseModel):
    # Prompt tokens whose K/V the prefix cache already held (OpenAI's field).
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "gptq-serve"
    # vLLM's extensions: where the weights came from, and for a LoRA adapter its base model.
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)
