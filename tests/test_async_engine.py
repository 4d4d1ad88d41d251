"""The asyncio front: concurrent generate() calls, aborts on early close, stats, shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.core.async_engine import AsyncEngine
from engine.outputs import FinishReason, GenerationDelta
from engine.params import SamplingParams
from tests.conftest import cpu_engine_config


@pytest.fixture
async def engine(tiny_checkpoint: Path):
    eng = AsyncEngine.from_config(cpu_engine_config(tiny_checkpoint))
    await eng.start()
    yield eng
    await eng.shutdown()


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams,
                  request_id: str) -> list[GenerationDelta]:
    return [d async for d in engine.generate(prompt, params, request_id)]


async def wait_until_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


async def test_concurrent_generations_finish_and_free_every_block(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [engine.tokenizer.encode(f"Request number {i} says") for i in range(8)]
    results = await asyncio.gather(*(collect(engine, p, params, f"r{i}")
                                     for i, p in enumerate(prompts)))
    for deltas in results:
        assert deltas[-1].finish_reason == FinishReason.LENGTH
        assert sum(len(d.token_ids) for d in deltas) == 8
        assert all(d.finish_reason is None for d in deltas[:-1])
    await wait_until_idle(engine)
    stats = engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    assert stats.num_generation_tokens_total == 64 and stats.loop_alive


async def test_closing_the_iterator_aborts_the_request(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    stream = engine.generate(engine.tokenizer.encode("Tell me a long story"), params, "long")
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    await wait_until_idle(engine)
    stats = engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


async def test_abort_by_id_ends_the_stream_with_abort(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    deltas = []
    async for d in engine.generate(engine.tokenizer.encode("Go on"), params, "victim"):
        deltas.append(d)
        if len(deltas) == 2:
            engine.abort("victim")
    assert deltas[-1].finish_reason == FinishReason.ABORT
    assert len(deltas) < 500


async def test_bad_prompt_raises_before_anything_is_queued(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError):
        await collect(engine, [], SamplingParams(), "empty")
    with pytest.raises(ValueError):
        await collect(engine, [10**9], SamplingParams(), "oov")
    assert engine.stats().num_waiting == 0


async def test_shutdown_aborts_requests_in_flight(tiny_checkpoint: Path) -> None:
    eng = AsyncEngine.from_config(cpu_engine_config(tiny_checkpoint))
    await eng.start()
    params = SamplingParams(temperature=0.0, max_tokens=100_000 // 100, ignore_eos=True)
    task = asyncio.create_task(collect(eng, eng.tokenizer.encode("Forever"), params, "x"))
    await asyncio.sleep(0.3)
    await eng.shutdown()
    deltas = await asyncio.wait_for(task, 10)
    assert deltas[-1].finish_reason == FinishReason.ABORT
    assert not eng.stats().loop_alive
