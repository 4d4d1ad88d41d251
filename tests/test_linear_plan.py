"""The Triton GPTQ layout and the per-step-size plan, on the CPU (no kernel runs here: the
kernels themselves are checked in tests/test_triton_interpreter.py and on a GPU)."""

from __future__ import annotations

import pytest
import torch

from engine.bench.layers import random_gptq_layer
from engine.model.linear.gptq_triton import (
    KernelConfig,
    field_shift,
    gemm_columns,
    pack_for_triton,
    unsupported_reason,
)
from engine.model.linear.plan import Path, PathKind, StepPlan, ladder, triton_candidates

LAYOUTS = [(4, 128, False), (4, 32, True), (4, None, True), (8, 64, True), (8, 128, False)]


def layout_dense(w) -> torch.Tensor:
    """The fp32 weight [in, out] in the tensor-core kernel's column order, decoded from the
    packed words the way the kernel does: tile, then field j at field_shift(j), then word row."""
    pack = 32 // w.bits
    mask = (1 << w.bits) - 1
    words = w.qweight.to(torch.int64) & 0xFFFFFFFF  # [in / pack, out]
    k, n = w.in_features, w.out_features
    zeros = torch.stack([(w.qzeros.to(torch.int64) >> (w.bits * p)) & mask
                         for p in range(pack)], dim=2).reshape(-1, n) + 1  # [groups, out]
    rows = []
    for tile in range(k // (16 * pack)):
        tile_words = words[tile * 16:(tile + 1) * 16]  # [16, out]
        for j in range(pack):
            q = (tile_words >> field_shift(j, w.bits)) & mask  # [16, out]
            sorted_rows = tile * 16 * pack + pack * torch.arange(16) + j
            g = sorted_rows // w.group_size
            rows.append(w.scales.float()[g] * (q - zeros[g]).float())
    return torch.cat(rows)  # [in, out]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_packed_layout_and_column_order_reproduce_the_layer(layout) -> None:
    bits, group, act_order = layout
    gen = torch.Generator().manual_seed(bits * 100 + (group or 0))
    weights, ref = random_gptq_layer(512, 64, bits, group, act_order, gen, device="cpu")
    assert unsupported_reason(weights) is None
    w = pack_for_triton(weights, torch.device("cpu"))
    # One group over the whole input: act-order leaves nothing to sort.
    assert (w.perm is not None) == (act_order and group is not None)
    cols = gemm_columns(w)
    assert sorted(cols.tolist()) == list(range(512))  # a permutation of the input rows
    x = torch.randn(3, 512, generator=gen)
    ours = x[:, cols] @ layout_dense(w)
    assert torch.allclose(ours, x @ ref.t(), rtol=1e-4, atol=1e-4)


def test_unsupported_shapes_are_named() -> None:
    gen = torch.Generator().manual_seed(0)
    weights, _ = random_gptq_layer(96, 64, 4, 32, False, gen, device="cpu")
    assert "in_features must be a multiple of 128" in unsupported_reason(weights)


def test_plan_picks_the_entry_covering_the_step() -> None:
    a, b, c = Path(PathKind.EXLLAMA), Path(PathKind.TRITON, KernelConfig(128, 16, 4, 4, 2)), \
        Path(PathKind.DENSE)
    plan = StepPlan(((1, a), (2, a), (16, b), (64, b), (2048, c)))
    assert [plan.pick(t).kind for t in (1, 2, 3, 16, 17, 64, 65, 2048, 9999)] == [
        PathKind.EXLLAMA, PathKind.EXLLAMA, PathKind.TRITON, PathKind.TRITON,
        PathKind.TRITON, PathKind.TRITON, PathKind.DENSE, PathKind.DENSE, PathKind.DENSE]
    assert plan.describe() == "<=2 exllama, <=64 triton gemm16x128/4, >64 dense"
    assert plan.uses(PathKind.DENSE) and not StepPlan.single(a).uses(PathKind.DENSE)


def test_ladder_ends_at_the_step_budget() -> None:
    assert ladder(2048)[-1] == 2048 and ladder(100) == [1, 2, 4, 8, 16, 32, 64, 100]


@pytest.mark.parametrize("tokens", [1, 2, 16, 32, 64, 512])
@pytest.mark.parametrize("n", [5120, 15360, 27648])
def test_candidates_fit_the_kernels(tokens: int, n: int) -> None:
    for c in triton_candidates(tokens, n, 132):
        assert c.split_k in (1, 2, 4, 8, 16)
        assert c.block_m == 1 if tokens == 1 else c.block_m >= min(16, tokens)
        assert tokens <= 64 or c.split_k == 1  # large steps fill the GPU without splitting
