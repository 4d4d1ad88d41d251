"""The grammar mask on a GPU: pinned upload, device unpacking and the sampler's result equal to
the CPU's for the same rows, with a 32000-token vocabulary (Llama 2's)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.params import SamplingParams
from engine.sampling import Sampler
from engine.sampling.grammar_mask import GrammarMasks, bitmask_words
from tests.test_sampler import make_row

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
VOCAB = 32000


def random_masks(rows: tuple[int, ...], seed: int) -> GrammarMasks:
    words = torch.randint(-(2**31), 2**31 - 1, (len(rows), bitmask_words(VOCAB)),
                          generator=torch.Generator().manual_seed(seed), dtype=torch.int64)

    def fill(bitmask: torch.Tensor) -> None:
        bitmask.copy_(words.to(torch.int32))

    return GrammarMasks(rows=rows, fill=fill)


@pytest.mark.parametrize("rows", [(0, 1, 2, 3), (1, 3)])
def test_gpu_mask_matches_the_cpu(rows: tuple[int, ...]) -> None:
    logits = torch.randn(4, VOCAB + 64)
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.8, top_p=0.9, seed=5),
              SamplingParams(temperature=0.0, repetition_penalty=1.2),
              SamplingParams(temperature=1.0, top_k=50, seed=9)]
    batch = [make_row(p, prompt=random.Random(i).sample(range(VOCAB), 20))
             for i, p in enumerate(params)]
    cpu = Sampler(VOCAB).process(logits, batch, random_masks(rows, 1))
    gpu = Sampler(VOCAB).process(logits.cuda(), batch, random_masks(rows, 1)).cpu()
    assert torch.equal(torch.isinf(cpu), torch.isinf(gpu))
    finite = ~torch.isinf(cpu)
    torch.testing.assert_close(gpu[finite], cpu[finite], rtol=1e-5, atol=1e-5)
    out = Sampler(VOCAB)(logits.cuda(), batch, random_masks(rows, 1))
    for r in rows:
        assert not torch.isinf(cpu[r, out.token_ids[r]])
