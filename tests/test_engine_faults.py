"""Faults across the two processes of a real server (the real engine on the CPU): the engine
core killed or hung while requests run, the front killed with SIGKILL, and SIGTERM drains
through both. Each ends every request with an error or its answer, never a hung connection,
and leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_engine import ServerProcess, sse_data
from tests.server import real_server, serving

MODEL = "tiny"
LONG = 2000  # tokens: far longer than any test waits


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (every thread's children)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except FileNotFoundError:
        pass
    return [c for c in out if alive(c)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def core_pid(server: ServerProcess) -> int:
    assert server.proc is not None
    cores = [c for c in children(server.proc.pid) if "spawn_main" in cmdline(c)]
    assert len(cores) == 1, cores
    return cores[0]


def wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


def server(checkpoint: Path, log_dir: Path, name: str, *flags: str) -> ServerProcess:
    return real_server(checkpoint, log_dir / f"{name}.log", "--served-model-name", MODEL,
                       "--max-model-len", "4096", "--num-kv-blocks", "1024",
                       "--max-num-seqs", "8", *flags)


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("faults")
    srv = {"killed": server(tiny_checkpoint, logs, "killed"),
           "hung": server(tiny_checkpoint, logs, "hung", "--engine-hang-timeout", "3"),
           "orphaned": server(tiny_checkpoint, logs, "orphaned"),
           "drained": server(tiny_checkpoint, logs, "drained", "--shutdown-timeout", "20"),
           "cut": server(tiny_checkpoint, logs, "cut", "--shutdown-timeout", "1")}
    with serving(*srv.values(), timeout=240):
        yield srv


async def stream(client: httpx.AsyncClient, request_id: str, started: asyncio.Event,
                 max_tokens: int = LONG, path: str = "/v1/completions") -> list[str]:
    body: dict = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True,
                  "stream": True}
    if path == "/v1/completions":
        body["prompt"] = f"stream {request_id}"
    else:
        body["messages"] = [{"role": "user", "content": f"stream {request_id}"}]
    async with client.stream("POST", path, json=body,
                             headers={"X-Request-Id": request_id}) as r:
        assert r.status_code == 200
        text = ""
        async for chunk in r.aiter_text():
            text += chunk
            if text.count("data: ") >= 3:
                started.set()
    return sse_data(text)


async def plain(client: httpx.AsyncClient, request_id: str, max_tokens: int = LONG
                ) -> httpx.Response:
    return await client.post("/v1/completions", headers={"X-Request-Id": request_id}, json={
        "model": MODEL, "prompt": f"plain {request_id}", "max_tokens": max_tokens,
        "ignore_eos": True})


async def in_flight(client: httpx.AsyncClient, max_tokens: int = LONG
                    ) -> tuple[list[asyncio.Task[list[str]]], asyncio.Task[httpx.Response]]:
    """Two streams (completions and chat) past their first tokens and one plain request."""
    started = [asyncio.Event(), asyncio.Event()]
    streams = [asyncio.create_task(stream(client, "s-completion", started[0], max_tokens)),
               asyncio.create_task(stream(client, "s-chat", started[1], max_tokens,
                                          "/v1/chat/completions"))]
    request = asyncio.create_task(plain(client, "p-plain", max_tokens))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    return streams, request


def assert_fault_endings(streams: list[list[str]], response: httpx.Response) -> None:
    """Each stream ends with an error event naming its request id, then [DONE]; the plain
    request gets a 500 envelope with its id."""
    for data, request_id in zip(streams, ("s-completion", "s-chat"), strict=True):
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2])["error"]
        assert error["code"] == "internal_error" and request_id in error["message"]
    assert response.status_code == 500, response.text
    assert response.headers["X-Request-Id"] == "p-plain"
    error = response.json()["error"]
    assert error["code"] == "internal_error" and "p-plain" in error["message"]


async def assert_engine_stopped(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 503
    assert (await client.get("/ready")).status_code == 503
    refused = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"


def assert_exits_cleanly(srv: ServerProcess, others: list[int]) -> None:
    """SIGTERM ends the front (its engine is gone: nothing to drain) with no child left."""
    assert srv.proc is not None
    srv.send_signal(signal.SIGTERM)
    assert srv.wait(30) == 0, srv.log()
    wait_gone(others, 10)


async def test_a_killed_core_ends_every_request_with_an_error(
        servers: dict[str, ServerProcess]) -> None:
    srv = servers["killed"]
    core = core_pid(srv)
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        assert (await client.get("/health")).status_code == 200
        streams, request = await in_flight(client)
        t0 = time.monotonic()
        os.kill(core, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*streams), 30)
        assert_fault_endings(results, await asyncio.wait_for(request, 30))
        assert time.monotonic() - t0 < 10
        await assert_engine_stopped(client)
    assert "engine core process exited (code -9)" in srv.log()
    assert_exits_cleanly(srv, [core, *children(srv.proc.pid)])  # type: ignore[union-attr]


async def test_a_hung_core_is_killed_and_every_request_ends_with_an_error(
        servers: dict[str, ServerProcess]) -> None:
    srv = servers["hung"]
    core = core_pid(srv)
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        streams, request = await in_flight(client)
        t0 = time.monotonic()
        os.kill(core, signal.SIGSTOP)  # alive, silent: as a deadlocked step would be
        try:
            results = await asyncio.wait_for(asyncio.gather(*streams), 30)
            assert_fault_endings(results, await asyncio.wait_for(request, 30))
            # --engine-hang-timeout 3, checked every half second.
            assert 2.5 < time.monotonic() - t0 < 10
            await assert_engine_stopped(client)
            wait_gone([core], 10)  # the front killed it
        finally:
            if alive(core):
                os.kill(core, signal.SIGKILL)
    assert "hung" in srv.log()
    assert_exits_cleanly(srv, children(srv.proc.pid))  # type: ignore[union-attr]


async def test_a_front_killed_with_sigkill_leaves_no_process(
        servers: dict[str, ServerProcess]) -> None:
    srv = servers["orphaned"]
    assert srv.proc is not None
    family = children(srv.proc.pid)
    core = core_pid(srv)
    assert core in family
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        started = asyncio.Event()
        task = asyncio.create_task(stream(client, "o-stream", started))
        await asyncio.wait_for(started.wait(), 60)
        srv.proc.kill()
        with pytest.raises(httpx.HTTPError):
            await asyncio.wait_for(task, 30)
    srv.proc.wait(10)
    wait_gone(family, 15)  # the core (mid-generation) and multiprocessing's helper


async def test_sigterm_drains_through_both_processes(servers: dict[str, ServerProcess]) -> None:
    srv = servers["drained"]
    assert srv.proc is not None
    family = children(srv.proc.pid)
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        streams, request = await in_flight(client, max_tokens=60)
        srv.send_signal(signal.SIGTERM)
        assert (await client.get("/ready")).status_code == 503
        for data in await asyncio.gather(*streams):
            assert data[-1] == "[DONE]"
            chunks = [json.loads(d) for d in data[:-1]]
            assert all("error" not in c for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        done = await request
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 60
    assert srv.wait(30) == 0, srv.log()
    wait_gone(family, 10)
    assert "engine core stopped" in srv.log() and "drained" in srv.log()


async def test_sigterm_past_the_shutdown_timeout_ends_requests_through_the_core(
        servers: dict[str, ServerProcess]) -> None:
    srv = servers["cut"]
    assert srv.proc is not None
    family = children(srv.proc.pid)
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        streams, request = await in_flight(client)
        srv.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for data in await asyncio.wait_for(asyncio.gather(*streams), 30):
            assert data[-1] == "[DONE]"
            error = json.loads(data[-2])["error"]
            assert error["code"] == "request_aborted"
            assert error["message"] == "the server is shutting down"
        cut = await asyncio.wait_for(request, 30)
        assert cut.status_code == 503 and cut.json()["error"]["code"] == "request_aborted"
        assert time.monotonic() - t0 < 15
    assert srv.wait(30) == 0, srv.log()
    wait_gone(family, 10)
