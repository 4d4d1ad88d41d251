"""Hostile HTTP against a real server process (over the fake engine): oversized heads, endless
and oversized bodies, slowloris, a reader that never reads, request smuggling, hostile JSON.
Each gets a clean refusal (an OpenAI error naming the problem, or a closed connection) within
its deadline, the server's memory stays bounded, and normal clients are served meanwhile."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_engine import ServerProcess, scrape
from tests.reliability import (
    HOST,
    Figures,
    assert_clean_error,
    idle_metrics,
    raw_exchange,
    request_head,
    rss_mb,
)

MODEL = "tiny"
HEADER_TIMEOUT, BODY_TIMEOUT, SEND_TIMEOUT = 1.0, 2.0, 2.0
MAX_HEADER_BYTES = 32 * 1024
MAX_BODY = 4 * 1024 * 1024
BODY = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    with ServerProcess.fake(tiny_checkpoint, log, "--served-model-name", MODEL,
                            "--header-timeout", str(HEADER_TIMEOUT),
                            "--body-timeout", str(BODY_TIMEOUT),
                            "--send-timeout", str(SEND_TIMEOUT),
                            "--max-header-bytes", str(MAX_HEADER_BYTES),
                            "--max-body-bytes", str(MAX_BODY), token_delay=0.002).start() as srv:
        yield srv


def post(target: str = "/v1/completions", headers: dict[str, str] | None = None,
         body: bytes = BODY) -> bytes:
    return request_head("POST", target, headers, body)


async def test_an_8_mb_header_gets_431(server: ServerProcess) -> None:
    head = request_head("POST", "/v1/completions", {"X-Big": "a" * (8 * 1024 * 1024)}, BODY)
    start = time.monotonic()
    r = await raw_exchange(server.port, [head[i:i + 65536] for i in range(0, len(head), 65536)])
    assert r.closed
    if r.status is not None:  # else the server closed while we were still sending: refused too
        assert r.status == 431
        assert str(MAX_HEADER_BYTES) in assert_clean_error(r.body)["message"]
    assert time.monotonic() - start < 5


async def test_ten_thousand_headers_get_431(server: ServerProcess) -> None:
    headers = {f"X-H{i}": "v" for i in range(10_000)}
    r = await raw_exchange(server.port, [request_head("POST", "/v1/completions", headers, BODY)])
    assert r.closed and r.status in (431, None)
    if r.status == 431:
        assert "exceed" in assert_clean_error(r.body)["message"]


async def test_a_20_mb_body_gets_413_without_being_read(server: ServerProcess) -> None:
    before = rss_mb(server)
    head = request_head("POST", "/v1/completions", {"Content-Length": str(20 * 2**20)})
    body = [b"x" * 65536] * 320
    r = await raw_exchange(server.port, [head, *body])
    assert r.status == 413 and str(MAX_BODY) in assert_clean_error(r.body)["message"]
    # Chunked, no length announced: refused once the limit is crossed while reading.
    head = request_head("POST", "/v1/completions", {"Transfer-Encoding": "chunked"})
    chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
    r = await raw_exchange(server.port, [head, *([chunk] * 320)])
    assert r.status == 413
    assert rss_mb(server) - before < 64, "a refused body must not be held in memory"


async def test_a_chunked_body_without_end_is_cut_at_the_body_timeout(
        server: ServerProcess) -> None:
    head = request_head("POST", "/v1/completions", {"Transfer-Encoding": "chunked"})
    start = time.monotonic()
    # One byte every 0.1 s, for at most 30 s: far below the size limit, never finished.
    r = await raw_exchange(server.port, [head, *([b"1\r\n \r\n"] * 300)], pause=0.1,
                           read_timeout=30)
    elapsed = time.monotonic() - start
    assert r.closed and r.status is None
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 3, elapsed


async def test_slowloris_connections_are_closed_and_others_are_served(
        server: ServerProcess) -> None:
    """200 clients that send their headers a byte at a time, never finishing; meanwhile a
    normal client's requests are answered as fast as on an idle server."""
    figures = Figures("hostile_slowloris")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        baseline = [await timed_post(client) for _ in range(10)]
        head = post()[:-len(BODY) - 4]  # the head without its final blank line
        start = time.monotonic()
        slow = [asyncio.create_task(raw_exchange(server.port, [head[i:i + 1] for i in range(60)],
                                                 pause=0.2, read_timeout=15))
                for _ in range(200)]
        await asyncio.sleep(0.3)
        during = [await timed_post(client) for _ in range(10)]
        results = await asyncio.gather(*slow)
    elapsed = time.monotonic() - start
    assert all(r.closed and r.status is None for r in results)
    # Each would have needed 12 s to send its 60 bytes; the head deadline cut them all.
    assert elapsed < HEADER_TIMEOUT + 5, elapsed
    figures.latencies("baseline", baseline)
    figures.latencies("during", during)
    figures.add(slow_clients=len(slow), closed_after_s=round(elapsed, 2))
    figures.print()
    assert max(during) < 10 * max(baseline) + 1.0


