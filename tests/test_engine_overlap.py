"""Overlapped steps (step n + 1 scheduled and launched before step n's tokens reach the host,
its input ids read on the device) give exactly what resolving every step first gives: greedy
and seeded tokens, logprobs, penalties that count the pending token, stop tokens and EOS that
end a request with its next step already queued, length endings, preemption and aborts; and
every block comes back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from engine.core.llm_engine import LLMEngine
from engine.core.scheduler import SchedulerOutput
from engine.ipc.messages import CoreFinish
from engine.outputs import FinishReason, GenerationDelta
from engine.params import Constraint, ConstraintKind, SamplingParams
from tests.block_invariants import check_block_invariants
from tests.conftest import cpu_engine_config
from tests.engine_helpers import InProcessFront, output_tokens, run_to_completion

Requests = dict[str, tuple[list[int], SamplingParams]]


def engines(checkpoint: Path, **overrides: object) -> tuple[LLMEngine, LLMEngine]:
    """The same engine twice: overlapping its steps, and resolving each step first."""
    return (LLMEngine.from_config(cpu_engine_config(checkpoint, overlap_steps=True,
                                                    **overrides)),
            LLMEngine.from_config(cpu_engine_config(checkpoint, overlap_steps=False,
                                                    **overrides)))


def workload(engine: LLMEngine, seed: int) -> Requests:
    """Long and short prompts (chunked prefill under a small budget), every sampler path,
    stop tokens and EOS that end requests early."""
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    variants = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=1.5),
        SamplingParams(temperature=0.0, repetition_penalty=3.0),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=30, seed=7),
        SamplingParams(temperature=0.7, min_p=0.1, seed=11, logprobs=3),
        SamplingParams(temperature=0.0, logit_bias={5: 4.0, 6: -100.0}, logprobs=0),
    ]
    requests: Requests = {}
    for i in range(18):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.choice((4, 30, 90)))]
        base = variants[i % len(variants)]
        requests[f"r{i}"] = (prompt, SamplingParams(
            **{**base.__dict__, "max_tokens": rng.randint(1, 20), "ignore_eos": True}))
    return requests


def tokens_and_logprobs(deltas: list[GenerationDelta]) -> tuple[list[int], list[tuple]]:
    lps = [(lp.token_id, round(lp.logprob, 5), tuple(t for t, _ in lp.top))
           for d in deltas for lp in (d.logprobs or ())]
    return output_tokens(deltas), lps


def assert_same(a: dict[str, list[GenerationDelta]], b: dict[str, list[GenerationDelta]]
                ) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        assert tokens_and_logprobs(a[rid]) == tokens_and_logprobs(b[rid]), rid
        assert a[rid][-1].finish_reason == b[rid][-1].finish_reason, rid
        assert a[rid][-1].stop_reason == b[rid][-1].stop_reason, rid
        assert "".join(d.text for d in a[rid]) == "".join(d.text for d in b[rid]), rid


def assert_all_blocks_back(engine: LLMEngine) -> None:
    blocks = engine.scheduler.block_manager
    assert blocks.num_available_blocks == blocks.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("budget", [512, 24])
def test_overlapped_steps_give_what_resolved_steps_give(tiny_checkpoint: Path,
                                                        budget: int) -> None:
    overlapped, resolved = engines(tiny_checkpoint, max_num_batched_tokens=budget,
                                   max_num_seqs=min(32, budget))
    requests = workload(overlapped, seed=budget)
    assert_same(run_to_completion(overlapped, requests), run_to_completion(resolved, requests))
    assert_all_blocks_back(overlapped)


def test_penalties_count_the_token_still_on_the_device(tiny_checkpoint: Path) -> None:
    """Every decode step of an overlapped engine samples while the previous token is pending.
    A biased far above B, B far above the rest (logits here are within about +-8): with a
    repetition penalty of 10 greedy picks A, then B, because A's logit is divided by 10. A
    penalty that missed the pending A would pick A again."""
    overlapped, resolved = engines(tiny_checkpoint)
    prompt = overlapped.tokenizer.encode("Once upon a time there was")
    a, b = 100, 101
    bias = {a: 60.0, b: 50.0}
    requests: Requests = {
        "rep": (prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                       logit_bias=bias, repetition_penalty=10.0)),
        "freq": (prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                        frequency_penalty=2.0, presence_penalty=2.0)),
    }
    got = run_to_completion(overlapped, requests)
    assert output_tokens(got["rep"])[:2] == [a, b]
    assert_same(got, run_to_completion(resolved, requests))


def test_a_stop_token_ends_a_request_whose_next_step_is_already_queued(
        tiny_checkpoint: Path) -> None:
    overlapped, resolved = engines(tiny_checkpoint)
    prompt = overlapped.tokenizer.encode("Once upon a time")
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    first = output_tokens(run_to_completion(resolved, {"g": (prompt, greedy)})["g"])
    stop_id = first[4]
    cut = first.index(stop_id) + 1
    stopping = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                              stop_token_ids=(stop_id,))
    front = InProcessFront(overlapped)
    front.add("s", prompt, stopping)
    deltas: list[GenerationDelta] = []
    steps_after_stop = 0
    while overlapped.has_work:
        before = overlapped.counters.num_steps
        deltas += front.step()
        seq = next((s for s in overlapped.scheduler.running if s.request_id == "s"), None)
        if seq is not None and seq.num_known_tokens > len(prompt):
            # With overlap, one token of the request is always still on the device.
            assert seq.num_pending_tokens == 1
        if deltas and deltas[-1].finished:
            steps_after_stop += overlapped.counters.num_steps - before
        check_block_invariants(overlapped.scheduler)
    assert output_tokens(deltas) == first[:cut]
    assert deltas[-1].finish_reason == FinishReason.STOP and deltas[-1].stop_reason == stop_id
    # The step queued behind the stop ran, and its token was dropped.
    assert overlapped.counters.num_generation_tokens == cut
    assert_all_blocks_back(overlapped)


def test_eos_ends_the_request_and_its_text(tiny_checkpoint: Path) -> None:
    """EOS forced at the third token (logit bias after min_tokens): the request stops there,
    EOS adds no text, and the step queued after it is dropped."""
    overlapped, resolved = engines(tiny_checkpoint)
    eos = overlapped.tokenizer.eos_token_id
    prompt = overlapped.tokenizer.encode("Hello there")
    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=2,
                            logit_bias={eos: 100.0})
    got = run_to_completion(overlapped, {"e": (prompt, params)})["e"]
    want = run_to_completion(resolved, {"e": (prompt, params)})["e"]
    assert_same({"e": got}, {"e": want})
    assert output_tokens(got)[-1] == eos and len(output_tokens(got)) == 3
    assert got[-1].finish_reason == FinishReason.STOP and got[-1].stop_reason is None
    assert got[-1].num_output_tokens == 3


def test_stop_strings_found_by_the_front_abort_the_core(tiny_checkpoint: Path) -> None:
    overlapped, _ = engines(tiny_checkpoint)
    prompt = overlapped.tokenizer.encode("Hello")
    full = run_to_completion(overlapped, {"f": (prompt, SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True))})["f"]
    text = "".join(d.text for d in full)
    stop = text[4:7]
    got = run_to_completion(overlapped, {"s": (prompt, SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop=(stop,)))})["s"]
    assert "".join(d.text for d in got) == text[:text.index(stop)]
    assert got[-1].stop_reason == stop and got[-1].num_output_tokens < 20
    assert_all_blocks_back(overlapped)


def test_preemption_and_aborts_with_tokens_in_flight(tiny_checkpoint: Path) -> None:
    """A pool of 8 blocks for 16 requests: sequences are preempted with a token still on the
    device and readmitted once it arrives; aborts land between launch and resolve."""
    overrides = dict(num_kv_blocks=8, max_model_len=128, max_num_batched_tokens=64)
    overlapped, resolved = engines(tiny_checkpoint, **overrides)
    rng = random.Random(5)
    vocab = overlapped.tokenizer.vocab_size
    requests: Requests = {
        f"r{i}": ([1] + [rng.randrange(3, vocab) for _ in range(rng.randint(3, 50))],
                  SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 24),
                                 ignore_eos=True, repetition_penalty=1.3))
        for i in range(16)}
    got = run_to_completion(overlapped, requests)
    assert overlapped.scheduler.num_preemptions_total > 0
    assert_same(got, run_to_completion(resolved, requests))
    assert_all_blocks_back(overlapped)

    front = InProcessFront(overlapped)
    for rid, request in list(requests.items())[:6]:
        front.add(rid, *request)
    for step in range(200):
        if not overlapped.has_work:
            break
        front.step()
        if step in (1, 3, 6):  # a launched step holds tokens of the requests aborted here
            for rid in list(front.states)[:2]:
                assert front.abort(rid) is not None
        check_block_invariants(overlapped.scheduler)
    assert not front.states
    assert_all_blocks_back(overlapped)


def test_the_core_says_why_it_ended_each_request(tiny_checkpoint: Path) -> None:
    overlapped, _ = engines(tiny_checkpoint, max_model_len=40)
    prompt = [1] + [7] * 30
    overlapped.add_request("len", prompt, SamplingParams(temperature=0.0, max_tokens=500,
                                                         ignore_eos=True))
    overlapped.add_request("max", prompt, SamplingParams(temperature=0.0, max_tokens=3,
                                                         ignore_eos=True))
    finishes = {}
    tokens: dict[str, int] = {"len": 0, "max": 0}
    while overlapped.has_work:
        for out in overlapped.step():
            tokens[out.request_id] += len(out.token_ids)
            if out.finish is not None:
                finishes[out.request_id] = out.finish
    assert finishes == {"len": CoreFinish.LENGTH, "max": CoreFinish.LENGTH}
    # The context ends at 40 tokens: the last one is generated, never computed.
    assert tokens == {"len": 40 - len(prompt), "max": 3}


def test_constrained_rows_are_masked_after_their_previous_token(tiny_checkpoint: Path) -> None:
    """A grammar's mask needs its matcher advanced by the previous token, which an overlapped
    step launches before it reaches the host: the engine delivers the step before ahead of
    sampling. Outputs (greedy, seeded) equal the resolved engine's and satisfy the schema."""
    overlapped, resolved = engines(tiny_checkpoint)
    schema = {"type": "object", "additionalProperties": False, "required": ["n", "ok"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                             "ok": {"type": "boolean"}}}
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema), "response_format")
    prompt = overlapped.tokenizer.encode("Answer in JSON:")
    requests: Requests = {
        "greedy": (prompt, SamplingParams(temperature=0.0, max_tokens=60,
                                          constraint=constraint)),
        "seeded": (prompt, SamplingParams(temperature=1.0, seed=5, max_tokens=60,
                                          constraint=constraint, logprobs=2)),
        "plain": (prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
    }
    waited = 0
    grammar_waits = overlapped._grammar_waits

    def counting(out: SchedulerOutput) -> bool:
        nonlocal waited
        waits = grammar_waits(out)
        waited += waits
        return waits

    overlapped._grammar_waits = counting  # type: ignore[method-assign]
    got = run_to_completion(overlapped, requests)
    assert_same(got, run_to_completion(resolved, requests))
    for rid in ("greedy", "seeded"):
        assert got[rid][-1].finish_reason == FinishReason.STOP
        value = json.loads("".join(d.text for d in got[rid]))
        assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99
    assert waited > 10  # most steps delivered the step before ahead of their sampling
    assert_all_blocks_back(overlapped)
