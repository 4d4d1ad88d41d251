"""The Triton GPTQ kernels and the ``triton`` linear backend against a float32 reference built
from the integers each layer was packed from (engine/bench/layers.py), at Llama-2-13B's shapes,
for every branch layout of TheBloke/Llama-2-13B-GPTQ."""

from __future__ import annotations

import pytest
import torch

from engine.bench.layers import random_gptq_layer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

# (bits, group size, act-order) of the eight branches.
LAYOUTS = [(4, 128, False), (4, 32, True), (4, 64, True), (4, 128, True),
           (8, 128, True), (8, 64, True), (8, 128, False), (8, None, True)]
TOKEN_COUNTS = [1, 2, 3, 7, 8, 15, 16, 33, 64, 128, 256, 1000]
SHAPES = [(5120, 13824), (13824, 5120)]  # gate/up, down (q/k/v/o share 5120 inputs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def workspace():
    from engine.model.linear.gptq_triton import SplitKWorkspace

    return SplitKWorkspace(64 << 20, 1 << 16, torch.device("cuda"))


def _ext():
    from engine.model.linear.triton_backend import _try_exllama

    return _try_exllama()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda p: f"{p[0]}bit-g{p[1]}-ao{p[2]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_path_matches_reference(layout, shape, workspace) -> None:
    from engine.model.linear.plan import Path, PathKind, num_sms, triton_candidates
    from engine.model.linear.triton_backend import TritonLinear

    bits, group, act_order = layout
    gen = torch.Generator(device="cuda").manual_seed(hash((layout, shape)) % 2**31)
    weights, w_ref = random_gptq_layer(*shape, bits, group, act_order, gen)
    layer = TritonLinear(weights, torch.device("cuda"), _ext())
    layer.workspace = workspace
    layer.dense = torch.empty(shape, dtype=torch.float16, device="cuda")
    sms = num_sms()
    for t in TOKEN_COUNTS:
        x = torch.randn((t, shape[0]), generator=gen, device="cuda").half()
        ref = x.float() @ w_ref.t()
        paths = [Path(PathKind.TRITON, c) for c in triton_candidates(t, shape[1], sms)[:2]]
        paths.append(Path(PathKind.DENSE))
        if layer.q4 is not None and t <= 16:
            paths.append(Path(PathKind.EXLLAMA))
        for path in paths:
            out = layer.run(path, x)
            assert out.shape == (t, shape[1])
            assert rel_err(out, ref) < 3e-3, (t, path)
            if path.config is not None and path.config.split_k > 1:
                # The last program of a tile adds the partials in a fixed order.
                assert torch.equal(out, layer.run(path, x)), (t, path)
    assert int(workspace.counters.abs().sum()) == 0, "a split tile's counter was not reset"
    layer.free()


@pytest.mark.parametrize("group,act_order", [(128, False), (32, True), (64, True), (128, True),
                                             (None, True)])
def test_layout_equals_exllamav2s_rewritten_buffers(group, act_order) -> None:
    """One resident copy serves both kernels: the Triton layout built in torch is bit for bit
    what exllamav2's make_q_matrix writes into its own buffers."""
    from engine.model.linear.gptq_triton import pack_for_triton
    from engine.model.linear.triton_backend import TritonLinear

    ext = _ext()
    if ext is None:
        pytest.skip("exllamav2's extension is not importable")
    gen = torch.Generator(device="cuda").manual_seed(11)
    weights, _ = random_gptq_layer(5120, 5120, 4, group, act_order, gen)
    shared = TritonLinear(weights, torch.device("cuda"), ext)
    assert shared.q4 is not None
    ours = pack_for_triton(weights, torch.device("cuda"))
    assert torch.equal(shared.w.qweight, ours.qweight)
    assert (shared.w.perm is None) == (ours.perm is None)
    if ours.perm is not None:
        assert torch.equal(shared.w.perm, ours.perm)
    shared.free()


def test_backend_plan_and_graph_replay() -> None:
    """post_init measures a plan per shape; every step size gives the reference result, and a
    captured CUDA graph of the planned path replays to the eager result."""
    from engine.model.linear.plan import PathKind
    from engine.model.linear.triton_backend import TritonLinearBackend

    gen = torch.Generator(device="cuda").manual_seed(7)
    # The Triton and exllamav2 paths (the tensor-core kernel's plan: tests/test_cuda_mma.py).
    backend = TritonLinearBackend(torch.device("cuda"), use_mma=False)
    layers = []
    for shape in [(5120, 5120), (5120, 5120), (5120, 13824)]:
        weights, w_ref = random_gptq_layer(*shape, 4, 128, True, gen)
        layers.append((backend.make(weights), w_ref))
    backend.post_init(512)
    assert len(backend.plans) == 2, list(backend.plans)
    for plan in backend.plans.values():
        print(plan.describe(), "||", plan.describe_timings())
        assert plan.pick(1).kind in (PathKind.TRITON, PathKind.EXLLAMA), plan.describe()
        assert [limit for limit, _ in plan.entries][-1] == 512, plan.describe()
    for layer, w_ref in layers:
        for t in (1, 2, 5, 8, 24, 64, 100, 512):
            x = torch.randn((t, layer.in_features), generator=gen, device="cuda").half()
            assert rel_err(layer.forward(x), x.float() @ w_ref.t()) < 3e-3, t
    layer, _ = layers[2]
    for t in (1, 4, 16, 32):
        x = torch.randn((t, 5120), generator=gen, device="cuda").half()
        eager = layer.forward(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer.forward(x)
        graph.replay()
        torch.cuda.synchronize()
        if layer.plan.pick(t).kind is PathKind.TRITON:
            assert torch.equal(captured, eager), t  # a fixed reduction order: bit-stable
        else:
            # exllamav2's kernel adds split partials atomically in fp16, and cuBLAS may pick
            # another algorithm under capture: equal up to rounding.
            assert rel_err(captured, eager.float()) < 3e-3, t


def test_8bit_model_layer_stays_packed() -> None:
    """8-bit layers run on the w8a16 kernels: resident bytes stay those of the checkpoint."""
    from engine.model.linear.triton_backend import TritonLinear, TritonLinearBackend

    gen = torch.Generator(device="cuda").manual_seed(5)
    backend = TritonLinearBackend(torch.device("cuda"))
    weights, w_ref = random_gptq_layer(5120, 13824, 8, 128, True, gen)
    packed = sum(t.numel() * t.element_size()
                 for t in (weights.qweight, weights.qzeros, weights.scales, weights.g_idx))
    layer = backend.make(weights)
    assert isinstance(layer, TritonLinear)
    backend.post_init(64)
    assert layer.nbytes <= 1.01 * packed
    x = torch.randn((9, 5120), generator=gen, device="cuda").half()
    assert rel_err(layer.forward(x), x.float() @ w_ref.t()) < 3e-3
