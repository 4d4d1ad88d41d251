"""Continuous batching: concurrent requests produce what each produces alone, under preemption
and aborts, and every KV block comes back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.core.llm_engine import LLMEngine
from engine.ipc.messages import CoreFinish
from engine.outputs import FinishReason
from engine.params import SamplingParams
from tests.conftest import cpu_engine_config
from tests.engine_helpers import output_tokens, run_to_completion


def make_requests(engine: LLMEngine, n: int, seed: int = 0
                  ) -> dict[str, tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    requests = {}
    for i in range(n):
        prompt = [engine.tokenizer.bos_token_id or 1] + [rng.randrange(3, vocab)
                                                         for _ in range(rng.randint(3, 60))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 24), ignore_eos=True)
        requests[f"req-{i}"] = (prompt, params)
    return requests


@pytest.fixture(scope="module")
def solo_outputs(tiny_checkpoint: Path) -> dict[str, list[int]]:
    """Each request's tokens when it runs alone."""
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint))
    result = {}
    for rid, request in make_requests(engine, 16).items():
        result[rid] = output_tokens(run_to_completion(engine, {rid: request})[rid])
    return result


def assert_all_blocks_free(engine: LLMEngine) -> None:
    blocks = engine.scheduler.block_manager
    assert blocks.num_available_blocks == blocks.num_blocks
    assert all(blocks.ref_count(b) == 0 for b in range(blocks.num_blocks))
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_sixteen_concurrent_requests_match_their_solo_outputs(
        tiny_checkpoint: Path, solo_outputs: dict[str, list[int]]) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint,
                                                     max_num_batched_tokens=64))
    deltas = run_to_completion(engine, make_requests(engine, 16))
    assert {rid: output_tokens(d) for rid, d in deltas.items()} == solo_outputs
    assert all(d[-1].finish_reason == FinishReason.LENGTH for d in deltas.values())
    assert engine.scheduler.num_preemptions_total == 0
    assert_all_blocks_free(engine)


def test_a_small_kv_pool_preempts_yet_every_output_is_identical(
        tiny_checkpoint: Path, solo_outputs: dict[str, list[int]]) -> None:
    # 8 blocks of 16 tokens: room for only a few of the 16 requests at a time.
    engine = LLMEngine.from_config(cpu_engine_config(
        tiny_checkpoint, num_kv_blocks=8, max_model_len=128, max_num_batched_tokens=64))
    deltas = run_to_completion(engine, make_requests(engine, 16))
    assert engine.scheduler.num_preemptions_total > 0
    assert any(d[-1].num_preemptions > 0 for d in deltas.values())
    assert {rid: output_tokens(d) for rid, d in deltas.items()} == solo_outputs
    assert_all_blocks_free(engine)


def test_aborts_mid_prefill_and_mid_decode_return_every_block(tiny_checkpoint: Path) -> None:
    # A budget of 16 tokens chunks the long prompt's prefill over several steps.
    engine = LLMEngine.from_config(cpu_engine_config(
        tiny_checkpoint, num_kv_blocks=16, max_model_len=200, max_num_batched_tokens=16,
        max_num_seqs=4))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("long", [1] + [5] * 100, params)
    engine.add_request("short", [1, 6, 7], params)
    engine.add_request("queued", [1, 8, 9], params)
    engine.step()
    long_seq = engine.scheduler.running[0]
    assert 0 < long_seq.num_computed_tokens < long_seq.num_prompt_tokens  # mid-prefill
    ended = engine.abort_request("long")
    assert ended is not None and ended.finish == CoreFinish.ABORT
    for _ in range(5):
        engine.step()
    short = next(s for s in engine.scheduler.running if s.request_id == "short")
    assert short.num_output_tokens > 0  # mid-decode
    for rid in ("short", "queued"):
        ended = engine.abort_request(rid)
        assert ended is not None and ended.finish == CoreFinish.ABORT
    assert engine.abort_request("unknown") is None
    assert_all_blocks_free(engine)


