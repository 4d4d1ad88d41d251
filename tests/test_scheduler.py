"""Scheduler and block-manager invariants, without a model (factories, exact token counts)."""

from __future__ import annotations

import itertools
import random

import pytest

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus
from engine.params import SamplingParams
from tests.block_invariants import check_block_invariants

_ids = itertools.count()


def make_seq(prompt_len: int, max_tokens: int = 4) -> Sequence:
    """A sequence whose tokens no other one shares (so the prefix cache never hits)."""
    n = next(_ids)
    return Sequence(seq_id=n, request_id=f"r{n}",
                    prompt_token_ids=list(range(n * 1000, n * 1000 + prompt_len)),
                    params=SamplingParams(max_tokens=max_tokens))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   budget: int = 64, max_model_len: int = 256) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len),
                     BlockManager(num_blocks, block_size))


def complete_step(sched: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    """What the engine does after the model ran: advance, append a token, finish when done."""
    sampling = [s.seq for s in out.scheduled if s.samples]
    sched.on_step_launched(out)
    finished = []
    for seq in sampling:
        seq.append_token(7)
        if seq.num_output_tokens >= seq.params.max_tokens:
            sched.finish(seq)
            finished.append(seq)
    return finished


def counts(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def test_prefill_then_decode_one_token_per_step() -> None:
    sched = make_scheduler()
    seq = make_seq(10, max_tokens=3)
    sched.add(seq)
    out = sched.schedule()
    assert counts(out) == [(seq.request_id, 10)] and out.scheduled[0].samples
    assert len(seq.block_table) == 3  # ceil(10 / 4)
    complete_step(sched, out)
    out = sched.schedule()
    assert counts(out) == [(seq.request_id, 1)] and out.scheduled[0].samples
    complete_step(sched, out)
    out = sched.schedule()
    assert counts(out) == [(seq.request_id, 1)]
    assert complete_step(sched, out) == [seq]
    assert sched.schedule().is_empty
    assert sched.block_manager.num_available_blocks == 64


def test_chunked_prefill_splits_a_long_prompt_by_budget() -> None:
    sched = make_scheduler(budget=8)
    seq = make_seq(20)
    sched.add(seq)
    steps = []
    for _ in range(3):
        out = sched.schedule()
        steps.append((out.scheduled[0].num_new_tokens, out.scheduled[0].samples))
        complete_step(sched, out)
    assert steps == [(8, False), (8, False), (4, True)]
    assert seq.num_output_tokens == 1


def test_decodes_go_first_and_a_new_prompt_takes_the_rest_of_the_budget() -> None:
    sched = make_scheduler(budget=8)
    decoders = [make_seq(2) for _ in range(3)]
    for seq in decoders:
        sched.add(seq)
    complete_step(sched, sched.schedule())  # prefill all three (6 tokens)
    newcomer = make_seq(10)
    sched.add(newcomer)
    out = sched.schedule()
    assert counts(out) == [(d.request_id, 1) for d in decoders] + [(newcomer.request_id, 5)]
    assert not out.scheduled[-1].samples
    complete_step(sched, out)
    out = sched.schedule()
    assert counts(out) == [(d.request_id, 1) for d in decoders] + [(newcomer.request_id, 5)]
    assert out.scheduled[-1].samples


def test_max_num_seqs_caps_the_running_set() -> None:
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(3) for _ in range(3)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]


def test_admission_waits_for_free_blocks_and_never_overtakes() -> None:
    # 4 blocks of 4 tokens: the first 8-token prompt takes 2, the 12-token one needs 3.
    sched = make_scheduler(num_blocks=4, block_size=4)
    first, big, small = make_seq(8, max_tokens=1), make_seq(12), make_seq(2)
    for seq in (first, big, small):
        sched.add(seq)
    out = sched.schedule()
    assert counts(out) == [(first.request_id, 8)]  # small would fit but must not overtake big
    assert list(sched.waiting) == [big, small]
    complete_step(sched, out)  # first finishes (max_tokens=1), its blocks return
    out = sched.schedule()  # now big (3 blocks) and small (1 block) both fit, in order
    assert counts(out) == [(big.request_id, 12), (small.request_id, 2)]
    check_block_invariants(sched)


def test_preemption_frees_the_youngest_and_it_recomputes_from_scratch() -> None:
    # 5 blocks of 4 tokens. Two 8-token prompts take 4 blocks; growing past 8 tokens needs more.
    sched = make_scheduler(num_blocks=5, block_size=4)
    old, young = make_seq(8, max_tokens=10), make_seq(8, max_tokens=10)
    sched.add(old)
    sched.add(young)
    complete_step(sched, sched.schedule())  # both prefilled, 9 tokens each now
    out = sched.schedule()  # old needs a 3rd block (takes the last), young needs one: none left
    assert counts(out) == [(old.request_id, 1)]
    assert out.preempted == (young,)
    assert young.status == SequenceStatus.WAITING and young.num_computed_tokens == 0
    assert young.num_preemptions == 1 and sched.num_preemptions_total == 1
    assert list(sched.waiting) == [young]
    check_block_invariants(sched)
    complete_step(sched, out)
    # young is readmitted only once old is done; then it prefills prompt + its output so far.
    while old.status != SequenceStatus.FINISHED:
        out = sched.schedule()
        assert [s.seq for s in out.scheduled] == [old]
        complete_step(sched, out)
        check_block_invariants(sched)
    out = sched.schedule()
    assert counts(out) == [(young.request_id, 9)] and out.scheduled[0].samples


def test_a_sequence_preempts_itself_when_it_is_the_youngest() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq(8, max_tokens=10), make_seq(7, max_tokens=10)
    sched.add(a)
    sched.add(b)
    complete_step(sched, sched.schedule())  # a: 9 tokens (2 blocks), b: 8 tokens (2 blocks)
    out = sched.schedule()  # a needs a third block: b (the youngest) is preempted for it
    assert counts(out) == [(a.request_id, 1)] and out.preempted == (b,)
    sched2 = make_scheduler(num_blocks=3, block_size=4)
    solo = make_seq(12, max_tokens=10)
    sched2.add(solo)
    complete_step(sched2, sched2.schedule())
    # solo now has 13 tokens and needs a 4th block in a 3-block pool: it preempts itself.
    out = sched2.schedule()
    assert out.is_empty and out.preempted == (solo,)
    check_block_invariants(sched2)


def test_finish_frees_blocks_of_running_and_waiting_sequences() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=1)
    running, waiting = make_seq(10), make_seq(10)
    sched.add(running)
    sched.add(waiting)
    sched.schedule()
    sched.finish(running)
    sched.finish(waiting)
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_work
    assert running.is_finished and waiting.is_finished


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_completes_without_leaks_or_starvation(seed: int) -> None:
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=24, block_size=4, max_num_seqs=6, budget=16,
                           max_model_len=96)
    pending = [make_seq(rng.randint(1, 40), max_tokens=rng.randint(1, 30)) for _ in range(40)]
    all_seqs = list(pending)
    done: list[Sequence] = []
    for _ in range(5000):
        if pending and rng.random() < 0.3:
            sched.add(pending.pop(0))
        out = sched.schedule()
        assert out.num_batched_tokens <= 16
        assert len(sched.running) <= 6
        done.extend(complete_step(sched, out))
        check_block_invariants(sched)
        if not pending and not sched.has_work:
            break
    assert len(done) == len(all_seqs), "some request never finished"
    assert all(s.num_output_tokens == s.params.max_tokens for s in all_seqs)
    assert sched.block_manager.num_available_blocks == 24
    # Preemption was exercised by this tight pool.
    assert sched.num_preemptions_total > 0


