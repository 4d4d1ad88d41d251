"""Prefix caching in the block manager and scheduler, without a model: block hashes, hits and
their limits, reference counts, LRU eviction, preemption, truncation, and randomized workloads
whose every step is checked against the block invariants and a shadow of the KV tensors."""

from __future__ import annotations

import itertools
import random

import pytest

from engine.core.block_manager import BlockManager
from engine.core.prefix_cache import ROOT_HASH, extend_block_hashes, hash_block
from engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.core.sequence import Sequence
from engine.params import SamplingParams
from tests.block_invariants import ShadowKV, check_block_invariants, check_writes_are_private

BS = 4  # block size of these tests
_ids = itertools.count()


def make_seq(tokens: list[int], max_tokens: int = 4, extra_key: str | None = None,
             prompt_logprobs: int | None = None) -> Sequence:
    n = next(_ids)
    return Sequence(seq_id=n, request_id=f"r{n}", prompt_token_ids=list(tokens),
                    params=SamplingParams(max_tokens=max_tokens,
                                          prompt_logprobs=prompt_logprobs),
                    extra_hash_key=extra_key)


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 8,
                   caching: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 256),
                     BlockManager(num_blocks, BS, enable_caching=caching))


def run_step(sched: Scheduler, out: SchedulerOutput, shadow: ShadowKV | None = None,
             token: int = 7) -> list[Sequence]:
    """What the engine does with a step: write K/V, advance, append a token, finish at
    max_tokens. Returns the sequences that finished."""
    check_writes_are_private(out, sched.block_manager)
    if shadow is not None:
        shadow.write(out)
    sampling = [s.seq for s in out.scheduled if s.samples]
    sched.on_step_launched(out)
    finished = []
    for seq in sampling:
        seq.append_token(token)
        if seq.num_output_tokens >= seq.params.max_tokens:
            sched.finish(seq)
            finished.append(seq)
    return finished


def run_alone(sched: Scheduler, seq: Sequence) -> list[int]:
    """Run ``seq`` to completion; the token counts of its steps."""
    sched.add(seq)
    counts = []
    while not seq.is_finished:
        out = sched.schedule()
        counts.append(out.scheduled[0].num_new_tokens)
        run_step(sched, out)
        check_block_invariants(sched)
    return counts


# ---- hashes ----------------------------------------------------------------------------------


def test_block_hashes_chain_over_every_earlier_token_and_the_extra_key() -> None:
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    c = make_seq([0, 2, 3, 4, 5, 6, 7, 8])  # differs in block 0 only
    for seq in (a, b, c):
        extend_block_hashes(seq, BS, 2)
    assert a.block_hashes == b.block_hashes
    assert a.block_hashes[0] == hash_block(ROOT_HASH, [1, 2, 3, 4], None)
    assert a.block_hashes[1] == hash_block(a.block_hashes[0], [5, 6, 7, 8], None)
    # Block 1 has the same tokens in c, yet another hash: its context differs.
    assert c.block_hashes[0] != a.block_hashes[0] and c.block_hashes[1] != a.block_hashes[1]
    keyed = [hash_block(ROOT_HASH, [1, 2, 3, 4], key) for key in (None, "", "lora-a", "lora-b")]
    assert len(set(keyed)) == 4
    assert all(len(h) == 32 for h in keyed)
    with pytest.raises(AssertionError):  # a partial block has no hash
        extend_block_hashes(b, BS, 3)


# ---- hits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt_len", "shared", "hit_blocks"), [
    (9, 0, 0), (9, 1, 0), (9, 3, 0), (9, 4, 1), (9, 5, 1), (9, 8, 2), (9, 9, 2),
    # A whole prompt of full blocks cached: the last block is recomputed for its logits.
    (8, 8, 1), (4, 4, 0),
])
def test_a_second_prompt_reuses_the_full_blocks_it_shares(prompt_len: int, shared: int,
                                                          hit_blocks: int) -> None:
    sched = make_scheduler()
    first = make_seq(list(range(100, 100 + prompt_len)))
    run_alone(sched, first)
    tokens = list(range(100, 100 + shared)) + list(range(500, 500 + prompt_len - shared))
    second = make_seq(tokens)
    sched.add(second)
    out = sched.schedule()
    assert second.num_computed_tokens == second.num_cached_prompt_tokens == hit_blocks * BS
    assert out.scheduled[0].num_new_tokens == prompt_len - hit_blocks * BS
    assert out.scheduled[0].samples
    assert second.block_table[:hit_blocks] == first_blocks(sched, first, hit_blocks)
    stats = sched.prefix_cache_stats
    assert (stats.queries, stats.hits) == (2 * prompt_len, hit_blocks * BS)
    run_step(sched, out)
    check_block_invariants(sched)


