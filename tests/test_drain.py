"""Graceful drain on SIGTERM, against a real server process: readiness turns 503 at once, new
work gets 503 with Retry-After, open requests finish (or, past --shutdown-timeout, end with an
error chunk and [DONE]), and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.fake_engine import ServerProcess

MODEL = "tiny"
TOKEN_DELAY = 0.05


def fake_server(checkpoint: Path, log_dir: Path, shutdown_timeout: float) -> ServerProcess:
    return ServerProcess.fake(checkpoint, log_dir / "server.log", "--served-model-name", MODEL,
                              "--shutdown-timeout", str(shutdown_timeout),
                              token_delay=TOKEN_DELAY).start()


async def first_chunk_then_rest(client: httpx.AsyncClient, path: str, body: dict,
                                started: asyncio.Event) -> list[str]:
    """The data payloads of a stream; ``started`` is set once its first content arrived."""
    data: list[str] = []
    async with client.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data.append(line[len("data: "):])
                if len(data) >= 2:
                    started.set()
    return data


async def open_requests(client: httpx.AsyncClient, max_tokens: int
                        ) -> tuple[list[asyncio.Task[list[str]]], asyncio.Task[httpx.Response]]:
    """Two completion and two chat streams (each past its first token) and one non-streaming
    request in flight."""
    events = [asyncio.Event() for _ in range(4)]
    streams = [asyncio.create_task(first_chunk_then_rest(
        client, "/v1/completions", {"prompt": f"p{i}", "max_tokens": max_tokens}, events[i]))
        for i in range(2)]
    streams += [asyncio.create_task(first_chunk_then_rest(
        client, "/v1/chat/completions", {"messages": [{"role": "user", "content": f"c{i}"}],
                                         "max_tokens": max_tokens}, events[2 + i]))
        for i in range(2)]
    plain = asyncio.create_task(client.post("/v1/completions", json={
        "model": MODEL, "prompt": "plain", "max_tokens": max_tokens}))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
    return streams, plain


async def assert_refusing(client: httpx.AsyncClient) -> None:
    """Right after SIGTERM: not ready, alive, and new work refused with 503 + Retry-After."""
    ready = await client.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert (await client.get("/health")).status_code == 200
    for path, body in (("/v1/completions", {"prompt": "new", "max_tokens": 2}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "new"}], "stream": True})):
        refused = await client.post(path, json={"model": MODEL, **body})
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "server_shutting_down"
    scrape = (await client.get("/metrics")).text
    assert "gptq_draining 1.0" in scrape and "gptq_ready 0.0" in scrape
    assert 'gptq_requests_rejected_total{reason="draining"} 2.0' in scrape


async def test_sigterm_lets_open_requests_finish_and_exits_0(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    max_tokens = 40  # 2 s at 50 ms a token: well inside the 15 s shutdown timeout
    server = fake_server(tiny_checkpoint, tmp_path, shutdown_timeout=15)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            # A client that hangs up before the drain must not hold it up.
            async with client.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": "gone", "max_tokens": 400, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    break
            streams, plain = await open_requests(client, max_tokens)
            server.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            await assert_refusing(client)
            for data in await asyncio.gather(*streams):
                assert data[-1] == "[DONE]"
                chunks = [json.loads(d) for d in data[:-1]]
                assert all("error" not in c for c in chunks)
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            done = await plain
            assert done.status_code == 200
            assert done.json()["usage"]["completion_tokens"] == max_tokens
        code = await asyncio.to_thread(server.wait, 10)
        assert code == 0, server.log()
        # The gone request asked for 20 s of tokens: a drain that waited for it takes that long.
        assert time.monotonic() - sent < 12, "the drain waited for a request that had gone"
        assert "drained" in server.log()
    finally:
        server.stop()


async def test_requests_past_the_shutdown_timeout_end_with_an_error_and_done(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    server = fake_server(tiny_checkpoint, tmp_path, shutdown_timeout=1)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            streams, plain = await open_requests(client, max_tokens=400)  # 20 s of tokens
            server.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            await assert_refusing(client)
            for data in await asyncio.gather(*streams):
                assert data[-1] == "[DONE]"
                error = json.loads(data[-2])
                assert set(error) == {"error"} and error["error"]["message"]
                assert all("error" not in json.loads(d) for d in data[:-2])
            cut = await plain
            assert cut.status_code == 503 and "error" in cut.json()
        code = await asyncio.to_thread(server.wait, 15)
        assert code == 0, server.log()
        assert time.monotonic() - sent < 14  # 1 s of grace, not the 20 s the requests asked for
    finally:
        server.stop()


def test_a_second_signal_exits_at_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    server = fake_server(tiny_checkpoint, tmp_path, shutdown_timeout=60)
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
                "model": MODEL, "prompt": "x", "max_tokens": 400, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            server.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert httpx.get(server.url + "/ready").status_code == 503
            server.send_signal(signal.SIGTERM)
            started = time.monotonic()
            with pytest.raises(httpx.HTTPError):
                for _ in lines:
                    pass
        server.wait(20)
        assert time.monotonic() - started < 15
    finally:
        server.stop()
