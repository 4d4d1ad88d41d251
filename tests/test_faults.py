"""Fault injection against the real `gptq-serve serve` on the CPU (engine/faults.py's hooks,
armed by GPTQ_TESTING_FAULTS): a model step that raises, a detokeniser that fails for one
request, a tokenizer that fails on one prompt, an engine loop that dies. The requests a fault
touches get a 500 envelope with their request id (a stream: an error event, then [DONE]); the
others are served as if nothing happened; a dead loop makes /health 503; nothing ever hangs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings, env_name
from engine.faults import FAULTS_ENV, FaultKind, FaultPlan
from tests.fake_engine import ServerProcess, sse_data
from tests.reliability import Figures, assert_clean_error, idle_metrics
from tests.server import real_server, serving

MODEL = "tiny-gptq"
MARKS = {"step_error": "@@step@@", "detokenize_error": "@@detok@@",
         "tokenize_error": "@@tok@@", "loop_crash": "@@crash@@"}
# A request that hangs fails the test here, long before pytest's own timeout.
CLIENT_TIMEOUT = 60


def fault_server(checkpoint: Path, log: Path, max_num_seqs: int) -> ServerProcess:
    return real_server(checkpoint, log, "--served-model-name", MODEL, "--max-model-len", "512",
                       "--num-kv-blocks", "256", "--max-num-seqs", str(max_num_seqs),
                       "--max-num-batched-tokens", "256",
                       env={FAULTS_ENV: json.dumps(MARKS)})


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """A batching server (4 sequences) and one that runs a single sequence at a time, so that
    a failing step holds the marked request alone."""
    folder = tmp_path_factory.mktemp("faults")
    batching = fault_server(tiny_checkpoint, folder / "batching.log", 4)
    serial = fault_server(tiny_checkpoint, folder / "serial.log", 1)
    with serving(batching, serial):
        yield batching, serial


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, **extra}


async def complete(client: httpx.AsyncClient, prompt: str, **extra: Any) -> httpx.Response:
    return await client.post("/v1/completions", json=body(prompt, **extra))


async def stream(client: httpx.AsyncClient, prompt: str, **extra: Any
                 ) -> tuple[httpx.Response, list[str]]:
    r = await client.post("/v1/completions", json=body(prompt, stream=True, **extra))
    return r, sse_data(r.text) if r.status_code == 200 else []


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_500_with_request_id(r: httpx.Response) -> None:
    assert r.status_code == 500, r.text
    error = assert_clean_error(r.content)
    assert error["code"] == "internal_error" and r.headers["x-request-id"] in error["message"]


def assert_stream_error_then_done(r: httpx.Response, data: list[str]) -> None:
    assert r.status_code == 200 and data[-1] == "[DONE]", data
    error = assert_clean_error(data[-2])
    assert error["code"] == "internal_error" and r.headers["x-request-id"] in error["message"]


def assert_idle_and_healthy(server: ServerProcess) -> None:
    idle_metrics(server)
    assert httpx.get(server.url + "/health").status_code == 200


NORMAL = ["The first of three", "A second prompt", "And a third one here"]


async def test_a_detokenizer_failure_ends_only_its_request(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    server = servers[0]
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT) as client:
        alone = [text_of(await complete(client, p)) for p in NORMAL]
        # The marked requests share every step with the normal ones (4 sequences a step).
        results = await asyncio.gather(
            stream(client, f"{MARKS['detokenize_error']} streamed"),
            complete(client, f"{MARKS['detokenize_error']} plain"),
            *(complete(client, p) for p in NORMAL))
    (marked_stream, data), marked_plain, *normal = results
    assert_stream_error_then_done(marked_stream, data)
    assert json.loads(data[0])["choices"][0]["text"], "the first token arrived before the fault"
    assert_500_with_request_id(marked_plain)
    assert [text_of(r) for r in normal] == alone
    assert_idle_and_healthy(server)


async def test_a_tokenizer_failure_is_a_500_for_that_request_only(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    server = servers[0]
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT) as client:
        alone = text_of(await complete(client, NORMAL[0]))
        marked, marked_stream, chat, normal = await asyncio.gather(
            complete(client, f"{MARKS['tokenize_error']} x"),
            complete(client, f"{MARKS['tokenize_error']} x", stream=True),
            client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": MARKS["tokenize_error"]}],
                "stream": True}),
            complete(client, NORMAL[0]))
    for r in (marked, marked_stream, chat):  # refused before any stream began
        assert_500_with_request_id(r)
    assert text_of(normal) == alone
    assert "injected tokenizer fault" in server.log(), "the log has the cause"


async def test_a_failing_model_step_ends_the_requests_it_ran_and_no_others(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    server = servers[1]
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT) as client:
        alone = [text_of(await complete(client, p)) for p in NORMAL[:2]]
        first = asyncio.create_task(stream(client, NORMAL[0]))
        await asyncio.sleep(0.2)  # running; what follows queues behind it, in this order
        marked = asyncio.create_task(stream(client, f"{MARKS['step_error']} x"))
        await asyncio.sleep(0.1)
        after = asyncio.create_task(complete(client, NORMAL[1]))
        (r0, data0), (rm, datam), r1 = await asyncio.gather(first, marked, after)
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data0[:-1]) == alone[0]
    assert_stream_error_then_done(rm, datam)
    assert text_of(r1) == alone[1]
    assert_idle_and_healthy(server)


async def test_steps_that_keep_failing_stop_the_loop_and_health_turns_503(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    server = servers[1]
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT) as client:
        for _ in range(3):  # three failing steps in a row: a broken device, as far as we know
            assert_500_with_request_id(await complete(client, f"{MARKS['step_error']} again"))
        await wait_for_health(client, 503)
        refused = await complete(client, NORMAL[0])
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert assert_clean_error(refused.content)["code"] == "engine_unavailable"
    assert httpx.get(server.url + "/ready").status_code == 503


async def wait_for_health(client: httpx.AsyncClient, status: int) -> None:
    for _ in range(100):
        if (await client.get("/health")).status_code == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"/health never answered {status}")


async def test_a_dead_engine_loop_ends_every_request_and_health_turns_503(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    server = servers[0]
    figures = Figures("fault_loop_crash")
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT) as client:
        # Long enough (the context is 512) that neither can finish before the crash lands,
        # also when the tiny model decodes fast.
        running = asyncio.create_task(stream(client, NORMAL[0], max_tokens=440))
        plain = asyncio.create_task(complete(client, NORMAL[1], max_tokens=440))
        await asyncio.sleep(0.3)
        crash = asyncio.create_task(stream(client, f"{MARKS['loop_crash']} x"))
        (rs, data), rp, (rc, datac) = await asyncio.gather(running, plain, crash)
        await wait_for_health(client, 503)
        refused = await complete(client, NORMAL[2])
        stream_refused = await client.post("/v1/completions", json=body("y", stream=True))
    assert_stream_error_then_done(rs, data)
    assert_500_with_request_id(rp)
    assert_stream_error_then_done(rc, datac)
    for r in (refused, stream_refused):
        assert r.status_code == 503
        assert assert_clean_error(r.content)["code"] == "engine_unavailable"
    assert (await asyncio.to_thread(httpx.get, server.url + "/ready")).status_code == 503
    figures.add(in_flight_ended=3, health_after=503)
    figures.print()


# ---- the hook itself -------------------------------------------------------------------------


def test_the_fault_hooks_are_off_unless_the_testing_variable_is_set() -> None:
    assert not FaultPlan.from_environment({}).active
    assert not FaultPlan.from_environment({FAULTS_ENV: ""}).active
    plan = FaultPlan.from_environment({FAULTS_ENV: json.dumps({"step_error": "@x@"})})
    assert plan.kinds_for("a @x@ b") == {FaultKind.STEP_ERROR} and not plan.kinds_for("a b")
    with pytest.raises(ValueError, match=FAULTS_ENV):
        FaultPlan.from_environment({FAULTS_ENV: '{"no_such_fault": "x"}'})
    # Not a setting: no field, flag or environment variable of the server names it.
    assert not any(name.startswith(("fault", "testing")) or "_fault" in name
                   for name in Settings.model_fields)
    assert FAULTS_ENV not in {env_name(name) for name in Settings.model_fields}