def first_blocks(sched: Scheduler, seq: Sequence, n: int) -> list[int]:
    """The blocks that cache ``seq``'s first n token blocks (all n must be cached)."""
    blocks = sched.block_manager.find_cached_prefix(seq)[:n]
    assert len(blocks) == n
    return blocks


def test_shared_blocks_are_counted_once_per_holder_and_idle_only_when_all_let_go() -> None:
    sched = make_scheduler(max_num_seqs=4)
    prefix = list(range(10, 18))  # two full blocks
    run_alone(sched, make_seq(prefix + [1]))
    a, b = make_seq(prefix + [2], max_tokens=3), make_seq(prefix + [3], max_tokens=6)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [1, 1]
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    bm = sched.block_manager
    assert [bm.ref_count(x) for x in shared] == [2, 2]
    check_block_invariants(sched)
    while not a.is_finished:
        run_step(sched, sched.schedule())
    assert [bm.ref_count(x) for x in shared] == [1, 1]
    assert not set(shared) & set(bm.idle_cached_blocks())
    while not b.is_finished:
        run_step(sched, sched.schedule())
    assert [bm.ref_count(x) for x in shared] == [0, 0]
    # Released tail first: the shared head is the most recently used idle block.
    assert bm.idle_cached_blocks()[-1] == shared[0]
    assert bm.num_available_blocks == bm.num_blocks
    check_block_invariants(sched)


def test_requests_for_prompt_logprobs_take_no_hits_but_fill_the_cache() -> None:
    sched = make_scheduler()
    prompt = list(range(40, 52))
    run_alone(sched, make_seq(prompt))
    echo = make_seq(prompt, prompt_logprobs=1)
    assert run_alone(sched, echo)[0] == 12 and echo.num_cached_prompt_tokens == 0
    assert sched.prefix_cache_stats.queries == 12  # only the first request looked
    # A logprob request's own blocks are cached like anyone's.
    sched2 = make_scheduler()
    run_alone(sched2, make_seq(prompt, prompt_logprobs=0))
    later = make_seq(prompt)
    assert run_alone(sched2, later)[0] == 4 and later.num_cached_prompt_tokens == 8


def test_different_extra_keys_never_share_blocks() -> None:
    sched = make_scheduler()
    prompt = list(range(60, 69))
    run_alone(sched, make_seq(prompt, extra_key="adapter-a"))
    for key, hit in (("adapter-b", 0), (None, 0), ("adapter-a", 8)):
        seq = make_seq(prompt, extra_key=key)
        run_alone(sched, seq)
        assert seq.num_cached_prompt_tokens == hit, key


def test_blocks_join_the_cache_as_chunked_prefill_and_decoding_fill_them() -> None:
    sched = make_scheduler(budget=6, max_num_seqs=4)
    long = make_seq(list(range(200, 214)), max_tokens=8)  # 14 prompt tokens
    sched.add(long)
    run_step(sched, sched.schedule())  # 6 computed: block 0 full
    assert long.num_cached_blocks == 1
    follower = make_seq(list(range(200, 214)), max_tokens=1)
    sched.add(follower)
    out = sched.schedule()  # long's second chunk takes the whole budget: follower waits
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(long, 6)]
    run_step(sched, out)
    out = sched.schedule()
    # long, still prefilling, has filled blocks 0-2: the follower reuses all three.
    assert follower.num_cached_prompt_tokens == 12
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(long, 2), (follower, 2)]
    run_step(sched, out)
    check_block_invariants(sched)
    # Generated tokens fill blocks too: long's tokens 12..15 are 2 prompt + 2 generated.
    while long.num_computed_tokens < 16:
        run_step(sched, sched.schedule())
    assert long.num_cached_blocks == 4
    echo_of_long = make_seq(long.prompt_token_ids + long.output_token_ids[:3])
    sched.add(echo_of_long)
    sched.schedule()
    assert echo_of_long.num_cached_prompt_tokens == 16


