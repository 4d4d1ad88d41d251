"""Whole-model logits on the GPU: our CUDA engine (Triton GPTQ kernels with exllamav2's where
faster, Triton and SDPA attention, fp16) against the torch reference backends (float32) and
against exllamav2's own ExLlamaV2 model on the same synthetic checkpoint folder.

Logits are read through the engine's paged path three ways: one prefill, prefill in chunks
(the Triton kernel over cached context) and prefill then single-token decode steps (the Triton
decode kernel).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.engine_helpers import logits_after, small_cuda_engine, synth_tiny_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

# (bits, group size, act-order): the 4-bit branches, and 8-bit (the w8a16 kernels).
LAYOUTS = [(4, 128, False), (4, 32, True), (4, 64, True), (8, 128, True)]


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"{p[0]}bit-g{p[1]}-ao{p[2]}")
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bits, group, act_order = request.param
    return synth_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{bits}-{group}-{act_order}"),
                                 request.param, seed=bits + group)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite logits"
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("linear_backend", ["auto", "triton"])
def test_cuda_engine_matches_torch_reference(checkpoint: Path, linear_backend: str) -> None:
    from engine.model.linear import mma

    cuda = small_cuda_engine(checkpoint, linear_backend=linear_backend)
    info = cuda.model_info
    # auto: 4-bit layers on the tensor-core kernel where it builds; triton: Triton + exllamav2.
    four_bit = "triton+mma" if linear_backend == "auto" and mma.available() else "triton+exllama"
    expected_linear = four_bit if info.bits == 4 else "triton"
    assert (info.linear_backend, info.attention_backend) == (expected_linear, "triton")
    ref = small_cuda_engine(checkpoint, linear_backend="torch", attention_backend="torch",
                  dtype="float32")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cuda.tokenizer.vocab_size, (77,), generator=gen).tolist()
    want = logits_after(ref, prompt, [77])
    for steps in ([77], [16, 16, 16, 29], [70, 1, 1, 1, 1, 1, 1, 1]):
        assert rel_err(logits_after(cuda, prompt, steps), want) < 2e-2, steps


# exllamav2's model is run with its matmul attention (exl2_logits): its SDPA fallback, used when
# flash-attn is absent, attends without a causal mask during prefill (see exl2_baseline.py).
def test_cuda_engine_matches_exllamav2_model(checkpoint: Path) -> None:
    from engine.bench.exl2_baseline import exl2_logits

    if json.loads((checkpoint / "quantize_config.json").read_text())["bits"] != 4:
        pytest.skip("exllamav2 has no 8-bit GPTQ kernel")
    cuda = small_cuda_engine(checkpoint)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, cuda.tokenizer.vocab_size, (50,), generator=gen).tolist()
    ours = logits_after(cuda, prompt, [50])
    theirs = exl2_logits(checkpoint, prompt)[:ours.shape[0]]
    assert rel_err(ours, theirs) < 2e-2


def test_decode_graph_replay_matches_eager_step(checkpoint: Path) -> None:
    """A decode step replayed from a captured graph gives the eager step's logits, for a batch
    that is padded up to its bucket (3 sequences in the graph of 4)."""
    from engine.core.batch import build_step_inputs
    from engine.params import SamplingParams

    # Each step resolved before the next: the step built by hand below has every token.
    engine = small_cuda_engine(checkpoint, overlap_steps=False)
    runner = engine.runner
    assert runner.graphs is not None and runner.graphs.bucket_for(3) == 4
    for i, n in enumerate((5, 40, 17)):
        engine.add_request(f"g{i}", list(range(3, 3 + n)),
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for _ in range(3):  # prefills, then plain decode steps (through the graphs)
        engine.step()
    out = engine.scheduler.schedule()
    assert len(out.scheduled) == 3 and all(s.num_new_tokens == 1 for s in out.scheduled)
    inputs = build_step_inputs(out, engine.scheduler.block_manager.block_size,
                               runner.model.device)
    saved = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    eager = runner.model.compute_logits(runner.model.forward(
        inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta))
    for (k, v), (k0, v0) in zip(runner.kv_caches, saved, strict=True):
        k.copy_(k0)
        v.copy_(v0)
    replayed = runner.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
    assert rel_err(replayed.cpu(), eager.cpu()) < 1e-2
    # Padding rows wrote only the sink block, past the pool the block manager hands out.
    pool_blocks = engine.scheduler.block_manager.num_blocks
    assert runner.kv_caches[0][0].shape[0] == pool_blocks + 1
