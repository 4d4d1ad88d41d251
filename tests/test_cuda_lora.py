"""LoRA on the GPU: the grouped Triton kernels against the torch reference at 13B's layer
shapes in fp16, and the CUDA engine (Triton GPTQ linears, fused q/k/v and gate/up, decode
graphs with and without LoRA) against the CPU engine (float32, torch paths, itself checked
against transformers + PEFT in tests/test_lora_engine.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine
from engine.lora.spec import LoraConfig, LoraSpec
from engine.lora.synth import AdapterSpec
from engine.model.lora.base import LoraSite
from engine.model.lora.batching import lora_batch
from engine.model.lora.torch_ref import TorchLoraKernels
from engine.model.lora.triton_sgmv import TritonLoraKernels
from engine.params import SamplingParams
from tests.lora_helpers import lora_logits, make_adapter

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CUDA = torch.device("cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("k", "outs"), [(5120, (5120, 5120, 5120)), (5120, (13824, 13824)),
                                         (13824, (5120,)), (5120, (5120,))])
@pytest.mark.parametrize("rows", [[1] * 32, [1] * 7, [300, 1, 1, 57]])
def test_triton_kernels_match_the_reference_at_13b_shapes(k: int, outs: tuple[int, ...],
                                                          rows: list[int]) -> None:
    gen = torch.Generator(device=CUDA).manual_seed(k + len(rows))
    max_loras, rank = 4, 16
    site = LoraSite(0, tuple(f"p{i}" for i in range(len(outs))), k, outs, max_loras, rank,
                    torch.float16, CUDA)
    for slot in range(max_loras):
        site.write(slot, [(torch.randn(rank - slot, k, generator=gen, device=CUDA).half()
                           / k ** 0.5,
                           torch.randn(n, rank - slot, generator=gen, device=CUDA).half() * 0.05)
                          for n in outs])
    slots = [(i % (max_loras + 1)) - 1 for i in range(len(rows))]  # base rows among them
    t = sum(rows)
    x = torch.randn(t, k, generator=gen, device=CUDA).half()
    y = torch.randn(t, sum(outs), generator=gen, device=CUDA).half()

    def upload(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=CUDA)

    batch = lora_batch(slots, rows, max_loras, upload)
    assert batch is not None
    want = y.float().clone()
    float_site = LoraSite(0, site.modules, k, outs, max_loras, rank, torch.float32, CUDA)
    float_site.a.copy_(site.a)
    float_site.b.copy_(site.b)
    TorchLoraKernels().add(want, x.float(), float_site, batch)
    got = y.clone()
    TritonLoraKernels(t, site.a.shape[1], CUDA).add(got, x, site, batch)
    assert rel_err(got - y, want - y.float()) < 5e-3  # the delta itself, not only the sum
    base_rows = [r for (start, n), s in zip(_starts(rows), slots, strict=True) if s < 0
                 for r in range(start, start + n)]
    assert torch.equal(got[base_rows], y[base_rows])


def _starts(rows: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in rows:
        out.append((start, n))
        start += n
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.checkpoint.synth import SynthSpec, synthesize

    path = tmp_path_factory.mktemp("tiny-lora")
    synthesize(SynthSpec("tiny", 4, 128, False, seed=5, device="cuda"), path)
    return path


@pytest.fixture(scope="module")
def adapters(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda-adapters")
    return {"all7": make_adapter(root, checkpoint, AdapterSpec(rank=16, alpha=16, seed=1)),
            "qv": make_adapter(root, checkpoint, AdapterSpec(rank=8, alpha=16, seed=2,
                                                             target_modules=("q_proj",
                                                                             "v_proj"))),
            "mlp": make_adapter(root, checkpoint, AdapterSpec(rank=4, alpha=8, seed=3,
                                                              use_rslora=True,
                                                              target_modules=("gate_proj",
                                                                              "up_proj",
                                                                              "down_proj")))}


def _lora(adapters: dict[str, Path], max_loras: int) -> LoraConfig:
    return LoraConfig(max_loras=max_loras, max_lora_rank=16,
                      adapters=tuple(LoraSpec(n, str(p)) for n, p in adapters.items()))


def test_cuda_engine_logits_with_adapters_match_the_cpu_reference(
        checkpoint: Path, adapters: dict[str, Path]) -> None:
    gpu = LLMEngine.from_config(EngineConfig(
        model=str(checkpoint), revision=None, offline=True, device="cuda", num_kv_blocks=128,
        max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512,
        lora=_lora(adapters, 2)))
    cpu = LLMEngine.from_config(EngineConfig(
        model=str(checkpoint), revision=None, offline=True, device="cpu", dtype="float32",
        num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512,
        lora=_lora(adapters, 3)))
    assert gpu.runner.graphs is not None and gpu.runner.graphs.captures_lora
    prompt = list(range(3, 3 + 45))
    for name in (None, *adapters):
        want = lora_logits(cpu, name, prompt)
        assert rel_err(lora_logits(gpu, name, prompt), want) < 1e-2, name
        assert rel_err(lora_logits(gpu, name, prompt, [20, 24, 1]), want) < 1e-2, name


def test_decode_graphs_with_lora_equal_eager_steps(checkpoint: Path,
                                                   adapters: dict[str, Path]) -> None:
    """A decode step of adapter and base rows replayed through the LoRA graph gives the logits
    of the same step run eagerly; a step of base rows only takes the graph without LoRA.
    Steps resolved one at a time: the test builds a step's inputs itself, so no sampled token
    may still be pending on the device."""
    engine = LLMEngine.from_config(EngineConfig(
        model=str(checkpoint), revision=None, offline=True, device="cuda", num_kv_blocks=128,
        max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512,
        lora=_lora(adapters, 2), overlap_steps=False))
    runner = engine.runner
    for i, name in enumerate([None, "all7", "qv", None, "all7"]):
        engine.add_request(f"r{i}", list(range(5 + i, 30 + 3 * i)),
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                           lora=name)
    for _ in range(3):  # prefills, then decode steps through the graphs
        engine.step()
    out = engine.scheduler.schedule()
    assert len(out.scheduled) == 5 and all(s.num_new_tokens == 1 for s in out.scheduled)
    inputs = runner.step_inputs(out)
    assert inputs.lora is not None and inputs.lora.groups == ()  # the kernels need none
    seg = inputs.lora.seg_start.tolist()
    counts = [b - a for a, b in zip(seg[:-1], seg[1:], strict=True)]
    assert sorted(c for c in counts if c) == [1, 2]  # qv once, all7 twice
    saved = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    eager = runner.model.compute_logits(runner.model.forward(
        inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta, inputs.lora))
    no_lora = runner.model.compute_logits(runner.model.forward(
        inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta))
    for (k, v), (k0, v0) in zip(runner.kv_caches, saved, strict=True):
        k.copy_(k0)
        v.copy_(v0)
    assert runner.graphs is not None
    replayed = runner.graphs.run(inputs.input_ids, inputs.positions, inputs.meta, inputs.lora)
    assert rel_err(replayed.cpu(), eager.cpu()) < 1e-2
    adapter_rows = [i for i, s in enumerate(out.scheduled) if s.seq.lora is not None]
    base_rows = [i for i, s in enumerate(out.scheduled) if s.seq.lora is None]
    assert rel_err(replayed[adapter_rows].cpu(), no_lora[adapter_rows].cpu()) > 1e-2
    assert rel_err(replayed[base_rows].cpu(), no_lora[base_rows].cpu()) < 1e-2
    for (k, v), (k0, v0) in zip(runner.kv_caches, saved, strict=True):
        k.copy_(k0)
        v.copy_(v0)
    plain = runner.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
    assert rel_err(plain.cpu(), no_lora.cpu()) < 1e-2
