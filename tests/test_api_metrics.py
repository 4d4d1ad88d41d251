"""/metrics against the real `gptq-serve serve` process: every counter and histogram moves by
exactly what a known stretch of traffic implies, and a KV cache too small for the load is seen
filling, preempting and emptying again, while every output still equals the transformers
reference."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import ServerProcess, scrape, scrape_when_idle, sse_data
from tests.schemas.validate import validate
from tests.server import GreedyReference, MetricsWatch, post_ok, real_server, serving
from tests.vllm_names import alias_problems

MODEL = "tiny"
C, CHAT = "/v1/completions", "/v1/chat/completions"
BLOCK_SIZE = 8
NUM_BLOCKS = 16  # 128 token slots
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("metrics") / "server.log"
    srv = real_server(tiny_checkpoint, log, "--served-model-name", MODEL,
                      "--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(BLOCK_SIZE),
                      "--num-kv-blocks", str(NUM_BLOCKS), "--max-num-seqs", "4",
                      "--max-num-batched-tokens", "64")
    with serving(srv):
        yield srv


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_checkpoint)


def http(route: str, status: int, method: str = "POST") -> str:
    return f'gptq_http_requests_total{{method="{method}",route="{route}",status="{status}"}}'


def finished(reason: str) -> str:
    return f'gptq_request_success_total{{finish_reason="{reason}"}}'


def test_the_pool_is_reported_empty_and_ready_at_rest(server: ServerProcess) -> None:
    m = scrape(server.url)
    # The warm-up's full blocks stay cached for reuse; every block is available again.
    assert m["gptq_kv_cache_blocks_total"] == NUM_BLOCKS
    assert m["gptq_kv_cache_blocks_free"] + m["gptq_kv_cache_blocks_cached"] == NUM_BLOCKS
    assert m["gptq_kv_cache_usage_ratio"] == 0
    assert m["gptq_num_requests_running"] == m["gptq_num_requests_waiting"] == 0
    assert m["gptq_ready"] == 1 and m["gptq_draining"] == 0
    # The warm-up generation ran before /ready said 200.
    assert m["gptq_engine_steps_total"] > 0


def test_counters_and_histograms_account_for_every_request_exactly(
        server: ServerProcess, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Count these tokens please")
    forced = 500  # forced by logit_bias and declared a stop token: one token, then "stop"
    with MetricsWatch(server.url) as watch:
        sampled = post_ok(server, C, {"model": MODEL, "prompt": prompt, "n": 2, "max_tokens": 5,
                                      "ignore_eos": True, "temperature": 0.8, "seed": 9})
        stopped = post_ok(server, CHAT, {
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "logit_bias": {str(forced): 100}, "stop_token_ids": [forced]})
        streamed = httpx.post(server.url + C, timeout=60, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 3, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}})
        invalid = httpx.post(server.url + C, json={"model": MODEL, "prompt": "x",
                                                  "temperature": 5})
        unknown = httpx.post(server.url + CHAT, json={
            "model": "nope", "messages": [{"role": "user", "content": "x"}]})
    d = watch.delta
    assert (invalid.status_code, unknown.status_code) == (400, 404)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    stream_usage = json.loads(sse_data(streamed.text)[-2])["usage"]
    validate("CompletionUsage", stream_usage)

    # Four engine requests: n=2 (5 tokens each), the chat (1 token), the stream (3 tokens).
    prompts = [len(prompt), len(prompt), stopped["usage"]["prompt_tokens"], len(prompt)]
    outputs = [5, 5, 1, 3]
    assert sampled["usage"]["completion_tokens"] == 10
    assert stopped["usage"]["completion_tokens"] == 1 and stream_usage["completion_tokens"] == 3
    assert d[finished("length")] == 3 and d[finished("stop")] == 1
    assert d[finished("abort")] == d[finished("error")] == 0
    assert d["gptq_prompt_tokens_total"] == sum(prompts)
    assert d["gptq_generation_tokens_total"] == sum(outputs)
    assert d["gptq_request_prompt_tokens_count"] == 4
    assert d["gptq_request_prompt_tokens_sum"] == sum(prompts)
    assert d["gptq_request_generation_tokens_count"] == 4
    assert d["gptq_request_generation_tokens_sum"] == sum(outputs)
    for histogram in ("gptq_time_to_first_token_seconds", "gptq_e2e_request_latency_seconds",
                      "gptq_request_queue_time_seconds"):
        assert d[f"{histogram}_count"] == 4, histogram
        assert d[f"{histogram}_sum"] > 0, histogram
    # One gap between consecutive tokens of the same request.
    assert d["gptq_inter_token_latency_seconds_count"] == sum(n - 1 for n in outputs)
    # Each request counts under its route template, method and status.
    assert d[http(C, 200)] == 2 and d[http(C, 400)] == 1
    assert d[http(CHAT, 200)] == 1 and d[http(CHAT, 404)] == 1
    assert d['gptq_http_request_duration_seconds_count{route="/v1/completions"}'] == 3
    assert d['gptq_requests_rejected_total{reason="invalid"}'] == 2
    assert d["gptq_engine_steps_total"] >= max(outputs)
    assert d["gptq_num_preemptions_total"] == 0


def test_vllm_names_agree_with_ours_and_count_known_traffic(server: ServerProcess,
                                                            tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Both names count these")
    with MetricsWatch(server.url) as watch:
        post_ok(server, C, {"model": MODEL, "prompt": prompt, "n": 2, "max_tokens": 4,
                            "ignore_eos": True})
        post_ok(server, C, {"model": MODEL, "prompt": prompt, "max_tokens": 1,
                            "ignore_eos": True})
        text = httpx.get(server.url + "/metrics").text
    assert alias_problems(text, MODEL) == []
    d = watch.delta
    labels = f'{{engine="0",model_name="{MODEL}"}}'
    length = f'{{engine="0",finished_reason="length",model_name="{MODEL}"}}'
    assert d[f"vllm:request_success_total{length}"] == 3
    assert d[f"vllm:prompt_tokens_total{labels}"] == 3 * len(prompt)
    assert d[f"vllm:generation_tokens_total{labels}"] == 4 + 4 + 1
    # A gap between consecutive tokens: 3 in each 4-token choice, none in the 1-token one.
    for name in ("inter_token_latency_seconds", "time_per_output_token_seconds"):
        assert d[f"vllm:{name}_count{labels}"] == 6, name
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert d[f"vllm:{name}_count{labels}"] == 3, name
    assert d[f"vllm:request_generation_tokens_sum{labels}"] == 9
    # vLLM's phases: inference = prefill + decode; the 1-token request decodes for 0 s.
    assert d[f"vllm:request_inference_time_seconds_sum{labels}"] == pytest.approx(
        d[f"vllm:request_prefill_time_seconds_sum{labels}"]
        + d[f"vllm:request_decode_time_seconds_sum{labels}"], rel=1e-6)
    tpot_zero = f'vllm:request_time_per_output_token_seconds_bucket{{engine="0",le="0.01",' \
                f'model_name="{MODEL}"}}'
    assert d[tpot_zero] >= 1


WATCHED = ("gptq_kv_cache_blocks_total", "gptq_kv_cache_blocks_free",
           "gptq_kv_cache_blocks_cached", "gptq_kv_cache_usage_ratio",
           "gptq_num_requests_running")


def gauges(text: str) -> dict[str, float]:
    """The WATCHED unlabelled gauges of a /metrics text."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in WATCHED:
            out[name] = float(value)
    assert set(out) == set(WATCHED), out
    return out


