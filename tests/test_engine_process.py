"""The engine core in its own process, through the EngineClient the app uses: concurrent
generations, aborts on early close and by id, prompt refusal in the front, stop strings that
stop the core, stats, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from engine.client import EngineDeadError
from engine.frontend.client import EngineProcessClient
from engine.frontend.spawn import CoreProcessOptions, EngineStartError
from engine.outputs import EngineStats, FinishReason, GenerationDelta, TokenLogprob
from engine.params import SamplingParams
from tests.conftest import cpu_engine_config

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_checkpoint: Path) -> AsyncIterator[EngineProcessClient]:
    eng = await asyncio.to_thread(EngineProcessClient.launch, cpu_engine_config(tiny_checkpoint))
    await eng.start()
    yield eng
    await eng.shutdown()


async def collect(engine: EngineProcessClient, prompt: list[int], params: SamplingParams,
                  request_id: str) -> list[GenerationDelta]:
    return [d async for d in engine.generate(prompt, params, request_id)]


async def wait_until_idle(engine: EngineProcessClient) -> EngineStats:
    for _ in range(300):
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 \
                and s.num_kv_blocks_free + s.num_kv_blocks_cached == s.num_kv_blocks_total:
            return s
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine still busy: {engine.stats()}")


async def test_concurrent_generations_finish_and_free_every_block(
        engine: EngineProcessClient) -> None:
    before = engine.stats().num_generation_tokens_total
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [engine.tokenizer.encode(f"Request number {i} says") for i in range(8)]
    results = await asyncio.gather(*(collect(engine, p, params, f"r{i}")
                                     for i, p in enumerate(prompts)))
    for deltas in results:
        assert deltas[-1].finish_reason == FinishReason.LENGTH
        assert sum(len(d.token_ids) for d in deltas) == 8
        assert all(d.finish_reason is None for d in deltas[:-1])
    stats = await wait_until_idle(engine)
    assert stats.num_generation_tokens_total - before == 64 and stats.loop_alive


async def test_closing_the_iterator_aborts_the_request_in_the_core(
        engine: EngineProcessClient) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    before = engine.stats().num_generation_tokens_total
    stream = engine.generate(engine.tokenizer.encode("Tell me a long story"), params, "long")
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    stats = await wait_until_idle(engine)
    # The core stopped within a few steps of the abort, not after 500 tokens.
    assert stats.num_generation_tokens_total - before < 50


async def test_abort_by_id_ends_the_stream_with_abort(engine: EngineProcessClient) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    deltas = []
    async for d in engine.generate(engine.tokenizer.encode("Go on"), params, "victim"):
        deltas.append(d)
        if len(deltas) == 2:
            engine.abort("victim")
    assert deltas[-1].finish_reason == FinishReason.ABORT
    assert all(d.finish_reason is None for d in deltas[:-1])
    # The ABORT delta is queued behind the token deltas that had already arrived (none on an
    # idle machine, a dozen or so when the test's process lags the core on a loaded two-core
    # machine) and nothing follows it: the core stopped within a few steps, not at 500.
    assert 3 <= len(deltas) < 50
    await wait_until_idle(engine)


async def test_a_stop_string_found_by_the_front_stops_the_core(
        engine: EngineProcessClient) -> None:
    prompt = engine.tokenizer.encode("Hello")
    full = await collect(engine, prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                                        ignore_eos=True), "full")
    text = "".join(d.text for d in full)
    stop = text[5:8]
    before = engine.stats().num_generation_tokens_total
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True, stop=(stop,))
    cut = await collect(engine, prompt, params, "cut")
    assert "".join(d.text for d in cut) == text[:text.index(stop)]
    assert cut[-1].finish_reason == FinishReason.STOP and cut[-1].stop_reason == stop
    stats = await wait_until_idle(engine)
    assert stats.num_generation_tokens_total - before < 60


async def test_bad_prompts_are_refused_by_the_front(engine: EngineProcessClient) -> None:
    for bad in ([], [10**9], [1] * 1024):
        with pytest.raises(ValueError):
            await collect(engine, bad, SamplingParams(), "bad")
    with pytest.raises(ValueError, match="already in use"):
        first = engine.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True),
                                "dup")
        await first.__anext__()
        try:
            await collect(engine, [1, 2, 3], SamplingParams(), "dup")
        finally:
            await first.aclose()
    await wait_until_idle(engine)


async def test_logprobs_and_prompt_logprobs_cross_the_process(
        engine: EngineProcessClient) -> None:
    prompt = engine.tokenizer.encode("Counting: one two three four")
    deltas = await collect(engine, prompt, SamplingParams(
        temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True), "lp")
    first = deltas[0]
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(prompt)
    assert first.prompt_logprobs[0] is None
    assert all(isinstance(e, TokenLogprob) and len(e.top) == 2
               for e in first.prompt_logprobs[1:])
    for d in deltas:
        assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
        for lp in d.logprobs:
            assert lp.top[0][0] == lp.token_id and len(lp.top) == 3
    t = deltas[-1].timings
    assert t is not None and t.arrival <= (t.first_scheduled or 0) <= (t.first_token or 0)


async def test_shutdown_aborts_requests_in_flight(tiny_checkpoint: Path) -> None:
    eng = await asyncio.to_thread(EngineProcessClient.launch, cpu_engine_config(tiny_checkpoint))
    await eng.start()
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    task = asyncio.create_task(collect(eng, eng.tokenizer.encode("Forever"), params, "x"))
    while eng.stats().num_generation_tokens_total < 3:
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await eng.shutdown()
    deltas = await asyncio.wait_for(task, 10)
    assert deltas[-1].finish_reason == FinishReason.ABORT
    assert deltas[-1].error == "the server is shutting down"
    assert time.monotonic() - t0 < 10
    assert not eng.stats().loop_alive and eng.pid is not None
    assert not _alive(eng.pid)
    with pytest.raises(EngineDeadError):
        await collect(eng, [1, 2], SamplingParams(), "late")


async def test_a_core_that_cannot_load_fails_the_launch(tmp_path: Path) -> None:
    with pytest.raises(EngineStartError, match="failed to start"):
        await asyncio.to_thread(EngineProcessClient.launch, cpu_engine_config(
            tmp_path / "missing"), CoreProcessOptions(warmup=False))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
