"""Structured outputs through the real server on the tiny CPU model: the official SDK's
``parse()`` in strict mode, response_format / structured_outputs / guided_* on both endpoints
with n > 1, streaming, seeds, echo and logprobs, and the 400s for bad constraints. Every body
and stream chunk is checked against the official schemas; every complete output must parse and
validate whatever the random weights sample."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.fake_engine import ServerProcess, sse_data
from tests.schemas.validate import validate

MODEL = "tiny"
USER = [{"role": "user", "content": "Describe the weather as JSON."}]
C, CHAT = "/v1/completions", "/v1/chat/completions"


class Reading(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: Annotated[str, Field(max_length=8)]
    unit: Literal["c", "f"]
    temperature: Annotated[int, Field(ge=-40, le=50)]
    tags: Annotated[list[Literal["sun", "rain", "wind"]], Field(max_length=3)]


READING = Reading.model_json_schema()


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def ok(server: ServerProcess, path: str, **body: Any) -> dict[str, Any]:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    out = r.json()
    validate("CreateCompletionResponse" if path == C else "CreateChatCompletionResponse", out)
    return out


def stream_chunks(server: ServerProcess, path: str, **body: Any) -> list[dict[str, Any]]:
    r = post(server, path, {"stream": True, **body})
    assert r.status_code == 200, r.text
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:
        validate("CreateCompletionStreamChunk" if path == C
                 else "CreateChatCompletionStreamResponse", chunk)
    return chunks


@pytest.fixture(scope="module")
def client(structured_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=structured_server.url + "/v1", api_key="x", max_retries=0,
                         _strict_response_validation=True)


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    done = client.chat.completions.parse(model=MODEL, messages=USER, response_format=Reading,
                                         max_tokens=300, n=3, seed=5, temperature=1.0)
    assert len(done.choices) == 3
    for choice in done.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Reading)
        jsonschema.validate(json.loads(choice.message.content or ""), READING)


@pytest.mark.parametrize("field,value", [
    ("response_format", {"type": "json_schema",
                         "json_schema": {"name": "reading", "schema": READING, "strict": True}}),
    ("structured_outputs", {"json": READING}),
    ("guided_json", json.dumps(READING)),
])
def test_json_schema_spellings_on_both_endpoints(structured_server: ServerProcess, field: str,
                                                 value: Any) -> None:
    chat = ok(structured_server, CHAT, messages=USER, max_tokens=300, n=2, seed=1,
              **{field: value})
    texts = [c["message"]["content"] for c in chat["choices"]]
    done = ok(structured_server, C, prompt="JSON:", max_tokens=300, n=2, seed=1,
              **{field: value})
    texts += [c["text"] for c in done["choices"]]
    for choice in chat["choices"] + done["choices"]:
        assert choice["finish_reason"] == "stop"
    for text in texts:
        jsonschema.validate(json.loads(text), READING)


def test_json_object_stream_matches_the_whole_response(structured_server: ServerProcess) -> None:
    body = {"messages": USER, "max_tokens": 40, "seed": 3, "temperature": 1.0,
            "response_format": {"type": "json_object"}}
    whole = ok(structured_server, CHAT, **body)["choices"][0]
    chunks = stream_chunks(structured_server, CHAT, **body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"])
    assert text == whole["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    if whole["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert whole["finish_reason"] == "length"


def test_regex_choice_and_grammar_with_echo_and_logprobs(
        structured_server: ServerProcess) -> None:
    regex = r"[0-9]{3}-[a-z]{2}"
    done = ok(structured_server, C, prompt="Code:", max_tokens=20, n=3, guided_regex=regex,
              echo=True, logprobs=2)
    for choice in done["choices"]:
        assert choice["text"].startswith("Code:")
        assert re.fullmatch(regex, choice["text"][len("Code:"):]), choice["text"]
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == choice["text"]
        assert all(isinstance(v, float) for v in lp["token_logprobs"])
    choices = ["red", "green", "light blue"]
    chat = ok(structured_server, CHAT, messages=USER, max_tokens=20, n=2, logprobs=True,
              top_logprobs=3, structured_outputs={"choice": choices})
    for choice in chat["choices"]:
        assert choice["message"]["content"] in choices and choice["finish_reason"] == "stop"
        for entry in choice["logprobs"]["content"]:
            assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) <= 3
    lark = 'start: "[" num ("," num)* "]"\nnum: /[1-9]/\n'
    grammar = ok(structured_server, C, prompt="List:", max_tokens=30, seed=2,
                 structured_outputs={"grammar": lark})["choices"][0]
    if grammar["finish_reason"] == "stop":
        assert re.fullmatch(r"\[[1-9](,[1-9])*\]", grammar["text"])
    chunks = stream_chunks(structured_server, C, prompt="Code:", max_tokens=20, seed=9,
                           guided_regex=regex)
    assert re.fullmatch(regex, "".join(c["choices"][0]["text"] for c in chunks))


def test_length_cut_is_reported_as_length(structured_server: ServerProcess) -> None:
    schema = {"type": "object", "required": ["story"], "additionalProperties": False,
              "properties": {"story": {"type": "string", "minLength": 50}}}
    for path, body in ((CHAT, {"messages": USER}), (C, {"prompt": "JSON:"})):
        out = ok(structured_server, path, max_tokens=10, guided_json=schema, **body)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 10


def test_template_stop_strings_do_not_cut_a_constrained_output(
        structured_server: ServerProcess) -> None:
    out = ok(structured_server, CHAT, messages=USER, max_tokens=40,
             structured_outputs={"regex": r"### User: [a-z]{3}"})
    assert out["choices"][0]["message"]["content"].startswith("### User: ")
    assert out["choices"][0]["finish_reason"] == "stop"


@dataclass(frozen=True)
class Bad:
    name: str
    path: str
    body: dict[str, Any]
    param: str
    code: str | None = None


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BAD = [
    Bad("schema without a name", CHAT, {"response_format": {"type": "json_schema",
        "json_schema": {"schema": READING}}}, "response_format.json_schema.name"),
    Bad("not a JSON Schema", CHAT, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format"),
    Bad("unsupported keyword", CHAT, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),
    Bad("unsupported keyword on completions", C, {"structured_outputs": {
        "json": {"not": {"type": "string"}}}}, "structured_outputs"),
    Bad("guided_json not JSON", C, {"guided_json": "{nope"}, "guided_json"),
    Bad("two structured_outputs keys", C, {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        "structured_outputs"),
    Bad("unknown structured_outputs key", CHAT, {"structured_outputs": {"yaml": "x"}},
        "structured_outputs.yaml"),
    Bad("regex that does not compile", C, {"guided_regex": "([a-z]+"}, "guided_regex"),
    Bad("regex with look-ahead", CHAT, {"guided_regex": "(?=a)a"}, "guided_regex"),
    Bad("empty choice list", C, {"guided_choice": []}, "guided_choice"),
    Bad("grammar with an unknown rule", C, {"guided_grammar": "start: nope"}, "guided_grammar"),
    Bad("two constraints", CHAT, {"response_format": {"type": "json_object"},
                                  "guided_regex": "a+"}, "guided_regex"),
    Bad("grammar too big", C, {"guided_regex": "a" * 9000}, "guided_regex",
        "grammar_too_large"),
    Bad("duplicate tool names", CHAT, {"tools": [TOOL, TOOL]}, "tools[1].function.name"),
    Bad("tool name with spaces", CHAT, {"tools": [{"type": "function", "function": {
        "name": "get weather"}}]}, "tools[0].function.name"),
    Bad("tool parameters not an object schema", CHAT, {"tools": [{"type": "function",
        "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    Bad("tool parameters not a JSON Schema", CHAT, {"tools": [{"type": "function",
        "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools"),
    Bad("forced tool with an unsupported keyword", CHAT, {"tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}]}, "tools"),
    Bad("named tool not in tools", CHAT, {"tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    Bad("tool_choice of the wrong shape", CHAT, {"tools": [TOOL], "tool_choice": "always"},
        "tool_choice"),
    Bad("a forced call with a regex", CHAT, {"tools": [TOOL], "tool_choice": "required",
                                             "guided_regex": "a"}, "guided_regex"),
    Bad("custom tools", CHAT, {"tools": [{"type": "custom", "custom": {"name": "x"}}]},
        "tools[0]"),
    Bad("tool_calls on a user message", CHAT, {"messages": [
        {"role": "user", "content": "x", "tool_calls": [{"id": "1", "type": "function",
         "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    Bad("malformed assistant tool call", CHAT, {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f"}}]}]},
        "messages[1].tool_calls[0]"),
    Bad("tool result for an unknown call", CHAT, {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "1"}]}, "messages[2].tool_call_id"),
]


def test_the_bad_input_table_is_broad() -> None:
    assert len({b.name for b in BAD}) == len(BAD) >= 20


@pytest.mark.parametrize("case", BAD, ids=[b.name for b in BAD])
def test_bad_constraints_get_a_400_naming_the_param(structured_server: ServerProcess,
                                                    case: Bad) -> None:
    body = {"max_tokens": 5, **({"messages": USER} if case.path == CHAT else {"prompt": "x"}),
            **case.body}
    r = post(structured_server, case.path, body)
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (case.param, case.code), error