async def test_an_overfull_cache_preempts_and_every_answer_survives(
        server: ServerProcess, tiny_checkpoint: Path, tokenizer: Tokenizer) -> None:
    """Four greedy streams whose full lengths need 4 x 6 or 7 blocks share a pool of 16: they are
    preempted (recomputed later) over and over, yet each ends exactly as the reference says,
    the metrics watched meanwhile stay consistent, and every block comes back."""
    rng = random.Random(5)
    ordinary = [t for t in range(tokenizer.vocab_size) if t not in tokenizer.special_token_ids]
    assert tokenizer.bos_token_id is not None
    prompts = [[tokenizer.bos_token_id, *rng.choices(ordinary, k=5 + i)] for i in range(4)]
    max_tokens = 42
    seen: list[dict[str, float]] = []

    async def stream(client: httpx.AsyncClient, prompt: list[int]) -> list[str]:
        r = await client.post(C, json={"model": MODEL, "prompt": prompt, "stream": True,
                                       "max_tokens": max_tokens, "temperature": 0,
                                       "ignore_eos": True, "logprobs": 0})
        assert r.status_code == 200, r.text
        data = sse_data(r.text)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(x) for x in data[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        return [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]

    async def watch(done: asyncio.Event) -> None:
        # The gauges alone, read on this loop: a full parse of every family takes longer than
        # the engine's steps, and the run lasts a few of them.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as scraper:
            while not done.is_set():
                seen.append(gauges((await scraper.get("/metrics")).text))
                await asyncio.sleep(0.005)

    with MetricsWatch(server.url) as totals:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(done))
            outputs = await asyncio.gather(*(stream(client, p) for p in prompts))
            done.set()
            await watcher
    reference = GreedyReference(tiny_checkpoint)
    for prompt, tokens in zip(prompts, outputs, strict=True):
        assert tokens == tokenizer.token_strings(reference.greedy(prompt, max_tokens))

    d = totals.delta
    assert d["gptq_num_preemptions_total"] > 0
    # A recomputed prefill is neither prompt nor generated work a client asked for.
    assert d["gptq_generation_tokens_total"] == 4 * max_tokens
    assert d["gptq_prompt_tokens_total"] == sum(len(p) for p in prompts)
    assert d[finished("length")] == 4
    assert any(m["gptq_num_requests_running"] > 0 for m in seen), "no scrape saw the run"
    for m in seen:
        total, free = m["gptq_kv_cache_blocks_total"], m["gptq_kv_cache_blocks_free"]
        cached = m["gptq_kv_cache_blocks_cached"]
        assert total == NUM_BLOCKS and min(free, cached) >= 0 and free + cached <= total
        assert m["gptq_kv_cache_usage_ratio"] == pytest.approx((total - free - cached) / total)
        assert m["gptq_num_requests_running"] <= 4
    assert max(m["gptq_kv_cache_usage_ratio"] for m in seen) > 0.5
    after = scrape_when_idle(server.url)
    assert after["gptq_kv_cache_blocks_free"] + after["gptq_kv_cache_blocks_cached"] \
        == NUM_BLOCKS
    assert after["gptq_kv_cache_usage_ratio"] == 0
    assert after["gptq_num_requests_running"] == after["gptq_num_requests_waiting"] == 0