async def timed_post(client: httpx.AsyncClient) -> float:
    start = time.monotonic()
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                   "max_tokens": 4})
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def _stalled_reader(port: int, body: bytes) -> socket.socket:
    """A client that sends a streaming request and then never reads (tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, port))
    sock.sendall(request_head("POST", "/v1/chat/completions", None, body))
    return sock


def test_a_stream_reader_that_never_reads_is_dropped_after_the_send_timeout(
        server: ServerProcess) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                       "stream": True, "max_tokens": 400, "logprobs": True, "top_logprobs": 20,
                       "n": 8}).encode()
    route = 'gptq_http_request_duration_seconds_count{route="/v1/chat/completions"}'
    before = scrape(server.url).get(route, 0)
    start = time.monotonic()
    sock = _stalled_reader(server.port, body)
    try:
        assert sock.recv(12) == b"HTTP/1.1 200"  # the status line; then nothing more is read
        # The response can only end by the server dropping us: we read nothing.
        deadline = start + 30
        while scrape(server.url).get(route, 0) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert scrape(server.url).get(route, 0) == before + 1, "the stalled stream was never ended"
    idle_metrics(server)
    fig = Figures("hostile_stalled_reader")
    fig.add(dropped_after_s=round(elapsed, 2), send_timeout_s=SEND_TIMEOUT)
    fig.print()


@pytest.mark.parametrize(("name", "headers", "status", "says"), [
    ("content-length and chunked", {"Content-Length": "4", "Transfer-Encoding": "chunked"},
     400, "both Content-Length and Transfer-Encoding"),
    ("two content-lengths", {"Content-Length": "4", "content-length": "30"}, 400,
     "Content-Length"),
    ("an unknown transfer coding", {"Transfer-Encoding": "gzip, chunked"}, 501,
     "Transfer-Encoding"),
])
async def test_request_smuggling_is_refused_and_the_connection_closed(
        server: ServerProcess, name: str, headers: dict[str, str], status: int,
        says: str) -> None:
    # What follows the head would be a second, hidden request if the framing were guessed.
    head = "\r\n".join(["POST /v1/completions HTTP/1.1", f"Host: {HOST}",
                        *(f"{k}: {v}" for k, v in headers.items())]) + "\r\n\r\n"
    smuggled = b"0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    r = await raw_exchange(server.port, [head.encode() + smuggled])
    assert r.status == status and r.closed
    assert says in assert_clean_error(r.body)["message"]
    assert r.body.count(b"HTTP/1.1") == 0, "a second response: the hidden request was served"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(("name", "raw", "content_type", "status", "says"), [
    ("100,000-deep array", nested(100_000).encode(), "application/json", 400, "deeper than"),
    ("70-deep metadata", ('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
                          '"metadata": {"a": ' + nested(70) + "}}").encode(),
     "application/json", 400, "deeper than"),
    ("a repeated key", b'{"model": "tiny", "prompt": "x", "model": "other"}',
     "application/json", 400, "repeats the key 'model'"),
    ("invalid UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', "application/json", 400,
     "not valid UTF-8 (byte 0xff"),
    ("text/plain", BODY, "text/plain", 415, "'text/plain'"),
    ("form-encoded", BODY, "application/x-www-form-urlencoded", 415,
     "application/x-www-form-urlencoded"),
    ("no content type", BODY, None, 415, "no Content-Type"),
    ("truncated JSON", b'{"model": "tiny", "prompt": "x"', "application/json", 400,
     "not valid JSON"),
])
def test_hostile_json_gets_an_error_naming_the_problem(
        server: ServerProcess, name: str, raw: bytes, content_type: str | None, status: int,
        says: str) -> None:
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(server.url + path, content=raw, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert says in assert_clean_error(r.content)["message"]


def test_memory_stays_bounded_and_the_server_healthy_after_all_that(
        server: ServerProcess) -> None:
    figures = Figures("hostile_after")
    figures.add(rss_mb=round(rss_mb(server), 1))
    figures.kv(idle_metrics(server), "after")
    figures.print()
    assert rss_mb(server) < 1024
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x",
                                                         "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(server.url + "/health").status_code == 200
