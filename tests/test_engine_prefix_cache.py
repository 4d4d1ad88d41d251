"""Prefix caching through the real engine and model: whatever is reused from the cache, every
request's greedy tokens and logprobs equal what an engine without the cache gives, for shared
prefixes of every shape, under chunked prefill, preemption, aborts and eviction; the block
invariants hold after every step and every block comes back."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.core.llm_engine import LLMEngine
from engine.core.runner import StepHandle
from engine.core.scheduler import SchedulerOutput
from engine.outputs import FinishReason, GenerationDelta, TokenLogprob
from engine.params import SamplingParams
from engine.structured.matchers import StepGrammars
from tests.block_invariants import check_block_invariants, check_writes_are_private
from tests.conftest import cpu_engine_config
from tests.engine_helpers import InProcessFront, output_tokens, run_to_completion

BLOCK = 16
# On this CPU both paths give bitwise-equal logprobs; a different batch shape may change a
# matmul's blocking elsewhere, so equality is asserted to float32 noise. Wrong K/V (another
# sequence's, or a stale block) moves logprobs by orders of magnitude more.
LOGPROB_TOL = 1e-5

Requests = dict[str, tuple[list[int], SamplingParams]]


def greedy(max_tokens: int = 12, logprobs: int | None = 5) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=logprobs)


def engine(checkpoint: Path, caching: bool, **overrides: object) -> LLMEngine:
    return LLMEngine.from_config(cpu_engine_config(checkpoint, enable_prefix_caching=caching,
                                                   **overrides))


def random_tokens(rng: random.Random, engine_: LLMEngine, n: int) -> list[int]:
    return [rng.randrange(3, engine_.tokenizer.vocab_size) for _ in range(n)]


def logprobs(deltas: list[GenerationDelta]) -> list[TokenLogprob]:
    return [lp for d in deltas for lp in (d.logprobs or ())]


def assert_same_output(got: list[GenerationDelta], want: list[GenerationDelta]) -> None:
    assert output_tokens(got) == output_tokens(want)
    for a, b in zip(logprobs(got), logprobs(want), strict=True):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=LOGPROB_TOL)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=LOGPROB_TOL)


def run_checked(engine_: LLMEngine, requests: Requests, abort_at: dict[str, int] | None = None,
                key: str | None = None) -> dict[str, list[GenerationDelta]]:
    """run_to_completion, checking that every step writes only private blocks and that the
    block invariants hold after it; ``abort_at`` aborts a request once it has that many
    output tokens (0: once it is running); ``key`` is every request's extra hash key."""
    sched = engine_.scheduler
    launch = engine_.runner.launch

    def launch_step(out: SchedulerOutput,
                    side_inputs: Callable[[], StepGrammars | None] | None = None) -> StepHandle:
        check_writes_are_private(out, sched.block_manager)
        return launch(out, side_inputs)

    engine_.runner.launch = launch_step  # type: ignore[method-assign]
    front = InProcessFront(engine_)
    for rid, (prompt, params) in requests.items():
        front.add(rid, prompt, params, extra_hash_key=key)
    deltas: dict[str, list[GenerationDelta]] = {rid: [] for rid in requests}
    try:
        for _ in range(100_000):
            if not engine_.has_work:
                break
            for delta in front.step():
                deltas[delta.request_id].append(delta)
            for rid, n in (abort_at or {}).items():
                seq = next((s for s in sched.running if s.request_id == rid), None)
                if seq is not None and seq.num_output_tokens >= n:
                    aborted = front.abort(rid)
                    assert aborted is not None
                    deltas[rid].append(aborted)
            check_block_invariants(sched)
    finally:
        del engine_.runner.launch  # back to the class's method
    assert not engine_.has_work
    return deltas


def assert_all_blocks_back(engine_: LLMEngine) -> None:
    blocks = engine_.scheduler.block_manager
    assert blocks.num_available_blocks == blocks.num_blocks
    assert all(blocks.ref_count(b) == 0 for b in range(blocks.num_blocks))


@pytest.fixture(scope="module")
def off(tiny_checkpoint: Path) -> Iterator[LLMEngine]:
    """The reference: the same engine without a prefix cache (ample pool, no preemption)."""
    yield engine(tiny_checkpoint, caching=False)


