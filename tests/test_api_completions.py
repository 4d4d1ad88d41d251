"""/v1/completions through the real `gptq-serve serve` process over a tiny GPTQ checkpoint on the
CPU, checked against transformers' LlamaForCausalLM on the same dequantised weights: greedy
tokens and their log-probabilities, whatever the batch around a request (concurrent prompts of
different lengths, a prompt long enough to be prefilled in chunks), seeded sampling that does
not depend on the batch, the sampling parameters reaching the engine, and text offsets that
stay aligned with the text when a special token is generated."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import ServerProcess
from tests.schemas.validate import validate
from tests.server import GreedyReference, post_ok, real_server, serving

MODEL = "tiny"
C = "/v1/completions"
NUM_TOKENS = 8
# float32 engine against float32 transformers: only summation order differs.
LOGPROB_TOL = 1e-3
# A step prefills at most this many tokens, so a longer prompt is prefilled in chunks while
# other sequences decode.
STEP_TOKENS = 64


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("completions") / "server.log"
    srv = real_server(tiny_checkpoint, log, "--served-model-name", MODEL,
                      "--max-model-len", "256", "--num-kv-blocks", "128", "--max-num-seqs", "8",
                      "--max-num-batched-tokens", str(STEP_TOKENS))
    with serving(srv):
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> GreedyReference:
    return GreedyReference(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_checkpoint)


def complete(server: ServerProcess, **body: Any) -> dict[str, Any]:
    return post_ok(server, C, {"model": MODEL, **body})


async def complete_async(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post(C, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    validate("CreateCompletionResponse", r.json())
    return r.json()


def random_prompt(tokenizer: Tokenizer, rng: random.Random, length: int) -> list[int]:
    """BOS and ``length`` ordinary token ids (none special: an EOS in a prompt is legal but
    would make the reference's context unlike a real prompt)."""
    ordinary = [t for t in range(tokenizer.vocab_size) if t not in tokenizer.special_token_ids]
    assert tokenizer.bos_token_id is not None
    return [tokenizer.bos_token_id, *rng.choices(ordinary, k=length)]


def test_greedy_tokens_and_logprobs_equal_the_reference(
        server: ServerProcess, reference: GreedyReference, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    done = complete(server, prompt=prompt, max_tokens=NUM_TOKENS, temperature=0,
                    ignore_eos=True, logprobs=3, echo=True)
    ids = prompt + reference.greedy(prompt, NUM_TOKENS)
    expected = reference.logprobs(ids, 3)
    choice = done["choices"][0]
    assert choice["finish_reason"] == "length"
    # Prompt logprobs need every prompt position computed: no prefix-cache hit.
    assert done["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": NUM_TOKENS,
                             "total_tokens": len(prompt) + NUM_TOKENS,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert choice["text"] == tokenizer.decode(ids)
    lp = choice["logprobs"]
    # Echoed: every token after BOS (which has no logprob), prompt and completion alike.
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) - 1
    assert lp["tokens"][len(prompt) - 1:] == tokenizer.token_strings(ids[len(prompt):])
    for position, (got, got_top, want) in enumerate(zip(
            lp["token_logprobs"], lp["top_logprobs"], expected, strict=True)):
        assert got == pytest.approx(want.logprob, abs=LOGPROB_TOL), position
        strings = tokenizer.token_strings([t for t, _ in want.top])
        want_top = {s: v for s, (_, v) in zip(strings, want.top, strict=True)}
        assert got_top.keys() == want_top.keys(), position
        for s, v in want_top.items():
            assert got_top[s] == pytest.approx(v, abs=LOGPROB_TOL), (position, s)
    # Greedy: each generated token is the most likely one where it stands.
    for got, got_top in zip(lp["token_logprobs"][len(prompt) - 1:],
                            lp["top_logprobs"][len(prompt) - 1:], strict=True):
        assert got == pytest.approx(max(got_top.values()))


async def test_concurrent_prompts_each_get_their_own_greedy_answer(
        server: ServerProcess, reference: GreedyReference, tokenizer: Tokenizer) -> None:
    """Batching must not leak between sequences: four prompts (one prefilled in chunks) in
    flight together, plus one request with two prompts and n=2, each equal the reference."""
    rng = random.Random(3)
    prompts = [random_prompt(tokenizer, rng, n) for n in (2, 17, 40, STEP_TOKENS + 30)]
    pair = [random_prompt(tokenizer, rng, n) for n in (9, 25)]
    body = {"max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        *singles, both = await asyncio.gather(
            *(complete_async(client, prompt=p, **body) for p in prompts),
            complete_async(client, prompt=pair, n=2, **body))
    for prompt, done in zip(prompts, singles, strict=True):
        want = tokenizer.token_strings(reference.greedy(prompt, NUM_TOKENS))
        assert done["choices"][0]["logprobs"]["tokens"] == want, len(prompt)
        assert done["usage"]["prompt_tokens"] == len(prompt)
    # Choices of a multi-prompt request: index = prompt index * n + choice.
    by_index = {c["index"]: c["logprobs"]["tokens"] for c in both["choices"]}
    for i, prompt in enumerate(pair):
        want = tokenizer.token_strings(reference.greedy(prompt, NUM_TOKENS))
        assert by_index[2 * i] == by_index[2 * i + 1] == want, i
    assert both["usage"]["prompt_tokens"] == sum(len(p) for p in pair)
    assert both["usage"]["completion_tokens"] == 4 * NUM_TOKENS


async def test_a_seeded_request_samples_the_same_text_in_any_batch(
        server: ServerProcess) -> None:
    seeded = {"prompt": "Once upon a time", "max_tokens": NUM_TOKENS, "temperature": 1.0,
              "top_p": 0.95, "ignore_eos": True, "seed": 1234}
    alone = complete(server, **seeded)["choices"][0]["text"]
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        crowded, *_ = await asyncio.gather(
            complete_async(client, **seeded),
            *(complete_async(client, prompt=f"Other prompt {i}", max_tokens=NUM_TOKENS,
                             temperature=1.0, ignore_eos=True) for i in range(3)))
    assert crowded["choices"][0]["text"] == alone
    reseeded = complete(server, **{**seeded, "seed": 4321})["choices"][0]["text"]
    assert reseeded != alone


def test_sampling_parameters_reach_the_engine(server: ServerProcess, reference: GreedyReference,
                                              tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Hello there")
    greedy_ids = reference.greedy(prompt, 6)
    base = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, "logprobs": 0}

    def tokens(**body: Any) -> list[str]:
        return complete(server, **{**base, **body})["choices"][0]["logprobs"]["tokens"]

    greedy = tokenizer.token_strings(greedy_ids[:4])
    assert tokens(temperature=0) == greedy
    # Hot sampling cut down to the single most likely token is greedy again.
    assert tokens(temperature=1.5, top_k=1) == greedy
    assert tokens(temperature=1.5, min_p=1.0) == greedy
    # logit_bias: -100 bans a token, +100 forces one.
    assert tokens(temperature=0, logit_bias={str(greedy_ids[0]): -100})[0] != greedy[0]
    forced = 500
    assert tokens(temperature=0, logit_bias={str(forced): 100}) == \
        tokenizer.token_strings([forced]) * 4
    # A stop token id ends the completion at its first occurrence, counted as generated.
    stop_id = greedy_ids[2]
    stopped = complete(server, **{**base, "temperature": 0, "max_tokens": 6,
                                  "stop_token_ids": [stop_id]})
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == greedy_ids.index(stop_id) + 1


def test_generated_special_tokens_keep_text_offsets_aligned(server: ServerProcess) -> None:
    """A special token (BOS forced by logit_bias) is skipped from the text by default, so it
    adds no characters and the offsets after it must not move; kept, it is text like any
    other."""
    prompt = "Hello"
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "logit_bias": {"1": 100}, "logprobs": 0}
    skipped = complete(server, **body)["choices"][0]
    assert skipped["text"] == ""
    assert skipped["logprobs"]["tokens"] == ["<s>"] * 3
    assert skipped["logprobs"]["text_offset"] == [len(prompt)] * 3
    kept = complete(server, **body, skip_special_tokens=False)["choices"][0]
    assert kept["text"] == "<s>" * 3
    assert kept["logprobs"]["text_offset"] == [len(prompt) + 3 * i for i in range(3)]


async def test_an_out_of_range_seed_is_a_400_and_harms_no_other_request(
        server: ServerProcess) -> None:
    """The schema's seed is an int64. One outside it must be refused up front: reaching the
    engine, it would fail the whole step and with it every request in the batch."""
    bad_seeds = (2**64, -(2**63) - 1, 2**63)
    refusals: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client, \
            client.stream("POST", C, json={
                "model": MODEL, "prompt": "An innocent bystander", "max_tokens": 40,
                "ignore_eos": True, "temperature": 0, "stream": True}) as bystander:
        lines = bystander.aiter_lines()
        first = await anext(lines)
        assert first.startswith("data: {"), first
        for seed in bad_seeds:
            refusals.append(await client.post(C, json={
                "model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 1,
                "seed": seed}))
        rest = [line[len("data: "):] async for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert not [payload for payload in rest if "error" in payload], "the bystander failed"
    for seed, r in zip(bad_seeds, refusals, strict=True):
        assert r.status_code == 400, (seed, r.text)
        assert r.json()["error"]["param"] == "seed"
    ok = complete(server, prompt="x", max_tokens=2, temperature=1, n=2, seed=2**63 - 1)
    assert len(ok["choices"]) == 2


@pytest.mark.parametrize(("path", "raw", "param"), [
    (C, '{"model": "tiny", "prompt": "a \\ud800 b", "max_tokens": 2}', "prompt"),
    (C, '{"model": "tiny", "prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": 2, "messages": '
     '[{"role": "user", "content": "\\ud83d"}]}', "messages"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
], ids=["prompt", "prompt-list", "chat-content", "tokenize"])
def test_text_that_is_not_unicode_is_a_400(server: ServerProcess, path: str, raw: str,
                                           param: str) -> None:
    """JSON may escape a lone UTF-16 surrogate, which no tokenizer can encode."""
    r = httpx.post(server.url + path, content=raw, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert (r.json()["error"]["param"] or "").startswith(param)