def test_finish_reasons_stop_token_and_length(tiny_checkpoint: Path) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint))
    prompt = engine.tokenizer.encode("Once upon a time")
    first = output_tokens(run_to_completion(engine, {"probe": (
        prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))})["probe"])
    # Stopping on the third greedy token as a stop token id ends the request right there.
    stop_id = first[2]
    deltas = run_to_completion(engine, {"stop": (prompt, SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, stop_token_ids=(stop_id,)))})["stop"]
    cut = first.index(stop_id) + 1
    assert output_tokens(deltas) == first[:cut]
    assert deltas[-1].finish_reason == FinishReason.STOP and deltas[-1].stop_reason == stop_id
    # min_tokens suppresses the stop token until enough tokens exist.
    deltas = run_to_completion(engine, {"min": (prompt, SamplingParams(
        temperature=0.0, max_tokens=6, min_tokens=6, ignore_eos=True,
        stop_token_ids=(stop_id,)))})["min"]
    assert len(output_tokens(deltas)) == 6 and stop_id not in output_tokens(deltas)
    assert_all_blocks_free(engine)


def test_stop_strings_end_the_text_before_the_stop(tiny_checkpoint: Path) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint))
    prompt = engine.tokenizer.encode("Hello")
    full = run_to_completion(engine, {"full": (prompt, SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True))})["full"]
    text = "".join(d.text for d in full)
    assert len(text) > 6
    stop = text[3:6]  # a stop string that very likely spans a token boundary
    deltas = run_to_completion(engine, {"s": (prompt, SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop=(stop,)))})["s"]
    got = "".join(d.text for d in deltas)
    assert got == text[:text.index(stop)]
    assert deltas[-1].finish_reason == FinishReason.STOP and deltas[-1].stop_reason == stop


def test_streamed_text_concatenates_to_the_decoded_output(tiny_checkpoint: Path) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint))
    prompt = engine.tokenizer.encode("Naïve café owners said")
    deltas = run_to_completion(engine, {"t": (prompt, SamplingParams(
        temperature=1.0, seed=3, max_tokens=40, ignore_eos=True))})["t"]
    tokens = output_tokens(deltas)
    # The completion is the text the tokens add after the prompt (its first token's leading
    # space included), which is what decoding them in context gives.
    prompt_text = engine.tokenizer.decode(prompt)
    expected = engine.tokenizer.decode(prompt + tokens)[len(prompt_text):]
    assert "".join(d.text for d in deltas) == expected
    assert deltas[-1].num_output_tokens == len(tokens) == 40


def test_seeded_sampling_is_independent_of_the_batch(tiny_checkpoint: Path) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint))
    prompt = engine.tokenizer.encode("A seeded story")
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16,
                            ignore_eos=True)
    alone = output_tokens(run_to_completion(engine, {"a": (prompt, params)})["a"])
    crowd = make_requests(engine, 6, seed=9)
    crowd["seeded"] = (prompt, params)
    together = run_to_completion(engine, crowd)
    assert output_tokens(together["seeded"]) == alone


def test_logprobs_and_prompt_logprobs(tiny_checkpoint: Path) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint,
                                                     max_num_batched_tokens=32))
    prompt = engine.tokenizer.encode("Counting: one two three four five six seven eight")
    deltas = run_to_completion(engine, {"lp": (prompt, SamplingParams(
        temperature=0.0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True))})["lp"]
    first = deltas[0]
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(prompt)
    assert first.prompt_logprobs[0] is None
    for k, entry in enumerate(first.prompt_logprobs[1:], start=1):
        assert entry is not None and entry.token_id == prompt[k] and entry.logprob <= 0
        assert len(entry.top) == 2
    for d in deltas:
        assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
        for lp in d.logprobs:
            assert len(lp.top) == 3
            # Greedy: the chosen token is the most likely one.
            assert lp.top[0][0] == lp.token_id and abs(lp.top[0][1] - lp.logprob) < 1e-6


def test_prompts_the_engine_cannot_take_are_refused(tiny_checkpoint: Path) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint, max_model_len=64))
    params = SamplingParams()
    for bad in ([], [engine.tokenizer.vocab_size], [-1], [1] * 64):
        with pytest.raises(ValueError):
            engine.add_request("bad", bad, params)
    assert not engine.has_work
