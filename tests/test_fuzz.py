"""Schemathesis against our own /openapi.json: positive cases (valid by the schema) and
negative ones (not), for both generation endpoints, streams included. No response is a 5xx,
every response matches the schema (its body for its status, or the error envelope), negative
cases are refused with 4xx, and every SSE frame is a valid chunk (official OpenAI schema) or an
error envelope, ending with [DONE]. Seeded and bounded: a small run against the fake engine in
`make test`, larger ones (also against the real engine) in `make soak`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fake_engine import ServerProcess, sse_data
from tests.reliability import Figures, assert_clean_error, idle_metrics
from tests.schemas.validate import validate
from tests.server import real_server, serving

MODEL = "tiny"
KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ("--served-model-name", MODEL, "--api-key", KEY, "--max-model-len", "256",
          "--max-tokens-limit", "16", "--max-n", "2", "--max-prompts", "3",
          "--num-kv-blocks", "256")
OPERATIONS = ["/v1/completions", "/v1/chat/completions"]
CHUNK_SCHEMA = {"/v1/completions": "CreateCompletionStreamChunk",
                "/v1/chat/completions": "CreateChatCompletionStreamResponse"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def fake(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with ServerProcess.fake(tiny_checkpoint, log, *LIMITS).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def real(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[ServerProcess]:
    srv = real_server(tiny_checkpoint, tmp_path_factory.mktemp("fuzz-real") / "server.log",
                      *LIMITS)
    with serving(srv):
        yield srv


def check_stream(path: str, response: Any) -> None:  # noqa: ANN401 - schemathesis' Response
    """Every frame of an SSE body is a valid chunk or an error envelope; the last is [DONE]
    (unless schemathesis stopped reading first: it keeps at most 100 events)."""
    data = sse_data(response.text)
    if not response.stream_cut_short:
        assert data[-1] == "[DONE]", response.text[-300:]
    for payload in data:
        if payload == "[DONE]":
            continue
        chunk = json.loads(payload)
        if "error" in chunk:
            assert_clean_error(payload)
            assert chunk["error"]["type"] != "internal_error", payload
        else:
            validate(CHUNK_SCHEMA[path], chunk)
    return len(data)


def fuzz(server: ServerProcess, path: str, mode: GenerationMode, examples: int,
         run_seed: int) -> dict[str, int]:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)
    operation = schema[path]["POST"]
    strategy = operation.as_strategy(generation_mode=mode, headers=AUTH)
    if mode is GenerationMode.POSITIVE:
        # A served model name, so that valid requests reach the engine (any other is a 404).
        strategy = st.tuples(strategy, st.booleans()).map(_with_model)
    seen: dict[str, int] = {}

    @seed(run_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              phases=[Phase.explicit, Phase.generate], print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:  # noqa: ANN401
        response = case.call(base_url=server.url, timeout=60)
        checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
        case.validate_response(response, checks=checks)
        kind = response.headers.get("content-type", [""])
        kind = kind[0] if isinstance(kind, list) else kind
        if response.status_code == 200 and kind.startswith("text/event-stream"):
            check_stream(path, response)
            seen["streams"] = seen.get("streams", 0) + 1
        seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1

    run()
    return seen


def _with_model(pair: tuple[Any, bool]) -> Any:  # noqa: ANN401
    case, stream = pair
    if isinstance(case.body, dict):
        case.body["model"] = MODEL
        if "stream" not in case.body:
            case.body["stream"] = stream
    return case


def run_all(server: ServerProcess, name: str, examples: int) -> None:
    figures = Figures(name)
    for i, path in enumerate(OPERATIONS):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen = fuzz(server, path, mode, examples, run_seed=1000 + i)
            label = "chat" if "chat" in path else "completions"
            figures.add(**{f"{label}_{mode.value}": _summary(seen)})
    figures.print()
    idle_metrics(server)
    ok = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                    json={"model": MODEL, "prompt": "still fine?", "max_tokens": 3})
    assert ok.status_code == 200, ok.text


def _summary(seen: dict[str, int]) -> str:
    return "/".join(f"{k}:{v}" for k, v in sorted(seen.items()))


def test_fuzz_the_fake_engine_server(fake: ServerProcess) -> None:
    run_all(fake, "fuzz", examples=40)


@pytest.mark.soak
def test_soak_fuzz_the_fake_engine_server(fake: ServerProcess) -> None:
    run_all(fake, "soak_fuzz", examples=1500)


@pytest.mark.soak
def test_soak_fuzz_the_real_engine_server(real: ServerProcess) -> None:
    run_all(real, "soak_fuzz_real", examples=400)
