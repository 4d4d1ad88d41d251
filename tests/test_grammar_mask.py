"""The grammar mask inside the batched sampler, against plain per-row reasoning: only the
constrained rows change, forbidden tokens become -inf before every other stage, logprobs are
renormalised over the allowed tokens, and a seeded row draws the same token however the batch
around it is constrained."""

from __future__ import annotations

import random

import pytest
import torch

from engine.params import SamplingParams
from engine.sampling import Sampler
from engine.sampling.grammar_mask import GrammarMasks, bitmask_words
from tests.test_sampler import make_row, seeded

VOCAB = 70  # not a multiple of 32: the last bitmask word is partly padding


def masks_for(allowed: dict[int, set[int]]) -> GrammarMasks:
    """GrammarMasks for rows -> allowed ids, packed as llguidance packs them."""
    rows = tuple(sorted(allowed))

    def fill(bitmask: torch.Tensor) -> None:
        assert bitmask.shape == (len(rows), bitmask_words(VOCAB))
        bitmask.zero_()
        for j, row in enumerate(rows):
            for t in allowed[row]:
                word = int(bitmask[j, t // 32]) | (1 << (t % 32))
                bitmask[j, t // 32] = word - (1 << 32) if word >= 1 << 31 else word

    return GrammarMasks(rows=rows, fill=fill)


@pytest.mark.parametrize("constrained", [[1], [0, 2], [0, 1, 2]])
def test_only_constrained_rows_change(constrained: list[int]) -> None:
    rng = random.Random(len(constrained))
    logits = torch.randn(3, VOCAB + 6)  # padding columns past the vocabulary
    allowed = {r: set(rng.sample(range(VOCAB), 9)) | {31, 32, 63} for r in constrained}
    rows = [make_row(SamplingParams(temperature=0.0, logit_bias={5: 3.0})) for _ in range(3)]
    sampler = Sampler(VOCAB)
    plain = sampler.process(logits, rows)
    masked = sampler.process(logits, rows, masks_for(allowed))
    for r in range(3):
        if r not in allowed:
            assert torch.equal(masked[r], plain[r])
            continue
        keep = torch.zeros(VOCAB, dtype=torch.bool)
        keep[list(allowed[r])] = True
        assert torch.isinf(masked[r][~keep]).all()
        assert torch.equal(masked[r][keep], plain[r][keep])
    out = sampler(logits, rows, masks_for(allowed))
    for r in allowed:
        assert out.token_ids[r] in allowed[r]


def test_logprobs_are_renormalised_over_the_allowed_tokens() -> None:
    logits = torch.randn(2, VOCAB)
    allowed = {0: {3, 40, 41, 69}}
    rows = [make_row(SamplingParams(temperature=0.0, logprobs=6)),
            make_row(SamplingParams(temperature=0.0, logprobs=2))]
    out = Sampler(VOCAB)(logits, rows, masks_for(allowed))
    ids = sorted(allowed[0])
    expected = torch.log_softmax(logits[0, ids], dim=-1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == ids[int(expected.argmax())]
    assert [t for t, _ in first.top] == [ids[i] for i in expected.argsort(descending=True)]
    torch.testing.assert_close(torch.tensor([v for _, v in first.top]),
                               expected.sort(descending=True).values)
    second = out.logprobs[1]  # the unconstrained row: the raw distribution
    assert second is not None
    torch.testing.assert_close(torch.tensor(second.logprob),
                               torch.log_softmax(logits[1], -1).max())


def test_the_mask_comes_before_bias_penalties_and_truncation() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 50.0  # the model's favourite, which the grammar forbids
    params = SamplingParams(temperature=1.0, top_k=1, logit_bias={9: 100.0}, seed=1)
    out = Sampler(VOCAB)(logits, [make_row(params, generator=seeded(1))],
                         masks_for({0: {8, 10}}))
    assert out.token_ids == [8] or out.token_ids == [10]


def test_seeded_rows_are_batch_invariant_under_masks() -> None:
    logits = torch.randn(4, VOCAB)
    target = SamplingParams(temperature=1.0, seed=11)
    allowed = {2: set(range(0, VOCAB, 3))}
    alone = Sampler(VOCAB)(logits[2:3], [make_row(target, generator=seeded(11))],
                           masks_for({0: allowed[2]}))
    others = {0: {1, 2}, 1: set(range(20)), 2: allowed[2]}
    rows = [make_row(SamplingParams(temperature=1.0, seed=s), generator=seeded(s))
            for s in (1, 2)] + [make_row(target, generator=seeded(11)),
                                make_row(SamplingParams(temperature=0.7))]
    batch = Sampler(VOCAB)(logits, rows, masks_for(others))
    assert batch.token_ids[2] == alone.token_ids[0]
