"""The w4a16 tensor-core kernel (engine/model/linear/mma.py) against the float32 reference built
from the integers each layer was packed from, at Llama-2-13B's shapes, for every 4-bit branch
layout and the token counts of a serving engine's steps; its plan and CUDA-graph replay through
the ``triton`` backend. (Its weight layout is checked on the CPU: tests/test_mma_layout.py.)"""

from __future__ import annotations

import pytest
import torch

from engine.bench.layers import random_gptq_layer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

LAYOUTS = [(128, False), (32, True), (64, True), (128, True), (None, True), (32, False)]
TOKEN_COUNTS = [1, 2, 3, 7, 8, 15, 16, 33, 64, 128, 256, 1000]
SHAPES = [(5120, 13824), (13824, 5120)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def mma():
    from engine.model.linear import mma

    if not mma.available():
        pytest.skip("the tensor-core kernel cannot be built here (no nvcc)")
    return mma


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda p: f"g{p[0]}-ao{p[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_path_matches_reference(mma, layout, shape) -> None:
    from engine.model.linear.gptq_triton import SplitKWorkspace
    from engine.model.linear.plan import Path, PathKind, num_sms
    from engine.model.linear.triton_backend import MmaLinear

    group, act_order = layout
    gen = torch.Generator(device="cuda").manual_seed(hash((layout, shape)) % 2**31)
    weights, w_ref = random_gptq_layer(*shape, 4, group, act_order, gen)
    weights.bias = (torch.randn(shape[1], generator=gen, device="cuda") * 0.1).half()
    layer = MmaLinear(weights, torch.device("cuda"))
    workspace = SplitKWorkspace(64 << 20, 1 << 16, torch.device("cuda"))
    layer.workspace = workspace
    layer.dense = torch.empty(shape, dtype=torch.float16, device="cuda")
    for t in TOKEN_COUNTS:
        x = torch.randn((t, shape[0]), generator=gen, device="cuda").half()
        ref = x.float() @ w_ref.t() + weights.bias.float()
        paths = []
        for bn, kw in mma.GEOMETRIES if t <= mma.MAX_TOKENS else ():
            splits = mma.split_candidates(t, layer.w, num_sms(), bn)
            paths += [Path(PathKind.MMA, split_k=s, block_n=bn, k_warps=kw)
                      for s in {splits[0], splits[-1]}]
        # The wgmma form at every token count (below its plan's minimum too: the padding
        # rows of a 64-token block must not leak into the output).
        for bn in mma.WGMMA_BLOCKS if t <= mma.MAX_TOKENS and mma.wgmma_available() else ():
            splits = mma.wgmma_split_candidates(t, layer.w, num_sms(), bn)
            paths += [Path(PathKind.WGMMA, split_k=s, block_n=bn)
                      for s in {splits[0], splits[-1]}]
            # Stream-K: the plan's grids, one of 7 blocks (each runs over several tile
            # blocks, restarting its pipeline) and one whose blocks take 12 stages (tiles
            # summed from 4-5 blocks' partials).
            units = mma.stream_k_units(layer.w, bn)
            paths += [Path(PathKind.WGMMA, block_n=bn, stream_k=g)
                      for g in {*mma.wgmma_stream_k_candidates(t, layer.w, num_sms(), bn),
                                7, units // 12}]
        for path in paths + [Path(PathKind.DENSE)]:
            out = layer.run(path, x)
            assert out.shape == (t, shape[1])
            assert rel_err(out, ref) < 3e-3, (t, path)
            if path.split_k > 1 or path.stream_k:
                # The last block of a tile adds the partials in split order: bit-stable.
                assert torch.equal(out, layer.run(path, x)), (t, path)
    assert int(workspace.counters.abs().sum()) == 0, "a split tile's counter was not reset"


def test_wgmma_is_built_for_hopper(mma) -> None:
    """On a compute-capability-9.0 card (H100, H200) the module holds the wgmma kernel: the
    build compiled 9.0 as 9.0a. Elsewhere the kernel must say it is absent."""
    expected = torch.cuda.get_device_capability() == (9, 0)
    assert mma.wgmma_available() is expected


def test_resident_bytes_stay_near_the_checkpoint(mma) -> None:
    from engine.model.linear.triton_backend import MmaLinear

    gen = torch.Generator(device="cuda").manual_seed(3)
    for group in (32, 128, None):
        weights, _ = random_gptq_layer(5120, 13824, 4, group, True, gen)
        ckpt = sum(t.numel() * t.element_size()
                   for t in (weights.qweight, weights.qzeros, weights.scales, weights.g_idx))
        assert MmaLinear(weights, torch.device("cuda")).nbytes <= 1.15 * ckpt


def test_backend_plan_and_graph_replay(mma) -> None:
    """The backend puts 4-bit layers on the kernel, measures a plan per shape, gives the
    reference at every step size, and a captured graph replays to the eager result bit for
    bit on the kernel's path."""
    from engine.model.linear.plan import PathKind
    from engine.model.linear.triton_backend import MmaLinear, TritonLinearBackend

    gen = torch.Generator(device="cuda").manual_seed(7)
    backend = TritonLinearBackend(torch.device("cuda"), use_mma=True)
    layers = []
    for shape in [(5120, 5120), (5120, 5120), (5120, 13824)]:
        weights, w_ref = random_gptq_layer(*shape, 4, 128, True, gen)
        layers.append((backend.make(weights), w_ref))
    backend.post_init(512)
    assert "mma" in backend.name
    assert all(isinstance(layer, MmaLinear) for layer, _ in layers)
    for plan in backend.plans.values():
        print(plan.describe(), "||", plan.describe_timings())
        assert plan.pick(1).kind is PathKind.MMA, plan.describe()
    for layer, w_ref in layers:
        for t in (1, 2, 5, 8, 24, 64, 100, 512):
            x = torch.randn((t, layer.in_features), generator=gen, device="cuda").half()
            assert rel_err(layer.forward(x), x.float() @ w_ref.t()) < 3e-3, t
    layer, _ = layers[2]
    for t in (1, 4, 16, 32, 64, 128):
        x = torch.randn((t, 5120), generator=gen, device="cuda").half()
        eager = layer.forward(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer.forward(x)
        graph.replay()
        torch.cuda.synchronize()
        if layer.plan.pick(t).kind in (PathKind.MMA, PathKind.WGMMA):
            assert torch.equal(captured, eager), t
        else:
            assert rel_err(captured, eager.float()) < 3e-3, t
