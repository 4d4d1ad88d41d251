"""Tool calling through the real server on the tiny CPU model: every tool_choice mode, the
official SDK (strict validation, ``parse()`` with strict tools, its streaming helper that
reassembles tool-call deltas), the history's calls and results, and langchain-openai's
``bind_tools`` and ``with_structured_output``."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from tests.fake_engine import ServerProcess
from tests.test_api_structured import MODEL, USER, ok, stream_chunks

CHAT = "/v1/chat/completions"


class GetWeather(BaseModel):
    """Current weather in a city."""

    model_config = ConfigDict(extra="forbid")
    city: Annotated[str, Field(max_length=8)]
    unit: Literal["c", "f"]


class Add(BaseModel):
    """Add two small numbers."""

    model_config = ConfigDict(extra="forbid")
    a: Annotated[int, Field(ge=0, le=99)]
    b: Annotated[int, Field(ge=0, le=99)]


TOOLS = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(Add)]
SCHEMAS = {"GetWeather": GetWeather.model_json_schema(), "Add": Add.model_json_schema()}


@pytest.fixture(scope="module")
def client(structured_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=structured_server.url + "/v1", api_key="x", max_retries=0,
                         _strict_response_validation=True)


def assert_calls_valid(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice,parallel", [
    ("required", False), ("required", True),
    ({"type": "function", "function": {"name": "Add"}}, True)])
def test_forced_calls_stream_and_match_the_whole_response(
        client: openai.OpenAI, choice: Any, parallel: bool) -> None:
    body: dict[str, Any] = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice,
                                parallel_tool_calls=parallel, max_tokens=400, seed=7,
                                temperature=1.0)
    done = client.chat.completions.parse(**body)
    choice0 = done.choices[0]
    names = {"Add"} if isinstance(choice, dict) else set(SCHEMAS)
    if choice0.finish_reason == "length":  # many parallel calls ran out of tokens
        assert parallel
    else:
        assert choice0.finish_reason == "tool_calls"
        assert choice0.message.content is None
        calls = choice0.message.tool_calls or []
        assert_calls_valid(calls, names)
        assert len(calls) == 1 or (parallel and choice == "required")
        for call in calls:
            assert isinstance(call.function.parsed_arguments, GetWeather | Add)
    with client.chat.completions.stream(**body) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == choice0.finish_reason
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []] \
        == [(c.function.name, c.function.arguments) for c in choice0.message.tool_calls or []]


def test_stream_chunks_are_shaped_as_openai_sends_them(structured_server: ServerProcess) -> None:
    chunks = stream_chunks(structured_server, CHAT, messages=USER, tools=TOOLS, max_tokens=400,
                           tool_choice="required", parallel_tool_calls=False, seed=2,
                           stream_options={"include_usage": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:] if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    first, *rest = calls
    assert set(first) == {"index", "id", "type", "function"} and first["type"] == "function"
    assert first["function"]["arguments"] == "" and first["function"]["name"] in SCHEMAS
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
               for c in rest)
    arguments = "".join(c["function"]["arguments"] for c in rest)
    jsonschema.validate(json.loads(arguments), SCHEMAS[first["function"]["name"]])
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_auto_parses_calls_from_free_output(structured_server: ServerProcess) -> None:
    plain = ok(structured_server, CHAT, messages=USER, tools=TOOLS, max_tokens=12)
    message = plain["choices"][0]["message"]
    assert "tool_calls" not in message and isinstance(message["content"], str)
    # A regex makes the model write a call line after some text: auto finds and parses it.
    line = (r'Let me check\. <tool_call>\{"name": "GetWeather", "arguments": '
            r'\{"city": "[a-z]{1,6}", "unit": "c"\}\}</tool_call>')
    for n, body in enumerate(({}, {"stream": True})):
        if body:
            chunks = stream_chunks(structured_server, CHAT, messages=USER, tools=TOOLS,
                                   max_tokens=200, guided_regex=line, seed=n)
            deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
            content = "".join(d.get("content") or "" for d in deltas)
            calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
            assert calls[0]["function"]["name"] == "GetWeather"
            arguments = "".join(c["function"].get("arguments", "") for c in calls)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            out = ok(structured_server, CHAT, messages=USER, tools=TOOLS, max_tokens=200,
                     guided_regex=line, seed=n)["choices"][0]
            content, finish = out["message"]["content"], out["finish_reason"]
            (call,) = out["message"]["tool_calls"]
            arguments = call["function"]["arguments"]
        assert content.strip() == "Let me check." and finish == "tool_calls"
        jsonschema.validate(json.loads(arguments), SCHEMAS["GetWeather"])


def test_auto_with_a_response_format_answers_or_calls(structured_server: ServerProcess) -> None:
    answer = {"type": "object", "required": ["reply"], "additionalProperties": False,
              "properties": {"reply": {"enum": ["yes", "no"]}}}
    out = ok(structured_server, CHAT, messages=USER, tools=TOOLS, max_tokens=300, n=4, seed=3,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "a", "schema": answer}})
    for choice in out["choices"]:
        message = choice["message"]
        if "tool_calls" in message:
            assert choice["finish_reason"] in ("tool_calls", "length")
        else:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(message["content"]), answer)


def test_tool_choice_none_leaves_the_prompt_alone(structured_server: ServerProcess) -> None:
    bare = ok(structured_server, CHAT, messages=USER, max_tokens=1)
    none = ok(structured_server, CHAT, messages=USER, tools=TOOLS, tool_choice="none",
              max_tokens=1)
    auto = ok(structured_server, CHAT, messages=USER, tools=TOOLS, max_tokens=1)
    assert none["usage"]["prompt_tokens"] == bare["usage"]["prompt_tokens"]
    assert auto["usage"]["prompt_tokens"] > bare["usage"]["prompt_tokens"]


def test_history_calls_and_results_are_rendered(structured_server: ServerProcess) -> None:
    messages = [*USER,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {
                        "name": "GetWeather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 and sunny"},
                {"role": "user", "content": "Thanks!"}]
    ok(structured_server, CHAT, messages=messages, tools=TOOLS, max_tokens=3)
    tokens = httpx.post(structured_server.url + "/tokenize",
                        json={"messages": messages}).json()["tokens"]
    text = httpx.post(structured_server.url + "/detokenize",
                      json={"tokens": tokens}).json()["prompt"]
    assert ('### Response:\n<tool_call>{"name": "GetWeather", "arguments": {"city": "Paris", '
            '"unit": "c"}}</tool_call>\n\n### User:\n<tool_result name="GetWeather">\n'
            '22 and sunny\n</tool_result>\n\n### User:\nThanks!') in text


@pytest.fixture(scope="module")
def llm(structured_server: ServerProcess) -> ChatOpenAI:
    return ChatOpenAI(base_url=structured_server.url + "/v1", api_key="x", model=MODEL,
                      max_tokens=300, temperature=0, max_retries=0)


def test_langchain_bind_tools(llm: ChatOpenAI) -> None:
    forced = llm.bind_tools([GetWeather, Add], tool_choice="required",
                            parallel_tool_calls=False)
    message = forced.invoke("What is the weather in Oslo?")
    (call,) = message.tool_calls
    assert call["name"] in SCHEMAS and call["id"].startswith("call_")
    jsonschema.validate(call["args"], SCHEMAS[call["name"]])
    merged: AIMessageChunk | None = None
    for chunk in forced.stream("What is the weather in Oslo?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]
    named = llm.bind_tools([GetWeather, Add], tool_choice="Add").invoke("1 + 2?")
    assert [c["name"] for c in named.tool_calls] == ["Add"]


def test_langchain_with_structured_output(llm: ChatOpenAI) -> None:
    for method in ("json_schema", "function_calling"):
        result = llm.with_structured_output(GetWeather, method=method).invoke("Weather?")
        assert isinstance(result, GetWeather), method
    raw = llm.with_structured_output(Add, method="json_schema", include_raw=True).invoke("1+2")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Add)
