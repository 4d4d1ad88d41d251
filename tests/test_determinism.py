"""Determinism against the real `gptq-serve serve` on the CPU (tiny model): a seeded request
gives the same text alone and inside a batch of 32 mixed requests, and greedy text does not
depend on what it is batched with."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_engine import ServerProcess
from tests.reliability import Figures, idle_metrics
from tests.server import real_server, serving

MODEL = "tiny-gptq"
SEEDED = {"prompt": "Once upon a time in a quiet town", "max_tokens": 24, "temperature": 0.9,
          "top_p": 0.95, "seed": 1234, "ignore_eos": True}
GREEDY = {"prompt": "The capital of the tiny kingdom", "max_tokens": 24, "temperature": 0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("determinism") / "server.log"
    srv = real_server(tiny_checkpoint, log, "--served-model-name", MODEL, "--max-model-len",
                      "512", "--num-kv-blocks", "512", "--max-num-seqs", "32",
                      "--max-num-batched-tokens", "128")
    with serving(srv):
        yield srv


def mixed(i: int, rng: random.Random) -> dict[str, Any]:
    """One of 32 different neighbours: lengths, sampling, n, logprobs, penalties vary."""
    words = " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randrange(1, 90)))
    body: dict[str, Any] = {"prompt": f"Neighbour {i}: {words}", "max_tokens": rng.randrange(4, 40),
                            "temperature": rng.choice([0, 0.5, 1.0, 1.3]), "ignore_eos": True}
    if i % 3 == 0:
        body["seed"] = rng.randrange(10**6)
    if i % 4 == 0:
        body["n"] = 2
    if i % 5 == 0:
        body["logprobs"] = 3
    if i % 6 == 0:
        body.update(top_k=20, presence_penalty=0.5, repetition_penalty=1.2)
    return body


async def texts(client: httpx.AsyncClient, body: dict[str, Any]) -> list[str]:
    r = await client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


async def test_seeded_and_greedy_text_is_the_same_alone_and_in_a_batch_of_32(
        server: ServerProcess) -> None:
    rng = random.Random(5)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        seeded_alone = await texts(client, SEEDED)
        greedy_alone = await texts(client, GREEDY)
        # 32 requests at once: 3 copies of each probe among 26 different neighbours, the
        # probes at different places (so in different batch rows and prefill chunks).
        bodies = [mixed(i, rng) for i in range(26)]
        for k in range(3):
            bodies.insert(rng.randrange(len(bodies) + 1), SEEDED)
            bodies.insert(rng.randrange(len(bodies) + 1), GREEDY | {"max_tokens": 24 + k})
        assert len(bodies) == 32
        results = await asyncio.gather(*(texts(client, b) for b in bodies))
        # And a seeded request with n = 3: choice i is seed + i, each as it would be alone.
        n3 = await texts(client, SEEDED | {"n": 3})
        singles = [await texts(client, SEEDED | {"seed": SEEDED["seed"] + i}) for i in range(3)]
    seeded_in_batch = [r for b, r in zip(bodies, results, strict=True) if b is SEEDED]
    greedy_in_batch = [r[0] for b, r in zip(bodies, results, strict=True)
                       if b.get("prompt") == GREEDY["prompt"]]
    figures = Figures("determinism")
    figures.add(batch=len(bodies), seeded_copies=len(seeded_in_batch),
                greedy_copies=len(greedy_in_batch))
    figures.print()
    assert all(r == seeded_alone for r in seeded_in_batch)
    # Greedy copies asked for 24, 25, 26 tokens: each extends the text it gives alone.
    assert all(g.startswith(greedy_alone[0]) for g in greedy_in_batch), (greedy_alone,
                                                                           greedy_in_batch)
    assert n3 == [s[0] for s in singles]
    idle_metrics(server)