def test_block_manager_pairs() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(1)
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(4) == 1 and bm.blocks_needed(5) == 2
    assert bm.can_allocate(seq, 12) and not bm.can_allocate(seq, 13)
    bm.allocate(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 1
    bm.allocate(seq, 8)  # already enough
    assert len(seq.block_table) == 2
    with pytest.raises(RuntimeError):
        bm.allocate(seq, 13)
    bm.free(seq)
    assert bm.num_free_blocks == 3 and seq.block_table == []


def test_running_sequences_never_use_more_than_max_loras_adapters() -> None:
    """With two slots, a third adapter's request waits (and holds back those behind it: no
    overtaking) until the last request of a running adapter ends; base requests and requests
    for adapters already running are admitted."""
    from engine.lora.registry import LoraHandle

    handles = {name: LoraHandle(i, name, f"lora:{name}:d") for i, name in
               enumerate(("a", "b", "c"), start=1)}
    sched = Scheduler(SchedulerConfig(8, 64, 256, max_loras=2), BlockManager(64, 4))

    def add(lora: str | None, max_tokens: int) -> Sequence:
        seq = make_seq(3, max_tokens)
        seq.lora = None if lora is None else handles[lora]
        sched.add(seq)
        return seq

    a, b, base, a2, c, late = (add("a", 2), add("b", 4), add(None, 4), add("a", 4), add("c", 4),
                               add(None, 4))
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [a, b, base, a2]  # c would be a third adapter
    complete_step(sched, out)
    out = sched.schedule()
    assert late not in [s.seq for s in out.scheduled]  # behind c: no overtaking
    complete_step(sched, out)  # a ends (2 tokens); a2 still runs with "a"
    assert a.is_finished and c in sched.waiting
    for _ in range(2):
        out = sched.schedule()
        assert c not in [s.seq for s in out.scheduled]
        for seq in complete_step(sched, out):
            assert seq is not c
    # b and a2 have finished (4 tokens each): c and then late get in.
    out = sched.schedule()
    assert [s.seq for s in out.scheduled][-2:] == [c, late]
    check_block_invariants(sched)
