"""Under load, against real server processes over the fake engine: disconnects abort at once and
free every KV block, 64 concurrent streams all finish, a full queue answers 429, waiting
streams get keep-alive comments."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_engine import ServerProcess, scrape, scrape_when_idle, sse_data, sse_frames

MODEL = "tiny"


def metrics(server: ServerProcess) -> dict[str, float]:
    return scrape(server.url)


def wait_until_idle(server: ServerProcess) -> dict[str, float]:
    return scrape_when_idle(server.url)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("load") / "server.log"
    with ServerProcess.fake(tiny_checkpoint, log, "--served-model-name", MODEL,
                            "--max-num-seqs", "16", "--num-kv-blocks", "512",
                            "--max-model-len", "512", token_delay=0.01).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def small_queue(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    """One sequence at a time, two may wait; keep-alives every 0.2 s."""
    log = tmp_path_factory.mktemp("queue") / "server.log"
    with ServerProcess.fake(tiny_checkpoint, log, "--served-model-name", MODEL,
                            "--max-num-seqs", "1", "--max-queued-requests", "2",
                            "--keepalive-interval", "0.2", token_delay=0.02).start() as srv:
        yield srv


async def open_stream(client: httpx.AsyncClient, path: str, body: dict, chunks: int,
                      ready: asyncio.Event | None = None) -> list[str]:
    """Read ``chunks`` data frames of a stream, then hang up; the frames read."""
    seen: list[str] = []
    async with client.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                seen.append(line)
                if ready is not None:
                    ready.set()
                if len(seen) >= chunks:
                    break
    return seen


async def test_disconnected_streams_are_aborted_and_free_their_blocks(
        server: ServerProcess) -> None:
    before = metrics(server)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        tasks = [open_stream(client, "/v1/completions",
                             {"prompt": f"story {i}", "max_tokens": 300}, chunks=3)
                 for i in range(5)]
        tasks += [open_stream(client, "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": f"hi {i}"}],
                               "max_tokens": 300, "n": 2}, chunks=4)
                  for i in range(5)]
        await asyncio.gather(*tasks)
    # 300 tokens at 10 ms would take 3 s; aborted, everything is free well before that.
    start = time.monotonic()
    after = wait_until_idle(server)
    assert time.monotonic() - start < 2.0
    assert after["gptq_num_requests_running"] == 0 and after["gptq_num_requests_waiting"] == 0
    assert after["gptq_kv_cache_blocks_free"] == after["gptq_kv_cache_blocks_total"] == 512
    aborted = 'gptq_request_success_total{finish_reason="abort"}'
    assert after[aborted] - before.get(aborted, 0) == 15  # 5 + 5 x n=2 engine requests
    assert after["gptq_generation_tokens_total"] - before["gptq_generation_tokens_total"] < 500


def test_a_non_streaming_client_that_gives_up_is_aborted(server: ServerProcess) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=0.5,
                   json={"model": MODEL, "prompt": "long", "max_tokens": 400})
    m = wait_until_idle(server)
    assert m["gptq_num_requests_running"] == 0
    assert m["gptq_kv_cache_blocks_free"] == m["gptq_kv_cache_blocks_total"]


async def test_64_concurrent_streams_all_finish(server: ServerProcess) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[list[str], str]:
        r = await client.post("/v1/chat/completions" if i % 2 else "/v1/completions", json={
            "model": MODEL, "stream": True, "max_tokens": 12,
            "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": f"q{i}"}]} if i % 2
               else {"prompt": f"p{i}"})})
        assert r.status_code == 200
        return sse_data(r.text), r.text

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(64)))
    for data, raw in results:
        assert data[-1] == "[DONE]", raw[-300:]
        usage = json.loads(data[-2])["usage"]
        assert usage["completion_tokens"] == 12
    m = wait_until_idle(server)
    assert m["gptq_kv_cache_blocks_free"] == m["gptq_kv_cache_blocks_total"]


async def test_a_full_queue_answers_429_and_waiting_streams_get_keepalives(
        small_queue: ServerProcess) -> None:
    url = small_queue.url
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        first_token = asyncio.Event()
        running = asyncio.create_task(open_stream(
            client, "/v1/completions", {"prompt": "a", "max_tokens": 60}, 30, first_token))
        await first_token.wait()
        # The one sequence slot is taken for the next ~0.6 s. Of a burst of six, two are
        # admitted to wait (the queue holds 2) and four are refused at once: admission counts
        # a request the moment it is accepted, not when its stream starts.
        burst = [asyncio.create_task(client.post("/v1/completions", json={
            "model": MODEL, "prompt": f"q{i}", "max_tokens": 2, "stream": True}))
            for i in range(6)]
        done, waiting = await asyncio.wait(burst, timeout=0.4)
        assert len(done) == 4 and len(waiting) == 2
        for task in done:
            refused = task.result()
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            error = refused.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
        chat = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2})
        assert chat.status_code == 429
        await running
        for response in await asyncio.gather(*waiting):
            frames = sse_frames(response.text)
            assert ": keep-alive" in frames, "a waiting stream gets keep-alive comments"
            assert frames[-1] == "data: [DONE]"
    m = wait_until_idle(small_queue)
    assert m['gptq_requests_rejected_total{reason="queue_full"}'] == 5
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x",
                                                   "max_tokens": 2})
    assert ok.status_code == 200
