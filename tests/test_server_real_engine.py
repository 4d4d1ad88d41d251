"""End to end: the real `gptq-serve serve` command over a tiny synthetic GPTQ checkpoint on the
CPU. Greedy output through the API equals transformers' LlamaForCausalLM on the dequantised
weights; the SDK works; disconnected streams free their KV blocks; SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from engine.checkpoint.loader import load_checkpoint
from engine.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import ServerProcess, scrape, scrape_when_idle, sse_data
from tests.reference import reference_model
from tests.schemas.validate import validate

MODEL = "tiny-gptq"
KEY = "sk-real"
AUTH = {"Authorization": f"Bearer {KEY}"}
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("real") / "server.log"
    srv = ServerProcess.real(tiny_checkpoint, log, "--served-model-name", MODEL,
                             "--api-key", KEY, "--device", "cpu", "--dtype", "float32",
                             "--max-model-len", "512", "--num-kv-blocks", "512",
                             "--max-num-seqs", "16", "--max-num-batched-tokens", "256",
                             "--log-format", "json")
    with srv.start(timeout=120):
        yield srv


def reference_greedy(checkpoint: Path, prompt: list[int], n: int) -> list[int]:
    model = reference_model(load_checkpoint(str(checkpoint), None, offline=True))
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.url + path, json={"model": MODEL, **body}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_output_equals_the_transformers_reference(server: ServerProcess,
                                                         tiny_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    prompt = "The quick brown fox jumps over the lazy dog"
    expected = tokenizer.token_strings(reference_greedy(
        tiny_checkpoint, tokenizer.encode(prompt), NUM_TOKENS))
    done = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": NUM_TOKENS,
                                            "temperature": 0, "ignore_eos": True,
                                            "logprobs": 0})
    validate("CreateCompletionResponse", done)
    assert done["choices"][0]["logprobs"]["tokens"] == expected
    assert done["usage"]["completion_tokens"] == NUM_TOKENS

    messages = [{"role": "user", "content": "Name three colours."}]
    prompt_ids = post(server, "/tokenize", {"messages": messages})["tokens"]
    expected = tokenizer.token_strings(reference_greedy(tiny_checkpoint, prompt_ids, 8))
    reply = post(server, "/v1/chat/completions", {
        "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "logprobs": True, "stop": []})
    validate("CreateChatCompletionResponse", reply)
    assert [e["token"] for e in reply["choices"][0]["logprobs"]["content"]] == expected


def test_the_sdk_streams_and_seeds_against_the_real_engine(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                           _strict_response_validation=True)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True}, seed=3, temperature=0.8))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, seed=3,
        temperature=0.8)
    assert again.choices[0].message.content == text
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "prompt": ["one", "two"], "n": 2, "max_tokens": 4, "stream": True,
        "echo": True, "logprobs": 1})
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    for payload in data[:-1]:
        validate("CreateCompletionStreamChunk", json.loads(payload))


async def test_disconnected_streams_free_every_kv_block(server: ServerProcess) -> None:
    async def hang_up_after_two(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": f"Tell a long story number {i}", "max_tokens": 400,
                "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    return

    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
        await asyncio.gather(*(hang_up_after_two(client, i) for i in range(10)))
    m = scrape_when_idle(server.url, timeout=10)
    assert m["gptq_num_requests_running"] == 0 and m["gptq_num_requests_waiting"] == 0
    # Every block is free or cached for reuse: none is held.
    assert m["gptq_kv_cache_blocks_total"] == 512 and m["gptq_kv_cache_usage_ratio"] == 0
    assert m["gptq_kv_cache_blocks_free"] + m["gptq_kv_cache_blocks_cached"] == 512
    # 10 x 400 tokens were asked for; the aborts stopped them long before.
    assert m["gptq_generation_tokens_total"] < 2000
    assert m['gptq_request_success_total{finish_reason="abort"}'] >= 10


async def test_64_concurrent_streams_all_finish_on_the_real_engine(server: ServerProcess) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> list[str]:
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": f"Question {i}?"}],
            "max_tokens": 8, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}})
        assert r.status_code == 200
        return sse_data(r.text)

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120,
                                 limits=limits) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(64)))
    for data in results:
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 8
    m = scrape_when_idle(server.url)
    assert m["gptq_kv_cache_blocks_free"] + m["gptq_kv_cache_blocks_cached"] \
        == m["gptq_kv_cache_blocks_total"]


# Start-up stages in the order the log reports them (engine and app), each one JSON line.
START_UP = [("app.lifecycle", "engine: "), ("engine.checkpoint.loader", "checkpoint "),
            ("engine.checkpoint.loader", "reading weights: "),
            ("engine.core.llm_engine", "tokenizer: "), ("engine.core.llm_engine", "model: "), ("engine.core.llm_engine", "kernels: "),
            ("engine.core.build", "KV cache: "), ("engine.core.runner", "KV cache: "),
            ("app.lifecycle", "warm-up: "),
            ("app.lifecycle", "serving ")]


def test_the_log_is_json_lines_telling_each_start_up_stage_and_no_secrets(
        server: ServerProcess) -> None:
    secret = "a-prompt-only-the-client-knows"
    post(server, "/v1/completions", {"prompt": f"Tell me {secret}", "max_tokens": 2})
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert all({"timestamp", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records), "uvicorn's own lines"
    stages = [next(i for i, r in enumerate(records)
                   if r["logger"] == logger and r["message"].startswith(prefix))
              for logger, prefix in START_UP]
    assert stages == sorted(stages), [records[i]["message"] for i in stages]
    weights = [r for r in records if r.get("stage") == "reading weights"]
    assert [(r["done"], r["total"]) for r in weights] == [(1, 2), (2, 2)]  # tiny: 2 layers
    assert 0 < weights[0]["bytes"] < weights[1]["bytes"]
    serving = records[stages[-1]]
    assert serving["url"] == f"{server.url}/v1" and serving["kv_cache_tokens"] == 512 * 16
    assert f"serving {MODEL} at {server.url}/v1:" in serving["message"]
    assert "4-bit, group 32, act-order on" in serving["message"]
    assert "linear torch, attention torch on cpu" in serving["message"]
    # The tiny checkpoint comes from `gptq-serve synth`: the log says its text is gibberish.
    assert any(r["level"] == "WARNING" and "gibberish" in r["message"] for r in records)
    text = server.log()
    assert KEY not in text and secret not in text


def test_metrics_describe_the_loaded_model_and_sigterm_exits_0(server: ServerProcess) -> None:
    info = [k for k, v in scrape(server.url).items() if k.startswith("gptq_model_info{") and v == 1]
    assert info == ['gptq_model_info{act_order="true",attention_backend="torch",bits="4",'
                    'group_size="32",linear_backend="torch",model="' + str(server.argv[3]) +
                    '",revision=""}']
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.log()
