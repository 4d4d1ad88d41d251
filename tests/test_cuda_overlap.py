"""Overlapped steps and warm-up on the GPU path (Triton linears and attention, decode graphs):
after the warm-up no request compiles a Triton kernel, whatever its shape; a steady decode
step synchronises with the device only at its one fetch; and overlapped steps give the tokens
of steps resolved one at a time."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine
from engine.core.warmup import SAMPLER_PATHS, warm_up
from engine.params import SamplingParams
from tests.engine_helpers import output_tokens, run_to_completion

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

MAX_SEQS = 16
BUDGET = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.checkpoint.synth import SynthSpec, synthesize

    path = tmp_path_factory.mktemp("tiny-overlap")
    synthesize(SynthSpec("tiny", 4, 128, False, seed=5, device="cuda"), path)
    return path


def _engine(path: Path, overlap: bool = True) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(
        model=str(path), revision=None, offline=True, device="cuda", num_kv_blocks=512,
        max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET, max_model_len=1024,
        overlap_steps=overlap))


def _mixed_requests(engine: LLMEngine, n: int, seed: int
                    ) -> dict[str, tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    out = {}
    for i in range(n):
        length = rng.choice((1, 3, 17, 63, 200, 700))  # chunked past the step budget too
        path = SAMPLER_PATHS[i % len(SAMPLER_PATHS)]
        out[f"m{seed}-{i}"] = ([rng.randrange(3, vocab) for _ in range(length)],
                               dataclasses.replace(path, max_tokens=rng.randint(max(1, path.min_tokens), 12),
                                                   ignore_eos=True))
    return out


def test_no_request_compiles_a_kernel_after_the_warm_up(checkpoint: Path) -> None:
    triton = pytest.importorskip("triton")
    engine = _engine(checkpoint)
    warm_up(engine)
    compiled: list[str] = []
    knobs = triton.knobs.runtime
    knobs.jit_post_compile_hook = lambda **kw: compiled.append(str(kw.get("repr")))
    try:
        for seed in range(4):
            # Batches of every size up to the largest, every sampler path, prefills of odd
            # and even sizes, chunked prefills mixed with decodes.
            run_to_completion(engine, _mixed_requests(engine, 1 + 5 * seed, seed))
    finally:
        knobs.jit_post_compile_hook = None
    assert compiled == [], f"kernels compiled after the warm-up: {compiled}"


def test_a_steady_step_waits_for_the_device_only_at_its_fetch(checkpoint: Path) -> None:
    """torch's sync debug mode raises on every synchronising call (.item(), .tolist() of a
    device tensor, a pageable copy, a stream or device synchronize). The step's one wait is
    an event's synchronize, which it does not count."""
    engine = _engine(checkpoint)
    warm_up(engine)
    requests = _mixed_requests(engine, MAX_SEQS, seed=9)
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, dataclasses.replace(params, max_tokens=40))
    for _ in range(12):  # prefills done, every row decoding
        engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.has_work:
        engine.step()


def test_overlapped_steps_give_the_tokens_of_resolved_steps(checkpoint: Path) -> None:
    overlapped, resolved = _engine(checkpoint, True), _engine(checkpoint, False)
    assert overlapped.runner.graphs is not None
    requests = {rid: (prompt, params) for rid, (prompt, params)
                in _mixed_requests(overlapped, 24, seed=3).items()
                if params.greedy or params.seed is not None}
    got = run_to_completion(overlapped, requests)
    want = run_to_completion(resolved, requests)
    for rid in requests:
        assert output_tokens(got[rid]) == output_tokens(want[rid]), rid