async def test_hanging_up_on_preempted_and_waiting_streams_frees_every_block(
        server: ServerProcess) -> None:
    """Six long streams on a pool that holds about two of them: some run, some wait, some
    have been preempted when their clients hang up; all of them are aborted and every block
    comes back."""
    async def hang_up_after(client: httpx.AsyncClient, i: int, frames: int) -> None:
        async with client.stream("POST", C, json={
                "model": MODEL, "prompt": f"Story number {i}", "stream": True,
                "max_tokens": 100, "ignore_eos": True}) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= frames:
                    return

    with MetricsWatch(server.url) as watch:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            # The first two read well into their answers, so the pool fills and the others
            # are preempted or kept waiting; the last ones leave at their first token.
            await asyncio.gather(*(hang_up_after(client, i, 60 if i < 2 else 1)
                                   for i in range(6)))
        after = scrape_when_idle(server.url, timeout=10)
    assert after["gptq_num_requests_running"] == after["gptq_num_requests_waiting"] == 0
    assert after["gptq_kv_cache_blocks_free"] + after["gptq_kv_cache_blocks_cached"] \
        == NUM_BLOCKS
    assert after["gptq_kv_cache_usage_ratio"] == 0
    assert watch.delta[finished("abort")] == 6
    assert watch.delta["gptq_num_preemptions_total"] > 0, "the pool never ran dry"
    assert watch.delta["gptq_generation_tokens_total"] < 6 * 100
