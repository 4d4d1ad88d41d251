"""The streaming load client of ``gptq-serve bench server`` (engine/bench/server_sweep.py runs
the sweep), with vLLM's benchmark definitions (benchmarks/benchmark_serving.py):

- TTFT: request sent -> first streamed token.
- TPOT: (e2e latency - TTFT) / (output tokens - 1), per request.
- ITL: gaps between successive streamed chunks, over all requests.
- E2E latency: request sent -> stream closed.
- Output throughput: all output tokens / wall time of the whole run.

Requests go to /v1/completions with ``stream: true`` and the prompt as token ids (the OpenAI
API takes an array of integers), so every request has exactly ``prompt_len`` prompt tokens.
Output tokens are counted from the final usage chunk when the server sends one, else one per
content chunk. A request counts as completed only if its stream carried a finish reason.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestRecord:
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # monotonic, one per content chunk
    finish_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int
    num_requests: int
    prompt_len: int
    new_tokens: int
    vocab_size: int  # prompt token ids are drawn from [3, vocab_size)
    seed: int = 0


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
                if "error" in chunk:
                    record.error = f"error event: {chunk['error']}"
                usage = chunk.get("usage")
                if usage:
                    record.output_tokens = usage.get("completion_tokens", record.output_tokens)
                choices = chunk.get("choices", [])
                if any(c.get("text") for c in choices):
                    record.chunk_times.append(time.perf_counter())
                record.finish_reason = next((c["finish_reason"] for c in choices
                                             if c.get("finish_reason")), record.finish_reason)
    except httpx.HTTPError as e:
        record.error = repr(e)
        return record
    end = time.perf_counter()
    if record.error is None and not record.chunk_times:
        record.error = "no tokens streamed"
    if record.error is None and record.finish_reason is None:
        record.error = "the stream ended without a finish reason"
    if record.error is not None:
        return record
    record.ttft_s = record.chunk_times[0] - start
    record.e2e_s = end - start
    record.output_tokens = record.output_tokens or len(record.chunk_times)
    return record


async def run_load(base_url: str, model: str, spec: LoadSpec, api_key: str | None = None
                   ) -> tuple[list[RequestRecord], float]:
    """``spec.num_requests`` streams, at most ``spec.concurrency`` at once; (records in
    submission order, wall seconds)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(spec.seed)
    limits = httpx.Limits(max_connections=spec.concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as client:
        gate = asyncio.Semaphore(spec.concurrency)

        async def limited(prompt: list[int]) -> RequestRecord:
            async with gate:
                return await _one(client, {
                    "model": model, "prompt": prompt, "max_tokens": spec.new_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}})

        prompts = [[rng.randrange(3, spec.vocab_size) for _ in range(spec.prompt_len)]
                   for _ in range(spec.num_requests)]
        start = time.perf_counter()
        records = await asyncio.gather(*(limited(p) for p in prompts))
        return list(records), time.perf_counter() - start


async def served_model(base_url: str, api_key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
        return (await client.get("/v1/models")).json()["data"][0]["id"]


@dataclass(frozen=True)
class LoadFigures:
    """A run's figures in milliseconds (throughput in tokens a second)."""

    completed: int
    failed: int
    ttft_median: float
    ttft_p99: float
    tpot_median: float
    tpot_mean: float
    tpot_p99: float
    itl_median: float
    itl_p99: float
    e2e_median: float
    output_tokens_per_s: float


def figures(records: list[RequestRecord], duration_s: float) -> LoadFigures | None:
    done = [r for r in records if r.error is None]
    if not done:
        return None
    ttft = [r.ttft_s * 1e3 for r in done]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) * 1e3 for r in done
            if r.output_tokens > 1] or [0.0]
    itl = [(b - a) * 1e3 for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:],
                                                        strict=False)] or [0.0]
    return LoadFigures(
        completed=len(done), failed=len(records) - len(done),
        ttft_median=statistics.median(ttft), ttft_p99=percentile(ttft, 99),
        tpot_median=statistics.median(tpot), tpot_mean=statistics.fmean(tpot),
        tpot_p99=percentile(tpot, 99), itl_median=statistics.median(itl),
        itl_p99=percentile(itl, 99), e2e_median=statistics.median(r.e2e_s * 1e3 for r in done),
        output_tokens_per_s=sum(r.output_tokens for r in done) / duration_s)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]