@pytest.mark.parametrize("shared", [0, 1, 15, 16, 17, 6 * BLOCK + 5])
def test_outputs_equal_the_uncached_engine_for_every_shared_prefix_length(
        shared: int, tiny_checkpoint: Path, off: LLMEngine) -> None:
    on = engine(tiny_checkpoint, caching=True)
    rng = random.Random(shared)
    prefix = [1] + random_tokens(rng, on, 200)
    first = prefix[:shared] + random_tokens(rng, on, 20)
    second = prefix[:shared] + random_tokens(rng, on, 20)
    run_checked(on, {"first": (first, greedy())})
    got = run_checked(on, {"second": (second, greedy())})["second"]
    assert got[-1].num_cached_tokens == shared // BLOCK * BLOCK
    assert on.counters.num_prompt_tokens_computed == len(first) + len(second) \
        - got[-1].num_cached_tokens
    assert_same_output(got, run_to_completion(off, {"second": (second, greedy())})["second"])
    assert_all_blocks_back(on)


@pytest.mark.parametrize(("length", "cached"), [(2 * BLOCK, BLOCK), (2 * BLOCK + 1, 2 * BLOCK)])
def test_a_prompt_cached_whole_still_computes_its_last_block_or_token(
        length: int, cached: int, tiny_checkpoint: Path, off: LLMEngine) -> None:
    on = engine(tiny_checkpoint, caching=True)
    prompt = [1] + random_tokens(random.Random(length), on, length - 1)
    first = run_checked(on, {"a": (prompt, greedy())})["a"]
    again = run_checked(on, {"b": (prompt, greedy())})["b"]
    assert first[-1].num_cached_tokens == 0 and again[-1].num_cached_tokens == cached
    want = run_to_completion(off, {"a": (prompt, greedy())})["a"]
    assert_same_output(first, want)
    assert_same_output(again, want)


def test_generated_tokens_are_cached_for_the_next_turn(tiny_checkpoint: Path,
                                                       off: LLMEngine) -> None:
    """A multi-turn chat sends back the previous answer: its blocks were cached as the answer
    was generated."""
    on = engine(tiny_checkpoint, caching=True)
    prompt = [1] + random_tokens(random.Random(7), on, 20)  # 21 tokens
    answer = output_tokens(run_checked(on, {"turn1": (prompt, greedy(max_tokens=30))})["turn1"])
    turn2 = prompt + answer + random_tokens(random.Random(8), on, 5)
    got = run_checked(on, {"turn2": (turn2, greedy())})["turn2"]
    # 21 + 30 tokens were known; 50 were computed (the last answer token never is): 3 blocks.
    assert got[-1].num_cached_tokens == 3 * BLOCK
    assert_same_output(got, run_to_completion(off, {"turn2": (turn2, greedy())})["turn2"])


def test_chunked_prefill_across_cached_and_uncached_blocks(tiny_checkpoint: Path,
                                                           off: LLMEngine) -> None:
    """A 24-token step budget: the follower's prefill starts after its 2 cached blocks and
    its chunks end mid-block; followers admitted while the leader is still prefilling reuse
    the blocks its finished chunks filled."""
    on = engine(tiny_checkpoint, caching=True, max_num_batched_tokens=24, max_num_seqs=4)
    rng = random.Random(11)
    prefix = [1] + random_tokens(rng, on, 39)  # 40 tokens: 2 full blocks + 8
    requests = {f"r{i}": (prefix + random_tokens(rng, on, n), greedy())
                for i, n in enumerate((50, 3, 27, 16))}
    got = run_checked(on, requests)
    cached = {rid: d[-1].num_cached_tokens for rid, d in got.items()}
    assert cached["r0"] == 0 and all(c >= 2 * BLOCK for rid, c in cached.items() if rid != "r0")
    for rid, request in requests.items():
        assert_same_output(got[rid], run_to_completion(off, {rid: request})[rid])
    assert_all_blocks_back(on)


def test_preemption_with_shared_blocks_keeps_every_output(tiny_checkpoint: Path,
                                                          off: LLMEngine) -> None:
    """8 blocks of 16 for 12 requests sharing a 40-token prefix: they preempt each other over
    and over, take and give back shared blocks, and each output is still the uncached one."""
    on = engine(tiny_checkpoint, caching=True, num_kv_blocks=8, max_model_len=128,
                max_num_batched_tokens=64)
    rng = random.Random(12)
    prefix = [1] + random_tokens(rng, on, 39)
    requests = {f"r{i}": (prefix + random_tokens(rng, on, rng.randint(1, 30)),
                          greedy(max_tokens=rng.randint(4, 24))) for i in range(12)}
    got = run_checked(on, requests)
    assert on.scheduler.num_preemptions_total > 0
    assert on.scheduler.prefix_cache_stats.hits > 0
    for rid, request in requests.items():
        assert_same_output(got[rid], run_to_completion(off, {rid: request})[rid])
    assert_all_blocks_back(on)