def test_a_preempted_sequence_recomputes_only_what_was_evicted() -> None:
    """7 blocks. old (8 prompt tokens) and young (9) grow one token a step until young needs a
    4th block while old needs its 4th: young, the youngest, is preempted. Its 3 full blocks
    stay cached; old's 5th block later evicts the least recently used of them, young's tail.
    Readmitted once old is done, young takes its 2 surviving blocks and recomputes the rest."""
    sched = make_scheduler(num_blocks=7, budget=64)
    old, young = make_seq(list(range(300, 308)), 12), make_seq(list(range(400, 409)), 12)
    sched.add(old)
    sched.add(young)
    shadow = ShadowKV(sched.block_manager)
    steps: list[tuple[list[tuple[Sequence, int, int]], tuple[Sequence, ...]]] = []
    while sched.has_work:
        out = sched.schedule()
        steps.append(([(s.seq, s.seq.num_computed_tokens, s.num_new_tokens)
                       for s in out.scheduled], out.preempted))
        run_step(sched, out, shadow)
        check_block_invariants(sched)
        shadow.check(sched)
    assert steps[5] == ([(old, 12, 1)], (young,))
    assert sched.block_manager.num_cached_blocks >= 2
    # young is readmitted after old's last step, with 2 of its 3 full blocks still cached.
    assert steps[12] == ([(young, 8, 6)], ())
    assert young.num_output_tokens == 12 and young.num_preemptions == 1
    assert young.num_cached_prompt_tokens == 0  # a readmission does not change usage


def test_readmission_takes_its_surviving_blocks() -> None:
    sched = make_scheduler(num_blocks=16)
    seq = make_seq(list(range(500, 510)), max_tokens=20)
    sched.add(seq)
    run_step(sched, sched.schedule())
    for _ in range(3):
        run_step(sched, sched.schedule())
    assert seq.num_computed_tokens == 13
    sched._preempt(seq)  # as _make_room does when the pool runs dry
    check_block_invariants(sched)
    out = sched.schedule()
    # 14 tokens known, 3 full blocks cached (12 tokens): 2 to compute, sampling the next.
    assert seq.num_computed_tokens == 12 and out.scheduled[0].num_new_tokens == 2
    assert out.scheduled[0].samples
    stats = sched.prefix_cache_stats
    assert stats.queries == 10 and stats.hits == 0  # the readmission is not a query


def test_eviction_takes_free_blocks_first_then_the_least_recently_used() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    sched = Scheduler(SchedulerConfig(4, 64, 256), bm)
    a = make_seq(list(range(600, 609)), max_tokens=1)  # 9 tokens: 2 full blocks + 1
    run_alone(sched, a)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    a_blocks = first_blocks(sched, a, 2)
    b = make_seq(list(range(700, 713)), max_tokens=1)  # 13 tokens: 4 blocks, 3 full
    run_alone(sched, b)
    # b took the 4 free blocks; a's cached blocks survived.
    assert first_blocks(sched, a, 2) == a_blocks
    assert bm.num_free_blocks == 1 and bm.num_cached_blocks == 5
    c = make_seq(list(range(800, 812)), max_tokens=1)  # 12 tokens: 3 blocks
    free, idle = bm.free_blocks(), bm.idle_cached_blocks()
    # a's blocks are the least recently used idle ones, tail before head.
    assert idle[:2] == a_blocks[::-1]
    sched.add(c)
    sched.schedule()
    # The free block first, then the two least recently used idle blocks: a's.
    assert c.block_table == free + idle[:2]
    assert bm.find_cached_prefix(a) == []
    assert len(bm.find_cached_prefix(b)) == 3  # b's 14 tokens: 3 whole blocks before its last
    check_block_invariants(sched)


def test_a_block_in_use_is_never_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    sched = Scheduler(SchedulerConfig(4, 64, 256), bm)
    prefix = list(range(900, 908))
    run_alone(sched, make_seq(prefix + [1], max_tokens=1))
    holder = make_seq(prefix + [2], max_tokens=10)
    sched.add(holder)
    run_step(sched, sched.schedule())  # holds the 2 cached blocks + 1 new
    hungry = make_seq(list(range(950, 958)), max_tokens=1)  # needs 2 blocks: only 1 left
    sched.add(hungry)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [holder] and list(sched.waiting) == [hungry]
    assert holder.block_table[:2] == first_blocks(sched, holder, 2)
    check_block_invariants(sched)


