"""Prefix caching as clients and operators see it, against real `gptq-serve serve` processes on
the CPU engine: ``usage.prompt_tokens_details.cached_tokens`` (completions and chat, streamed
and not, n > 1, the official schemas and the OpenAI SDK in strict mode), the prefix-cache
metrics, and ``--no-prefix-caching``; answers stay the transformers reference's."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import ServerProcess, scrape_when_idle, sse_data
from tests.schemas.validate import validate
from tests.server import GreedyReference, MetricsWatch, post_ok, real_server, serving

MODEL = "tiny"
C, CHAT = "/v1/completions", "/v1/chat/completions"
BLOCK = 16
FLAGS = ("--served-model-name", MODEL, "--max-model-len", "256", "--num-kv-blocks", "64",
         "--max-num-seqs", "8", "--max-num-batched-tokens", "128")


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(caching on, the default; caching off), started in parallel."""
    logs = tmp_path_factory.mktemp("prefix")
    on = real_server(tiny_checkpoint, logs / "on.log", *FLAGS)
    off = real_server(tiny_checkpoint, logs / "off.log", *FLAGS, "--no-prefix-caching")
    with serving(on, off):
        yield on, off


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_checkpoint)


def prompt_of(tokenizer: Tokenizer, rng: random.Random, length: int) -> list[int]:
    ordinary = [t for t in range(tokenizer.vocab_size) if t not in tokenizer.special_token_ids]
    assert tokenizer.bos_token_id is not None
    return [tokenizer.bos_token_id, *rng.choices(ordinary, k=length - 1)]


def cached(response: dict[str, Any]) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]


def tokens(server: ServerProcess, **body: Any) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def expected_hit(earlier: list[int], prompt: list[int]) -> int:
    """What a prompt finds cached after ``earlier`` ran: the whole blocks of their common
    prefix, leaving at least its own last token to compute."""
    pairs = zip(earlier, prompt, strict=False)  # the shorter one ends the common prefix
    common = next((i for i, (a, b) in enumerate(pairs) if a != b),
                  min(len(earlier), len(prompt)))
    return min(common, len(prompt) - 1) // BLOCK * BLOCK


def greedy_body(**body: Any) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0, "ignore_eos": True, "max_tokens": 6,
            "logprobs": 0, **body}


def test_completions_report_the_reused_prefix_and_the_metrics_count_it(
        servers: tuple[ServerProcess, ServerProcess], tokenizer: Tokenizer,
        tiny_checkpoint: Path) -> None:
    on, off = servers
    rng = random.Random(1)
    shared = prompt_of(tokenizer, rng, 40)  # 2 full blocks and 8 tokens
    first, second = (shared + prompt_of(tokenizer, rng, 10)[1:] for _ in range(2))
    answers = {}
    for srv in (on, off):
        with MetricsWatch(srv.url) as watch:
            a = post_ok(srv, C, greedy_body(prompt=first))
            b = post_ok(srv, C, greedy_body(prompt=second))
        answers[srv.url] = b["choices"][0]["logprobs"]["tokens"]
        caching = srv is on
        assert (cached(a), cached(b)) == ((0, 2 * BLOCK) if caching else (0, 0))
        assert b["usage"]["prompt_tokens"] == len(second)
        d = watch.delta
        assert d["gptq_prefix_cache_queries_total"] == (len(first) + len(second)) * caching
        assert d["gptq_prefix_cache_hits_total"] == 2 * BLOCK * caching
        assert d["gptq_prompt_tokens_total"] == len(first) + len(second)
        idle = scrape_when_idle(srv.url)
        assert idle["gptq_kv_cache_usage_ratio"] == 0
        assert idle["gptq_kv_cache_blocks_free"] + idle["gptq_kv_cache_blocks_cached"] \
            == idle["gptq_kv_cache_blocks_total"]
        assert (idle["gptq_kv_cache_blocks_cached"] > 0) == caching
    want = tokenizer.token_strings(GreedyReference(tiny_checkpoint).greedy(second, 6))
    assert answers[on.url] == answers[off.url] == want


def test_n_choices_and_several_prompts_count_each_prompt_once(
        servers: tuple[ServerProcess, ServerProcess], tokenizer: Tokenizer) -> None:
    on, _ = servers
    rng = random.Random(2)
    shared = prompt_of(tokenizer, rng, 3 * BLOCK + 2)
    post_ok(on, C, greedy_body(prompt=shared, max_tokens=1))
    pair = [shared + prompt_of(tokenizer, rng, 5)[1:], shared[:BLOCK + 3] + [7, 8, 9]]
    both = post_ok(on, C, greedy_body(prompt=pair, n=3))
    assert len(both["choices"]) == 6
    assert both["usage"]["prompt_tokens"] == sum(len(p) for p in pair)
    # Every choice of the first prompt found its 3 blocks cached, of the second its 1 block.
    assert cached(both) == 3 * BLOCK + BLOCK
    streamed = httpx.post(on.url + C, timeout=60, json=greedy_body(
        prompt=pair, n=3, stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(x) for x in sse_data(streamed.text)[:-1]]
    for chunk in chunks:
        validate("CreateCompletionStreamChunk", chunk)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == both["usage"]


def test_chat_reuses_the_system_prompt_streamed_and_not(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    on, _ = servers
    system = {"role": "system", "content": " ".join(f"rule {i}: be brief." for i in range(10))}

    def messages(question: str) -> list[dict[str, str]]:
        return [system, {"role": "user", "content": question}]

    def body(question: str, **extra: Any) -> dict[str, Any]:
        return {"model": MODEL, "max_tokens": 4, "temperature": 0,
                "messages": messages(question), **extra}

    first = post_ok(on, CHAT, body("What is a cache?"))
    second = post_ok(on, CHAT, body("Why is the sky blue?", n=2))
    hit = expected_hit(tokens(on, messages=messages("What is a cache?")),
                       tokens(on, messages=messages("Why is the sky blue?")))
    assert cached(first) == 0 and hit >= 4 * BLOCK and cached(second) == hit
    r = httpx.post(on.url + CHAT, timeout=60, json=body(
        "Why is the sky blue?", stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(x) for x in sse_data(r.text)[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    # The same prompt again: all but its last (partial or whole) block was cached.
    again = tokens(on, messages=messages("Why is the sky blue?"))
    assert chunks[-1]["choices"] == [] and cached(chunks[-1]) == expected_hit(again, again)


def test_the_openai_sdk_reads_cached_tokens_in_strict_mode(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    on, _ = servers
    client = openai.OpenAI(base_url=on.url + "/v1", api_key="unused", max_retries=0,
                           _strict_response_validation=True)
    text = "An apple a day keeps the doctor away, " * 8
    client.completions.create(model=MODEL, prompt=text, max_tokens=2)
    done = client.completions.create(model=MODEL, prompt=text + "or so they say.",
                                     max_tokens=2)
    assert done.usage is not None and done.usage.prompt_tokens_details is not None
    hit = expected_hit(tokens(on, prompt=text), tokens(on, prompt=text + "or so they say."))
    assert hit > 0 and done.usage.prompt_tokens_details.cached_tokens == hit
    messages: list[Any] = [{"role": "system", "content": text},
                           {"role": "user", "content": "Is it true?"}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    ids = tokens(on, messages=messages)
    assert chat.usage is not None and chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens == expected_hit(ids, ids) > 0
