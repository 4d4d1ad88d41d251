"""The exllama linear backend against a float32 reference at Llama-2-13B's layer shapes.

Layers are synthesised on the GPU from known integers (engine/bench/layers.py), packed in the
on-disk GPTQ format; the reference is computed from those integers, so the kernel is checked
against the format itself.
"""

from __future__ import annotations

import pytest
import torch

from engine.bench.layers import random_gptq_layer
from engine.checkpoint.types import GPTQLinearWeights

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

SHAPES_13B = [(5120, 5120), (5120, 13824), (13824, 5120)]  # (in, out): q/k/v/o, gate/up, down
BRANCHES_4BIT = [(128, False), (32, True), (64, True), (128, True)]  # (group size, act-order)
TOKEN_COUNTS = [1, 3, 4, 16, 33, 128]


def make_gptq_layer(in_features: int, out_features: int, group_size: int, act_order: bool,
                    gen: torch.Generator) -> tuple[GPTQLinearWeights, torch.Tensor]:
    return random_gptq_layer(in_features, out_features, 4, group_size, act_order, gen)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def backend():
    from engine.model.linear.exllama import ExllamaLinearBackend

    return ExllamaLinearBackend(torch.device("cuda"), dense="keep")


@pytest.mark.parametrize("group_size,act_order", BRANCHES_4BIT)
@pytest.mark.parametrize("shape", SHAPES_13B)
def test_kernel_and_dense_paths_match_reference(backend, shape: tuple[int, int],
                                                 group_size: int, act_order: bool) -> None:
    from engine.model.linear.exllama import ExllamaLinear

    gen = torch.Generator(device="cuda").manual_seed(hash((shape, group_size, act_order)) % 2**31)
    weights, w_ref = make_gptq_layer(*shape, group_size, act_order, gen)
    layer = backend.make(weights)
    assert isinstance(layer, ExllamaLinear)
    assert (layer.q_perm is not None) == act_order
    dense = torch.empty(shape, dtype=torch.float16, device="cuda")
    layer.reconstruct(dense)
    assert rel_err(dense.t(), w_ref) < 1e-3  # fp16 rounding of each weight only
    for t in TOKEN_COUNTS:
        x = torch.randn((t, shape[0]), generator=gen, device="cuda").half()
        ref = x.float() @ w_ref.t()
        assert rel_err(layer.forward_q4(x), ref) < 4e-3, f"4-bit kernel, T={t}"
        assert rel_err(layer.forward_dense(x, dense, owned=True), ref) < 2e-3, f"dense, T={t}"
        scratch = torch.full(shape, float("nan"), dtype=torch.float16, device="cuda")
        assert rel_err(layer.forward_dense(x, scratch, owned=False), ref) < 2e-3, \
            f"dense reconstructed per call, T={t}"
    layer.free()


@pytest.mark.parametrize("dense", ["keep", "scratch"])
def test_backend_picks_path_by_step_size(dense: str) -> None:
    from engine.model.linear.exllama import ExllamaLinearBackend

    gen = torch.Generator(device="cuda").manual_seed(7)
    backend = ExllamaLinearBackend(torch.device("cuda"), dense=dense)
    layers = []
    for shape in [(5120, 5120), (5120, 5120), (5120, 13824)]:
        weights, w_ref = make_gptq_layer(*shape, 128, True, gen)
        layers.append((backend.make(weights), w_ref))
    backend.post_init(256)
    assert backend.keeps_dense == (dense == "keep")
    for shape, xo in backend.crossovers.items():
        # The measured crossover is a ladder size (or never) and the timings are all there.
        assert xo.tokens in [t for t, _, _ in xo.timings] or xo.tokens > 256, (shape, xo)
        assert len(xo.timings) >= 10
    for layer, w_ref in layers:
        for t in (1, 2, 8, 64, 256):
            x = torch.randn((t, layer.in_features), generator=gen, device="cuda").half()
            out = layer.forward(x)
            assert out.shape == (t, layer.out_features)
            assert rel_err(out, x.float() @ w_ref.t()) < 4e-3
    # Steps of one token always take the 4-bit kernel: that is where it wins.
    assert all(xo.tokens > 1 for xo in backend.crossovers.values())


def test_unsupported_layer_falls_back_to_fp16() -> None:
    from engine.model.linear.exllama import ExllamaLinearBackend
    from engine.model.linear.fp16 import ExpandedLinear

    gen = torch.Generator(device="cuda").manual_seed(3)
    weights, w_ref = make_gptq_layer(256, 48, 32, False, gen)  # out not a multiple of 32
    backend = ExllamaLinearBackend(torch.device("cuda"))
    layer = backend.make(weights)
    assert isinstance(layer, ExpandedLinear)
    x = torch.randn((5, 256), generator=gen, device="cuda").half()
    assert rel_err(layer.forward(x), x.float() @ w_ref.t()) < 2e-3


def test_8bit_expands_to_fp16() -> None:
    from engine.checkpoint.types import QuantConfig
    from engine.model.linear.exllama import make_cuda_linear_backend

    backend = make_cuda_linear_backend(QuantConfig(8, 128, True, True), torch.float16,
                                       torch.device("cuda"))
    assert backend.name == "fp16-expanded"
    gen = torch.Generator(device="cuda").manual_seed(5)
    weights, w_ref = random_gptq_layer(1024, 512, 8, 128, True, gen)
    layer = backend.make(weights)
    backend.post_init(64)
    x = torch.randn((9, 1024), generator=gen, device="cuda").half()
    assert rel_err(layer.forward(x), x.float() @ w_ref.t()) < 2e-3