def test_without_caching_nothing_is_shared_or_kept() -> None:
    sched = make_scheduler(caching=False)
    prompt = list(range(1000, 1012))
    run_alone(sched, make_seq(prompt))
    again = make_seq(prompt)
    assert run_alone(sched, again)[0] == 12 and again.num_cached_prompt_tokens == 0
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.num_cached_blocks == 0
    assert sched.prefix_cache_stats.queries == sched.prefix_cache_stats.hits == 0


# ---- truncate -------------------------------------------------------------------------------


def test_truncate_releases_tail_blocks_and_keeps_the_rest() -> None:
    sched = make_scheduler()
    seq = make_seq(list(range(1100, 1110)), max_tokens=20)
    sched.add(seq)
    run_step(sched, sched.schedule())
    for _ in range(4):
        run_step(sched, sched.schedule())  # 14 computed, 15 tokens
    bm = sched.block_manager
    assert seq.num_computed_tokens == 14 and seq.num_cached_blocks == 3
    tail = seq.block_table[3]
    bm.truncate(seq, 12)  # drops the partial block 3, keeps 3 full cached blocks
    assert len(seq.block_table) == 3 and seq.num_computed_tokens == 12
    assert bm.ref_count(tail) == 0 and tail in bm.free_blocks()
    last = seq.block_table[2]
    bm.truncate(seq, 10)  # block 2 becomes partial: it will be rewritten, so uncached
    assert len(seq.block_table) == 3 and seq.num_computed_tokens == 10
    assert not bm.is_cached(last) and seq.num_cached_blocks == 2 and len(seq.block_hashes) == 2
    with pytest.raises(ValueError):
        bm.truncate(seq, 13)
    check_block_invariants(sched)
    # The sequence goes on from 10 computed tokens, writing into its now-private block 2.
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == seq.num_tokens - 10
    run_step(sched, out)
    check_block_invariants(sched)


def test_truncate_into_a_shared_block_gives_it_up() -> None:
    sched = make_scheduler(max_num_seqs=4)
    prefix = list(range(1200, 1208))
    run_alone(sched, make_seq(prefix + [1], max_tokens=1))
    a, b = make_seq(prefix + [2], max_tokens=9), make_seq(prefix + [3], max_tokens=9)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())
    bm = sched.block_manager
    shared = a.block_table[1]
    assert b.block_table[1] == shared and bm.ref_count(shared) == 2
    bm.truncate(a, 6)  # inside the shared block 1: a may not write there
    assert a.block_table == b.block_table[:1] and a.num_computed_tokens == 4
    assert bm.ref_count(shared) == 1 and bm.is_cached(shared)
    check_block_invariants(sched)


# ---- randomized workloads --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_shared_prefix_workloads_keep_every_invariant(seed: int) -> None:
    """Prompts drawn from a few shared prefixes (several blocks, partial blocks, none), extra
    keys, prompt-logprob requests, aborts at random moments, a pool tight enough to preempt and
    evict: after every step the block invariants hold and every running sequence reads back
    its own K/V; at the end every request finished and every block is available."""
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=rng.choice((10, 16, 24)), budget=rng.choice((8, 16)),
                           max_num_seqs=6)
    prefixes = [[rng.randrange(50) for _ in range(rng.choice((3, 4, 8, 13, 20)))]
                for _ in range(4)]
    pending = []
    for _ in range(60):
        tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(0, 9))]
        if not tokens:
            tokens = [1]
        pending.append(make_seq(tokens, max_tokens=rng.randint(1, 12),
                                extra_key=rng.choice((None, None, None, "lora")),
                                prompt_logprobs=1 if rng.random() < 0.1 else None))
    all_seqs = list(pending)
    shadow = ShadowKV(sched.block_manager)
    aborted = 0
    for _ in range(20_000):
        while pending and rng.random() < 0.4:
            sched.add(pending.pop(0))
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        # Generated tokens repeat across sequences (from a tiny alphabet), so outputs share
        # blocks too.
        run_step(sched, out, shadow, token=rng.randrange(3))
        if rng.random() < 0.05 and sched.has_work:
            victim = rng.choice(list(sched.running) + list(sched.waiting))
            sched.finish(victim)
            aborted += 1
        check_block_invariants(sched)
        shadow.check(sched)
        if not pending and not sched.has_work:
            break
    assert all(s.is_finished for s in all_seqs), "some request never finished"
    bm = sched.block_manager
    assert bm.num_available_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    stats = sched.prefix_cache_stats
    assert 0 < stats.hits <= stats.queries
    assert aborted > 0 and sched.num_preemptions_total > 0
