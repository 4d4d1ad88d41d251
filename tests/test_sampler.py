"""The batched sampler against a per-row reference written with plain Python floats."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from engine.params import SamplingParams
from engine.sampling import Sampler, SamplingRow

NEG_INF = float("-inf")


def make_row(params: SamplingParams, prompt: Sequence[int] = (), output: Sequence[int] = (),
             generator: torch.Generator | None = None,
             suppress: tuple[int, ...] = ()) -> SamplingRow:
    return SamplingRow(params=params, prompt_token_ids=list(prompt),
                       output_token_ids=list(output), generator=generator,
                       suppress_token_ids=suppress)


def seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def softmax(x: Sequence[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    total = sum(e)
    return [v / total for v in e]


def reference_logits(logits: Sequence[float], row: SamplingRow) -> list[float]:
    """What the sampler should pick from, one row at a time, in the documented order."""
    p = row.params
    x = list(logits)
    vocab = len(x)
    for t, bias in p.logit_bias.items():
        if t < vocab:
            x[t] += bias
    for t in row.suppress_token_ids:
        x[t] = NEG_INF
    if p.repetition_penalty != 1.0:
        for t in set(row.prompt_token_ids) | set(row.output_token_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, count in Counter(row.output_token_ids).items():
        x[t] -= p.frequency_penalty * count + p.presence_penalty
    if p.greedy:
        return x
    x = [v / p.temperature for v in x]
    ranked = sorted(range(vocab), key=lambda j: -x[j])  # stable: ties rank the lower id first
    kept = set(ranked[:p.top_k or vocab])
    x = [v if j in kept else NEG_INF for j, v in enumerate(x)]
    if p.top_p < 1.0:
        probs = softmax(x)
        mass = 0.0
        for j in ranked:
            if mass >= p.top_p:
                x[j] = NEG_INF
            mass += probs[j]
    if p.min_p > 0.0:
        probs = softmax(x)
        top = max(probs)
        x = [NEG_INF if probs[j] < p.min_p * top else v for j, v in enumerate(x)]
    return x


def assert_logits_match(got: torch.Tensor, want: Sequence[float]) -> None:
    want_t = torch.tensor(want, dtype=torch.float32)
    assert torch.equal(torch.isinf(got), torch.isinf(want_t))
    finite = ~torch.isinf(want_t)
    torch.testing.assert_close(got[finite], want_t[finite], rtol=1e-5, atol=1e-5)


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    greedy = rng.random() < 0.25
    return SamplingParams(
        temperature=0.0 if greedy else rng.choice([0.3, 0.7, 1.0, 1.5]),
        top_k=rng.choice([None, None, 1, 5, 20]),
        top_p=rng.choice([1.0, 1.0, 0.5, 0.9]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.2]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.0, 0.5, -1.0]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.3, -0.4]),
        logit_bias=rng.choice([{}, {}, {rng.randrange(vocab): rng.uniform(-5, 5),
                                        rng.randrange(vocab): 100.0 * rng.choice([-1, 1])}]),
    )


def test_process_matches_the_per_row_reference_over_random_batches() -> None:
    vocab = 64
    rng = random.Random(0)
    torch.manual_seed(0)
    sampler = Sampler(vocab)
    for _ in range(30):
        batch = rng.randint(1, 12)
        rows = [make_row(random_params(rng, vocab),
                         prompt=[rng.randrange(vocab) for _ in range(rng.randint(0, 10))],
                         output=[rng.randrange(vocab) for _ in range(rng.randint(0, 10))],
                         suppress=tuple(rng.sample(range(vocab), rng.choice([0, 0, 2]))))
                for _ in range(batch)]
        logits = torch.randn(batch, vocab) * 3
        got = sampler.process(logits, rows)
        for i, row in enumerate(rows):
            assert_logits_match(got[i], reference_logits(logits[i].tolist(), row))


def test_penalties_against_hand_computed_values() -> None:
    sampler = Sampler(5)
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                            presence_penalty=0.25, logit_bias={2: 1.5, 4: -100.0})
    got = sampler.process(logits, [make_row(params, prompt=[0, 1], output=[1, 3, 3])])
    # id 0: seen in the prompt, positive: 2 / 2. id 1: seen, negative: -1 * 2, then once in the
    # output: -0.5 - 0.25. id 2: bias only. id 3: 3 / 2, twice in the output: -1.0 - 0.25.
    # id 4: bias only (not seen anywhere).
    torch.testing.assert_close(got, torch.tensor([[1.0, -2.75, 2.0, 0.25, -102.0]]))


def test_penalties_only_touch_the_rows_that_ask() -> None:
    sampler = Sampler(5)
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]] * 3)
    rows = [make_row(SamplingParams(temperature=0.0), prompt=[0, 1], output=[3]),
            make_row(SamplingParams(temperature=0.0, presence_penalty=1.0), output=[3]),
            make_row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0])]
    got = sampler.process(logits, rows)
    torch.testing.assert_close(got[0], logits[0])
    torch.testing.assert_close(got[1], torch.tensor([2.0, -1.0, 0.5, 2.0, -2.0]))
    torch.testing.assert_close(got[2], torch.tensor([1.0, -1.0, 0.5, 3.0, -2.0]))


@pytest.mark.parametrize(("top_k", "top_p", "min_p", "kept"), [
    (None, 1.0, 0.4, {0, 1}),  # min_p: p >= 0.4 * 0.5
    (None, 0.7, 0.0, {0, 1}),  # 0.5 < 0.7, 0.75 >= 0.7: the third token is cut
    (None, 0.8, 0.0, {0, 1, 2}),
    (3, 1.0, 0.0, {0, 1, 2}),
    (2, 0.9, 0.0, {0, 1}),  # renormalised after top-k: [2/3, 1/3] both needed for 0.9
    (1, 1.0, 0.0, {0}),
])
def test_truncation_masks(top_k: int | None, top_p: float, min_p: float, kept: set[int]) -> None:
    sampler = Sampler(4)
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.15), math.log(0.1)]])
    params = SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)
    got = sampler.process(logits, [make_row(params)])[0]
    assert {j for j in range(4) if got[j] != NEG_INF} == kept


def test_top_k_keeps_the_lower_ids_among_equal_logits() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0, 1.0]])
    got = Sampler(6).process(logits, [make_row(SamplingParams(top_k=2))])[0]
    assert [j for j in range(6) if got[j] != NEG_INF] == [1, 2]


def test_suppression_wins_over_a_positive_bias() -> None:
    logits = torch.zeros(1, 8)
    params = SamplingParams(temperature=0.0, logit_bias={3: 100.0})
    out = Sampler(8)(logits, [make_row(params, suppress=(3,))])
    assert out.token_ids != [3]


def test_greedy_is_the_argmax_and_top_k_one_is_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(40, 100)
    sampler = Sampler(100)
    greedy = sampler(logits, [make_row(SamplingParams(temperature=0.0))] * 40)
    assert greedy.token_ids == logits.argmax(dim=-1).tolist()
    top1 = sampler(logits, [make_row(SamplingParams(temperature=1.3, top_k=1))] * 40)
    assert top1.token_ids == greedy.token_ids


def test_padding_columns_are_never_chosen() -> None:
    logits = torch.randn(16, 40)
    logits[:, 32:] = 1e4  # padding past the vocabulary
    sampler = Sampler(32)
    out = sampler(logits, [make_row(SamplingParams(temperature=t)) for t in (0.0, 1.0) * 8])
    assert all(0 <= t < 32 for t in out.token_ids)
    assert out.token_ids[0] == int(logits[0, :32].argmax())


def test_logit_bias_minus_100_forbids_and_plus_100_forces() -> None:
    torch.manual_seed(2)
    logits = torch.randn(200, 50)
    logits[:, 7] = 10.0  # the favourite, by far
    sampler = Sampler(50)
    forbid = SamplingParams(temperature=1.0, logit_bias={7: -100.0})
    out = sampler(logits, [make_row(forbid)] * 200)
    assert 7 not in out.token_ids
    force = SamplingParams(temperature=1.0, logit_bias={3: 100.0})
    assert set(sampler(logits, [make_row(force)] * 200).token_ids) == {3}
    greedy_forced = SamplingParams(temperature=0.0, logit_bias={3: 100.0})
    assert set(sampler(logits, [make_row(greedy_forced)] * 200).token_ids) == {3}


def test_logit_bias_past_the_vocabulary_is_ignored() -> None:
    logits = torch.randn(1, 10)
    out = Sampler(10)(logits, [make_row(SamplingParams(temperature=0.0,
                                                       logit_bias={50: 100.0}))])
    assert out.token_ids == [int(logits.argmax())]


def test_suppressed_ids_are_never_chosen() -> None:
    logits = torch.zeros(100, 20)
    logits[:, 2] = 20.0
    logits[:, 5] = 19.0
    sampler = Sampler(20)
    rows = [make_row(SamplingParams(temperature=t), suppress=(2,)) for t in (0.0, 1.0) * 50]
    out = sampler(logits, rows)
    assert 2 not in out.token_ids and out.token_ids[0] == 5


def test_sampling_follows_the_processed_distribution() -> None:
    vocab, n = 6, 30_000
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=5)
    row = make_row(params)
    want = softmax(reference_logits(logits[0].tolist(), row))
    out = Sampler(vocab, seed=3)(logits.expand(n, vocab), [row] * n)
    counts = Counter(out.token_ids)
    for j in range(vocab):
        sigma = math.sqrt(n * want[j] * (1 - want[j])) + 1e-9
        assert abs(counts[j] - n * want[j]) <= 5 * sigma + 1, (j, counts[j], n * want[j])
    assert counts[5] == 0  # cut by top-k


def test_a_seeded_row_follows_the_distribution_too() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    row = make_row(SamplingParams(temperature=1.0), generator=seeded(11))
    sampler = Sampler(3)
    n = 3000
    counts = Counter(sampler(logits, [row]).token_ids[0] for _ in range(n))
    for j, p in enumerate(softmax([0.0, 1.0, 2.0])):
        assert abs(counts[j] - n * p) <= 5 * math.sqrt(n * p * (1 - p))


def _run_seeded(position: int, crowd: int, steps: int, seed: int, crowd_seed: int) -> list[int]:
    """Tokens of one seeded request over ``steps`` steps, sitting at ``position`` in a batch of
    ``crowd`` other rows whose params and logits come from ``crowd_seed``."""
    vocab = 64
    logits_rng = torch.Generator().manual_seed(1000)  # the seeded row's logits, step by step
    crowd_rng = random.Random(crowd_seed)
    crowd_logits = torch.Generator().manual_seed(crowd_seed)
    params = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01, seed=seed,
                            presence_penalty=0.2)
    generator = seeded(seed)
    others = [(random_params(crowd_rng, vocab),
               seeded(crowd_rng.randrange(1 << 30)) if crowd_rng.random() < 0.5 else None)
              for _ in range(crowd)]
    sampler = Sampler(vocab, seed=crowd_seed)
    output: list[int] = []
    for _ in range(steps):
        mine = torch.randn(1, vocab, generator=logits_rng) * 2
        theirs = torch.randn(crowd, vocab, generator=crowd_logits) * 2
        rows = [make_row(p, prompt=[1, 2], output=[3] * len(output), generator=g)
                for p, g in others]
        rows.insert(position, make_row(params, prompt=[1, 2], output=output,
                                       generator=generator))
        logits = torch.cat([theirs[:position], mine, theirs[position:]])
        output = output + [sampler(logits, rows).token_ids[position]]
    return output


def test_seeded_rows_give_the_same_tokens_whatever_the_batch() -> None:
    alone = _run_seeded(position=0, crowd=0, steps=40, seed=42, crowd_seed=1)
    assert _run_seeded(position=3, crowd=7, steps=40, seed=42, crowd_seed=2) == alone
    assert _run_seeded(position=0, crowd=4, steps=40, seed=42, crowd_seed=3) == alone
    assert _run_seeded(position=5, crowd=5, steps=40, seed=42, crowd_seed=4) == alone
    assert _run_seeded(position=0, crowd=0, steps=40, seed=43, crowd_seed=1) != alone


def test_the_shared_generator_is_reproducible_from_the_sampler_seed() -> None:
    logits = torch.randn(8, 50)
    rows = [make_row(SamplingParams(temperature=1.0))] * 8
    first = [Sampler(50, seed=5)(logits, rows).token_ids for _ in range(2)]
    assert first[0] == first[1]
    sampler = Sampler(50, seed=5)
    assert sampler(logits, rows).token_ids == first[0]
    assert sampler(logits, rows).token_ids != first[0]  # the generator moved on


def test_logprobs_are_the_log_softmax_of_the_raw_logits() -> None:
    torch.manual_seed(4)
    vocab = 30
    logits = torch.randn(4, vocab + 2) * 2  # two padding columns
    original = logits.clone()
    rows = [
        make_row(SamplingParams(temperature=0.0, logprobs=3)),
        make_row(SamplingParams(temperature=1.5, top_k=4, logprobs=5, repetition_penalty=1.5,
                                logit_bias={1: 7.0}), output=[0, 1]),
        make_row(SamplingParams(temperature=1.0)),
        make_row(SamplingParams(temperature=0.7, logprobs=0)),
    ]
    out = Sampler(vocab)(logits, rows)
    assert torch.equal(logits, original)  # the caller's logits are untouched
    assert out.logprobs[2] is None
    want = torch.log_softmax(logits[:, :vocab], dim=-1)
    for i, k in ((0, 3), (1, 5), (3, 0)):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(want[i, lp.token_id]), abs=1e-6)
        values, ids = want[i].topk(k)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
    greedy = out.logprobs[0]
    assert greedy is not None and greedy.top[0][0] == greedy.token_id


def test_logprobs_over_the_whole_batch_are_exact() -> None:
    torch.manual_seed(5)
    logits = torch.randn(3, 20)
    out = Sampler(20)(logits, [make_row(SamplingParams(temperature=1.0, logprobs=20))] * 3)
    want = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(out.logprobs):
        assert lp is not None
        assert lp.logprob == float(want[i, lp.token_id])
        assert [v for _, v in lp.top] == want[i].sort(descending=True).values.tolist()


def test_bad_logits_shapes_are_refused() -> None:
    sampler = Sampler(10)
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [make_row(SamplingParams())])
    with pytest.raises(ValueError):
        sampler(torch.zeros(1, 9), [make_row(SamplingParams())])
    assert sampler(torch.zeros(0, 10), []).token_ids == []