def test_aborts_of_requests_sharing_blocks_leave_the_others_intact(
        tiny_checkpoint: Path, off: LLMEngine) -> None:
    on = engine(tiny_checkpoint, caching=True, max_num_batched_tokens=16, max_num_seqs=4)
    rng = random.Random(13)
    prefix = [1] + random_tokens(rng, on, 47)  # 3 full blocks
    run_checked(on, {"primer": (prefix + [5], greedy(max_tokens=1))})
    requests = {name: (prefix + random_tokens(rng, on, n), greedy(max_tokens=20))
                for name, n in (("mid-prefill", 40), ("mid-decode", 2), ("survivor", 3))}
    got = run_checked(on, requests, abort_at={"mid-prefill": 0, "mid-decode": 5})
    assert got["mid-prefill"][-1].finish_reason == FinishReason.ABORT
    assert got["mid-prefill"][-1].num_output_tokens == 0
    assert got["mid-decode"][-1].finish_reason == FinishReason.ABORT
    assert got["survivor"][-1].num_cached_tokens == 3 * BLOCK
    assert_same_output(got["survivor"],
                       run_to_completion(off, {"s": requests["survivor"]})["s"])
    assert_all_blocks_back(on)


def test_a_tiny_pool_evicts_the_least_recently_used_prefix(tiny_checkpoint: Path,
                                                           off: LLMEngine) -> None:
    """8 blocks: each 60-token prompt leaves 3 full blocks cached; four others push the first
    one's out, while the most recent ones are still reused."""
    on = engine(tiny_checkpoint, caching=True, num_kv_blocks=8, max_model_len=128)
    rng = random.Random(14)
    prompts = [[1] + random_tokens(rng, on, 59) for _ in range(5)]
    for i, prompt in enumerate(prompts):
        run_checked(on, {f"p{i}": (prompt, greedy(max_tokens=4))})
    again_last = run_checked(on, {"last": (prompts[-1], greedy(max_tokens=4))})["last"]
    again_first = run_checked(on, {"first": (prompts[0], greedy(max_tokens=4))})["first"]
    assert again_last[-1].num_cached_tokens == 3 * BLOCK
    assert again_first[-1].num_cached_tokens == 0
    for deltas, prompt in ((again_last, prompts[-1]), (again_first, prompts[0])):
        assert_same_output(deltas, run_to_completion(off, {"x": (prompt, greedy(4))})["x"])
    assert_all_blocks_back(on)


def test_prompt_logprobs_and_extra_keys_never_read_the_cache(tiny_checkpoint: Path,
                                                             off: LLMEngine) -> None:
    on = engine(tiny_checkpoint, caching=True)
    prompt = [1] + random_tokens(random.Random(15), on, 40)
    run_checked(on, {"primer": (prompt, greedy(max_tokens=2))})
    echo = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2,
                          prompt_logprobs=2)
    got = run_checked(on, {"echo": (prompt, echo)})["echo"]
    want = run_to_completion(off, {"echo": (prompt, echo)})["echo"]
    assert got[-1].num_cached_tokens == 0
    assert got[0].prompt_logprobs is not None and want[0].prompt_logprobs is not None
    for a, b in zip(got[0].prompt_logprobs[1:], want[0].prompt_logprobs[1:], strict=True):
        assert a is not None and b is not None and a.logprob == pytest.approx(b.logprob)
    assert_same_output(got, want)
    # The same tokens under another key (another adapter, later) do not match the unkeyed
    # blocks, only those computed under the same key.
    keyed = run_checked(on, {"k1": (prompt, greedy(2))}, key="adapter-1")["k1"]
    other = run_checked(on, {"k2": (prompt, greedy(2))}, key="adapter-2")["k2"]
    same = run_checked(on, {"k3": (prompt, greedy(2))}, key="adapter-1")["k3"]
    assert [d[-1].num_cached_tokens for d in (keyed, other, same)] == [0, 0, 2 * BLOCK]
    assert_all_blocks_back(on)
