"""Prefix caching on the GPU path (exllama linears, SDPA for fresh prompts, the Triton paged
kernels over a cached context, decode graphs): a prompt whose prefix comes from the cache gets
the first-token distribution an engine without the cache gives, whether its uncached rest is a
long chunk (Triton paged prefill) or a single token (run as a decode step, graph-replayed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine
from engine.ipc.messages import RequestOutput
from engine.params import SamplingParams

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

BLOCK = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.checkpoint.synth import SynthSpec, synthesize

    path = tmp_path_factory.mktemp("tiny-prefix")
    synthesize(SynthSpec("tiny", 4, 128, False, seed=3, device="cuda"), path)
    return path


def _engine(path: Path, caching: bool) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(
        model=str(path), revision=None, offline=True, device="cuda", num_kv_blocks=128,
        block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512,
        enable_prefix_caching=caching))


def _first_token(engine: LLMEngine, prompt: list[int], rid: str) -> RequestOutput:
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1,
                                                   ignore_eos=True, logprobs=5))
    deltas: list[RequestOutput] = []
    while engine.has_work:
        deltas.extend(engine.step())
    assert len(deltas) == 1 and deltas[0].logprobs is not None
    return deltas[0]


@pytest.mark.parametrize(("shared", "tail"), [(40, 30), (6 * BLOCK + 3, 1), (2 * BLOCK, 1)])
def test_cached_prefix_gives_the_uncached_first_token(checkpoint: Path, shared: int,
                                                      tail: int) -> None:
    on, off = _engine(checkpoint, True), _engine(checkpoint, False)
    gen = torch.Generator().manual_seed(shared)
    vocab = on.tokenizer.vocab_size
    prefix = torch.randint(3, vocab, (shared,), generator=gen).tolist()
    first = prefix + torch.randint(3, vocab, (20,), generator=gen).tolist()
    second = prefix + torch.randint(3, vocab, (tail,), generator=gen).tolist()
    _first_token(on, first, "first")
    got = _first_token(on, second, "second")
    want = _first_token(off, second, "second")
    assert got.num_cached_tokens == min(shared, len(second) - 1) // BLOCK * BLOCK > 0
    assert got.logprobs is not None and want.logprobs is not None
    mine, theirs = dict(got.logprobs[0].top), dict(want.logprobs[0].top)
    common = mine.keys() & theirs.keys()
    assert len(common) >= 4
    assert max(abs(mine[t] - theirs[t]) for t in common) < 5e-2
    # Greedy picks the same token, or one tied with it within fp16 noise.
    assert theirs.get(got.token_ids[0], -float("inf")) > max(theirs.values()) - 5e-2
    blocks = on.scheduler.block_manager
    assert blocks.num_available_blocks == blocks.num_blocks
