"""GPTQ unpacking and dequantisation against a naive per-element reference written with Python
ints, for the quantisation layout of every branch of TheBloke/Llama-2-13B-GPTQ."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint.dequant import (
    act_order_g_idx,
    default_g_idx,
    dequantize,
    pack_cols,
    pack_gptq,
    pack_rows,
    quantize_gptq,
    unpack_cols,
    unpack_rows,
)
from engine.checkpoint.types import GPTQLinearWeights
from tests.conftest import BRANCHES

IN_FEATURES, OUT_FEATURES = 256, 16


def naive_dequantize(w: GPTQLinearWeights) -> list[list[float]]:
    """w[o][i] read field by field from the packed int32 words, as the format describes it."""
    bits, pack, mask = w.bits, 32 // w.bits, (1 << w.bits) - 1
    qweight = [[v & 0xFFFFFFFF for v in row] for row in w.qweight.tolist()]
    qzeros = [[v & 0xFFFFFFFF for v in row] for row in w.qzeros.tolist()]
    scales = w.scales.float().tolist()
    assert w.g_idx is not None
    g_idx = w.g_idx.tolist()
    out: list[list[float]] = []
    for o in range(w.out_features):
        row = []
        for i in range(w.in_features):
            q = (qweight[i // pack][o] >> (bits * (i % pack))) & mask
            g = g_idx[i]
            z = ((qzeros[g][o // pack] >> (bits * (o % pack))) & mask) + 1
            row.append(scales[g][o] * (q - z))
        out.append(row)
    return out


def random_packing(bits: int, group_size: int | None, act_order: bool,
                   seed: int) -> GPTQLinearWeights:
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size is None else IN_FEATURES // group_size
    words_in, words_out = IN_FEATURES * bits // 32, OUT_FEATURES * bits // 32
    # Full 32-bit range, sign bit included: unpacking must not smear it into the fields.
    qweight = torch.randint(-2**31, 2**31, (words_in, OUT_FEATURES), generator=gen,
                            dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-2**31, 2**31, (groups, words_out), generator=gen,
                           dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(groups, OUT_FEATURES, generator=gen) * 0.1 + 0.001).half()
    if act_order:
        g_idx = act_order_g_idx(torch.randperm(IN_FEATURES, generator=gen), group_size)
    else:
        g_idx = default_g_idx(IN_FEATURES, group_size)
    return GPTQLinearWeights(name="layer", qweight=qweight, qzeros=qzeros, scales=scales,
                             g_idx=g_idx, bits=bits, group_size=group_size,
                             in_features=IN_FEATURES, out_features=OUT_FEATURES)


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_dequantize_matches_the_naive_reference(branch: str) -> None:
    bits, group_size, act_order = BRANCHES[branch]
    w = random_packing(bits, group_size, act_order, seed=len(branch))
    got = dequantize(w)
    assert got.dtype == torch.float32 and got.shape == (OUT_FEATURES, IN_FEATURES)
    assert torch.equal(got, torch.tensor(naive_dequantize(w), dtype=torch.float32))


def test_dequantize_without_g_idx_uses_consecutive_groups() -> None:
    w = random_packing(4, 32, act_order=False, seed=1)
    without = GPTQLinearWeights(**{**vars(w), "g_idx": None})
    assert torch.equal(dequantize(without), dequantize(w))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_and_unpack_are_inverse(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (64, 24), generator=gen, dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(values, bits), bits), values)
    assert torch.equal(unpack_cols(pack_cols(values, bits), bits), values)


def test_packing_puts_the_first_row_in_the_lowest_bits() -> None:
    values = torch.arange(1, 9, dtype=torch.int32).reshape(8, 1)  # rows 1..8
    assert pack_rows(values, 4).item() == 0x87654321 - 2**32  # 0x87654321 as int32
    assert pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).item() == 0xFF030201 - 2**32


def test_pack_gptq_stores_zeros_minus_one() -> None:
    q = torch.full((32, 8), 5)
    zeros = torch.tensor([[8] * 8])
    w = pack_gptq(q, zeros, torch.full((1, 8), 0.5), None, bits=4, group_size=None)
    assert torch.equal(unpack_cols(w.qzeros, 4), torch.full((1, 8), 7, dtype=torch.int32))
    assert torch.equal(dequantize(w), torch.full((8, 32), 0.5 * (5 - 8)))
    # A true zero of 0 wraps to 15 when stored and reads back as 16, as in AutoGPTQ/exllamav2.
    wrapped = pack_gptq(q, torch.zeros(1, 8, dtype=torch.int64), torch.ones(1, 8), None,
                        bits=4, group_size=None)
    assert torch.equal(dequantize(wrapped), torch.full((8, 32), float(5 - 16)))


def test_act_order_g_idx_is_a_non_monotone_balanced_assignment() -> None:
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    g_idx = act_order_g_idx(perm, 64)
    assert torch.equal(torch.bincount(g_idx), torch.full((4,), 64))
    assert not bool((g_idx[1:] >= g_idx[:-1]).all())
    # The k-th row processed lands in group k // group_size.
    assert torch.equal(g_idx[perm], torch.arange(256) // 64)
    assert torch.equal(act_order_g_idx(perm, None), torch.zeros(256, dtype=torch.int64))


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_quantize_rounds_to_the_nearest_grid_point(branch: str) -> None:
    bits, group_size, act_order = BRANCHES[branch]
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) / 16  # [out, in]
    g_idx = (act_order_g_idx(torch.randperm(IN_FEATURES, generator=gen), group_size)
             if act_order else default_g_idx(IN_FEATURES, group_size))
    w = quantize_gptq(weight, bits, group_size, g_idx, "layer")
    assert w.qweight.dtype == w.qzeros.dtype == torch.int32 and w.scales.dtype == torch.float16
    assert torch.equal(unpack_cols(w.qzeros, bits), torch.full_like(
        unpack_cols(w.qzeros, bits), (1 << (bits - 1)) - 1))
    q = unpack_rows(w.qweight, bits)
    assert int(q.min()) >= 0 and int(q.max()) == (1 << bits) - 1  # the range is used in full
    step = w.scales.float()[g_idx.long()].t()  # [out, in]
    error = (dequantize(w) - weight).abs()
    # Within half a step everywhere (float32 rounding aside), the clipped top edge included.
    assert float((error / step).max()) <= 0.5 + 1e-5
    relative = float((dequantize(w) - weight).norm() / weight.norm())
    assert relative < (0.15 if bits == 4 else 0.01)
