"""Tools of the reliability suite (docs/reliability.md): the figures each test prints, a server
process's memory, raw HTTP over a socket (for requests no HTTP client will send), and checks
that every error body is a clean OpenAI envelope.

Every test talks only to servers it starts itself on 127.0.0.1, and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fake_engine import ServerProcess, scrape, scrape_when_idle

HOST = "127.0.0.1"
# What no error body may contain: a traceback, a source file, an absolute path of ours.
_LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work/|/tmp/|site-packages")


def rss_mb(server: ServerProcess) -> float:
    """The server process's resident memory, MiB (Linux /proc)."""
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass
class Figures:
    """The figures of one test, printed as one block that docs/reliability.md quotes."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)

    def add(self, **values: Any) -> None:
        self.values.update(values)

    def latencies(self, prefix: str, seconds: list[float]) -> None:
        self.values[f"{prefix}_p50_ms"] = round(percentile(seconds, 50) * 1000, 1)
        self.values[f"{prefix}_p99_ms"] = round(percentile(seconds, 99) * 1000, 1)

    def kv(self, metrics: dict[str, float], when: str) -> None:
        """KV blocks held by no request (free, or cached for prefix reuse) and in the pool."""
        self.values[f"kv_unheld_{when}"] = int(kv_unheld(metrics))
        self.values[f"kv_total_{when}"] = int(metrics["gptq_kv_cache_blocks_total"])

    def print(self) -> None:
        body = " ".join(f"{k}={v}" for k, v in self.values.items())
        print(f"\nFIGURES {self.name}: {body}")


def kv_unheld(metrics: dict[str, float]) -> float:
    """Blocks no request holds: free ones and those the prefix cache keeps for reuse."""
    return metrics["gptq_kv_cache_blocks_free"] + metrics.get("gptq_kv_cache_blocks_cached", 0)


def idle_metrics(server: ServerProcess, timeout: float = 10.0) -> dict[str, float]:
    """/metrics once the engine is idle (see scrape_when_idle); asserts it got there and that
    no request holds a KV block any more."""
    m = scrape_when_idle(server.url, timeout)
    assert m["gptq_num_requests_running"] == 0, m
    assert m["gptq_num_requests_waiting"] == 0, m
    assert kv_unheld(m) == m["gptq_kv_cache_blocks_total"], "KV blocks leaked"
    return m


def engine_steps(server: ServerProcess) -> float:
    return scrape(server.url)["gptq_engine_steps_total"]


def assert_clean_error(body: bytes | str, status: int | None = None) -> dict[str, Any]:
    """An OpenAI error envelope with a message, and nothing of the server's insides."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    assert not _LEAKS.search(text), f"the error body leaks internals: {text[:500]}"
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], text
    return error


@dataclass
class RawResponse:
    status: int | None  # None: the server closed the connection without answering
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after it


def parse_response(data: bytes, closed: bool) -> RawResponse:
    if b"\r\n\r\n" not in data:
        return RawResponse(None, {}, data, closed)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    elif "content-length" in headers:
        body = body[:int(headers["content-length"])]
    return RawResponse(status, headers, body, closed)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


async def raw_exchange(port: int, chunks: Iterable[bytes], *, read_timeout: float = 10.0,
                       pause: float = 0.0, head_only: bool = False) -> RawResponse:
    """Send ``chunks`` (``pause`` s apart), then read until a whole response arrived (only its
    head with ``head_only``, for HEAD requests), the server closes the connection or
    ``read_timeout`` passes. A server that closes while we still write is a refusal too."""
    reader, writer = await asyncio.open_connection(HOST, port)
    data = b""
    closed = False

    async def send() -> None:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(read_timeout):
            while True:
                piece = await reader.read(65536)
                if not piece:
                    closed = True
                    break
                data += piece
                if _complete(data, head_only):
                    break
    except ConnectionError:  # reset: the server closed with our bytes still unread
        closed = True
    except TimeoutError:
        closed = reader.at_eof()
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    if not closed and _complete(data, head_only):
        response = parse_response(data, False)
        response.closed = response.headers.get("connection") == "close"
        return response
    return parse_response(data, closed)


def _complete(data: bytes, head_only: bool = False) -> bool:
    """Whether ``data`` holds a whole response (Content-Length or chunked)."""
    if b"\r\n\r\n" not in data:
        return False
    if head_only:
        return True
    head, _, body = data.partition(b"\r\n\r\n")
    lowered = head.lower()
    match = re.search(rb"content-length:\s*(\d+)", lowered)
    if match:
        return len(body) >= int(match.group(1))
    if b"transfer-encoding: chunked" in lowered:
        return body.endswith(b"0\r\n\r\n")
    return False


def request_head(method: str, target: str, headers: dict[str, str] | None = None,
                 body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}"]
    merged = {"Content-Type": "application/json", **(headers or {})}
    if body and "Transfer-Encoding" not in merged:
        merged.setdefault("Content-Length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
