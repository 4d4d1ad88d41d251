"""``gptq-serve bench server``: a streaming load client against a running OpenAI-compatible
server, with vLLM's benchmark definitions (benchmarks/benchmark_serving.py):

- TTFT: request sent -> first streamed token.
- TPOT: (e2e latency - TTFT) / (output tokens - 1), per request.
- ITL: gaps between successive streamed chunks, over all requests.
- E2E latency: request sent -> stream closed.
- Output throughput: all output tokens / wall time of the whole run.

Requests go to /v1/completions with ``stream: true`` and the prompt as token ids (the OpenAI
API takes an array of integers), so every request has exactly ``prompt_len`` prompt tokens.
Output tokens are counted from the final usage chunk when the server sends one, else one per
content chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from engine.bench.kernels import Row


@dataclass
class RequestRecord:
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # monotonic, one per content chunk
    error: str | None = None


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server mode: the running server")
    p.add_argument("--served-model", default=None,
                   help="server mode: model name for requests (default: the first of /v1/models)")
    p.add_argument("--concurrency", type=int, default=32, help="server mode: streams at once")
    p.add_argument("--num-requests", type=int, default=64, help="server mode: requests in all")
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="server mode: prompt token ids are drawn from [3, vocab-size)")
    p.add_argument("--api-key", default=None)


async def _one(client: httpx.AsyncClient, body: dict[str, object]) -> RequestRecord:
    record = RequestRecord()
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage")
                if usage:
                    record.output_tokens = usage.get("completion_tokens", record.output_tokens)
                if any(c.get("text") for c in chunk.get("choices", [])):
                    record.chunk_times.append(time.perf_counter())
    except httpx.HTTPError as e:
        record.error = repr(e)
        return record
    end = time.perf_counter()
    if not record.chunk_times:
        record.error = "no tokens streamed"
        return record
    record.ttft_s = record.chunk_times[0] - start
    record.e2e_s = end - start
    record.output_tokens = record.output_tokens or len(record.chunk_times)
    return record


async def run_load(args: argparse.Namespace) -> tuple[list[RequestRecord], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers,
                                 timeout=httpx.Timeout(600.0)) as client:
        model = args.served_model
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(prompt: list[int]) -> RequestRecord:
            async with gate:
                return await _one(client, {
                    "model": model, "prompt": prompt, "max_tokens": args.new_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}})

        prompts = [[rng.randrange(3, args.vocab_size) for _ in range(args.prompt_len)]
                   for _ in range(args.num_requests)]
        start = time.perf_counter()
        records = await asyncio.gather(*(limited(p) for p in prompts))
        return list(records), time.perf_counter() - start


def summarise(records: list[RequestRecord], duration_s: float) -> list[Row]:
    done = [r for r in records if r.error is None]
    rows = [Row("requests completed", len(done), "requests"),
            Row("requests failed", len(records) - len(done), "requests")]
    if not done:
        return rows
    ttft = [r.ttft_s * 1e3 for r in done]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) * 1e3 for r in done
            if r.output_tokens > 1]
    itl = [(b - a) * 1e3 for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:],
                                                        strict=False)]
    e2e = [r.e2e_s * 1e3 for r in done]
    for name, values in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl), ("E2E latency", e2e)):
        if values:
            rows.append(Row(f"{name} mean", statistics.fmean(values), "ms"))
            rows.append(Row(f"{name} median", statistics.median(values), "ms"))
            rows.append(Row(f"{name} p99", percentile(values, 99), "ms"))
    output = sum(r.output_tokens for r in done)
    rows.append(Row("output throughput", output / duration_s, "tok/s"))
    rows.append(Row("request throughput", len(done) / duration_s, "req/s"))
    return rows


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> list[Row]:
    records, duration = asyncio.run(run_load(args))
    failed = [r.error for r in records if r.error]
    if failed:
        print(f"{len(failed)} requests failed; first: {failed[0]}")
    rows = [Row(f"concurrency {args.concurrency}, {args.num_requests} requests, "
                f"{args.prompt_len} prompt / {args.new_tokens} new tokens", 0, "")]
    return rows + summarise(records, duration)
