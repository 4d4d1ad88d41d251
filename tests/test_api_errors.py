"""Bad input, auth and routing failures against a real server process: the right status, the
OpenAI error envelope every time (never FastAPI's 422 or {"detail"}), and a healthy server
afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_engine import ServerProcess
from tests.schemas.validate import validate

KEY = "sk-errors"
MODEL = "tiny"
MAX_MODEL_LEN = 128
MAX_BODY = 4096
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("errors") / "server.log"
    with ServerProcess.fake(tiny_checkpoint, log, "--served-model-name", MODEL,
                            "--api-key", KEY, "--api-key", "sk-second",
                            "--max-model-len", str(MAX_MODEL_LEN), "--max-n", "4",
                            "--max-logit-bias", "3", "--max-body-bytes", str(MAX_BODY),
                            "--max-tokens-limit", "64").start() as srv:
        yield srv


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: dict[str, Any] | str  # a str is sent as the raw body
    status: int = 400
    param: str | None = None
    code: str | None = None


USER = [{"role": "user", "content": "hi"}]
C, CHAT = "/v1/completions", "/v1/chat/completions"


def comp(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


CASES = [
    Case("malformed json", C, '{"model": "tiny", "prompt": '),
    Case("body not an object", C, "[1, 2]"),
    Case("empty body", C, ""),
    Case("missing model", C, {"prompt": "x"}, param="model"),
    Case("missing prompt", C, {"model": MODEL}, param="prompt"),
    Case("temperature a string", C, comp(temperature="hot"), param="temperature"),
    Case("temperature NaN", C, '{"model": "tiny", "prompt": "x", "temperature": NaN}',
         param="temperature"),
    Case("temperature Infinity", C, '{"model": "tiny", "prompt": "x", "top_p": Infinity}',
         param="top_p"),
    Case("temperature too high", C, comp(temperature=2.5), param="temperature"),
    Case("top_p zero", C, comp(top_p=0), param="top_p"),
    Case("max_tokens zero", C, comp(max_tokens=0), param="max_tokens"),
    Case("max_tokens a string", C, comp(max_tokens="5"), param="max_tokens"),
    Case("max_tokens a bool", C, comp(max_tokens=True), param="max_tokens"),
    Case("max_tokens over the limit", C, comp(max_tokens=100, prompt="x"), param="max_tokens"),
    Case("n zero", C, comp(n=0), param="n"),
    Case("n too large", C, comp(n=5), param="n"),
    Case("five stop strings", C, comp(stop=["a", "b", "c", "d", "e"]), param="stop"),
    Case("empty stop string", C, comp(stop=""), param="stop"),
    Case("logit_bias too big", C, comp(logit_bias={"5": 1, "6": 1, "7": 1, "8": 1}),
         param="logit_bias"),
    Case("logit_bias key not a token", C, comp(logit_bias={"abc": 1}), param="logit_bias"),
    Case("logit_bias key outside vocab", C, comp(logit_bias={"99999": 1}),
         param="logit_bias"),
    Case("logit_bias value out of range", C, comp(logit_bias={"5": 150}), param="logit_bias"),
    Case("presence_penalty out of range", C, comp(presence_penalty=3), param="presence_penalty"),
    Case("frequency_penalty out of range", C, comp(frequency_penalty=-2.5),
         param="frequency_penalty"),
    Case("top_k negative", C, comp(top_k=-5), param="top_k"),
    Case("min_p out of range", C, comp(min_p=1.5), param="min_p"),
    Case("repetition_penalty zero", C, comp(repetition_penalty=0), param="repetition_penalty"),
    Case("min_tokens over max_tokens", C, comp(min_tokens=5), param="min_tokens"),
    Case("stop_token_ids outside vocab", C, comp(stop_token_ids=[123456]),
         param="stop_token_ids"),
    Case("empty prompt string", C, comp(prompt=""), param="prompt"),
    Case("empty prompt list", C, comp(prompt=[]), param="prompt"),
    Case("prompt list with an empty string", C, comp(prompt=["a", ""]), param="prompt"),
    Case("prompt of mixed types", C, comp(prompt=["a", 5]), param="prompt"),
    Case("token id outside the vocabulary", C, comp(prompt=[1, 5, 100000]), param="prompt"),
    Case("negative token id", C, comp(prompt=[[1, -3]]), param="prompt"),
    Case("prompt + max_tokens over the context", C, comp(prompt=list(range(5, 105)),
                                                         max_tokens=50),
         param="max_tokens", code="context_length_exceeded"),
    Case("prompt longer than the context", C, comp(prompt=list(range(5, 5 + MAX_MODEL_LEN)),
                                                   max_tokens=None),
         param="prompt", code="context_length_exceeded"),
    Case("unknown model", C, comp(model="gpt-4o"), status=404, param="model",
         code="model_not_found"),
    Case("suffix", C, comp(suffix="end"), param="suffix"),
    Case("best_of above n", C, comp(best_of=3), param="best_of"),
    Case("legacy logprobs above 5", C, comp(logprobs=6), param="logprobs"),
    Case("unknown field", C, comp(frobnicate=1), param="frobnicate"),
    Case("stream_options of the wrong type", C, comp(stream=True, stream_options={
        "include_usage": "yes"}), param="stream_options.include_usage"),
    Case("stream_options without stream", C, comp(stream_options={"include_usage": True}),
         param="stream_options"),
    Case("missing messages", CHAT, {"model": MODEL}, param="messages"),
    Case("empty messages", CHAT, chat(messages=[]), param="messages"),
    Case("message not an object", CHAT, chat(messages=["hi"]), param="messages[0]"),
    Case("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]),
         param="messages[0].role"),
    Case("tool message answering no call", CHAT, chat(messages=[
        {"role": "tool", "content": "x", "tool_call_id": "1"}]),
         param="messages[0].tool_call_id"),
    Case("content a number", CHAT, chat(messages=[{"role": "user", "content": 5}]),
         param="messages[0].content"),
    Case("missing user content", CHAT, chat(messages=[{"role": "user"}]),
         param="messages[0].content"),
    Case("image part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "see"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
         param="messages[0].content[1]"),
    Case("tools not a list", CHAT, chat(tools={"type": "function"}), param="tools"),
    Case("tool_choice required without tools", CHAT, chat(tool_choice="required"),
         param="tool_choice"),
    Case("function_call by name", CHAT, chat(function_call={"name": "f"}),
         param="function_call"),
    Case("unknown response_format type", CHAT, chat(response_format={"type": "yaml"}),
         param="response_format.type"),
    Case("audio output", CHAT, chat(modalities=["text", "audio"]), param="modalities"),
    Case("prediction", CHAT, chat(prediction={"type": "content", "content": "x"}),
         param="prediction"),
    Case("moderation", CHAT, chat(moderation={"model": "omni-moderation-latest"}),
         param="moderation"),
    Case("top_logprobs above 20", CHAT, chat(logprobs=True, top_logprobs=21),
         param="top_logprobs"),
    Case("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), param="top_logprobs"),
    Case("logprobs an int in chat", CHAT, chat(logprobs=3), param="logprobs"),
    Case("max_completion_tokens over the context", CHAT, chat(max_completion_tokens=500),
         param="max_completion_tokens", code="context_length_exceeded"),
    Case("messages longer than the context", CHAT,
         chat(messages=[{"role": "user", "content": "one two three " * 60}], max_tokens=None),
         param="messages", code="context_length_exceeded"),
    Case("max_tokens that leaves no room for any prompt", C, comp(max_tokens=MAX_MODEL_LEN),
         param="max_tokens", code="context_length_exceeded"),
    Case("unknown chat model", CHAT, chat(model="llama"), status=404, param="model",
         code="model_not_found"),
    Case("tokenize without input", "/tokenize", {}, param="prompt"),
    Case("detokenize outside the vocabulary", "/detokenize", {"tokens": [100000]},
         param="tokens"),
]


def assert_envelope(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert "detail" not in body
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


def test_the_table_has_enough_kinds_of_bad_input() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_an_openai_error(server: ServerProcess, case: Case) -> None:
    raw = case.body if isinstance(case.body, str) else json.dumps(
        {k: v for k, v in case.body.items() if v is not None})
    r = httpx.post(server.url + case.path, content=raw,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    error = assert_envelope(r, case.status)
    assert error["type"] == ("invalid_request_error" if case.status == 400
                             else "not_found_error")
    assert error["param"] == case.param
    assert error["code"] == case.code


def test_bad_input_while_streaming_is_refused_before_the_stream(server: ServerProcess) -> None:
    r = httpx.post(server.url + C, json=comp(stream=True, temperature=-1), headers=AUTH)
    assert assert_envelope(r, 400)["param"] == "temperature"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/", "//v1/models", "/V1/models",
                                  "/v1//models", "/v1/models/tiny", "/v1/completions",
                                  "/v1/chat/completions/", "/V1/Chat/Completions",
                                  "/tokenize", "/version", "/v1/nothing"])
def test_every_v1_spelling_needs_a_key(server: ServerProcess, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        r = httpx.request("POST" if "completions" in path.lower() else "GET",
                          server.url + path, headers=headers, json=comp())
        error = assert_envelope(r, 401)
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"


def test_every_configured_key_works_and_probes_stay_open(server: ServerProcess) -> None:
    for key in (KEY, "sk-second"):
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200


def test_unknown_routes_methods_and_models(server: ServerProcess) -> None:
    assert_envelope(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    assert_envelope(httpx.post(server.url + "/nothing", headers=AUTH), 404)
    assert_envelope(httpx.get(server.url + C, headers=AUTH), 405)
    assert_envelope(httpx.delete(server.url + "/v1/models", headers=AUTH), 405)
    error = assert_envelope(httpx.get(server.url + "/v1/models/gpt-4", headers=AUTH), 404)
    assert error["code"] == "model_not_found"


def test_oversized_bodies_get_413(server: ServerProcess) -> None:
    big = comp(prompt="x" * (MAX_BODY + 10))
    error = assert_envelope(httpx.post(server.url + C, json=big, headers=AUTH), 413)
    assert error["type"] == "invalid_request_error"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    assert_envelope(httpx.post(server.url + C, content=chunks(), headers=AUTH), 413)


def test_the_server_is_healthy_after_all_that(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    r = httpx.post(server.url + C, json=comp(max_tokens=3), headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    metrics = httpx.get(server.url + "/metrics").text
    invalid = next(line for line in metrics.splitlines()
                   if line.startswith('gptq_requests_rejected_total{reason="invalid"}'))
    assert float(invalid.split()[-1]) >= len(CASES)
    assert "gptq_num_requests_running 0.0" in metrics
    assert 'status="500"' not in metrics and 'status="422"' not in metrics
