"""Random GPTQ linear layers in the on-disk format, made on the device, for kernel benchmarks
and GPU tests.

Each layer comes with its dequantised weight computed from the integers it was packed from
(scale * (q - (zero + 1)), the zero stored minus one), not by unpacking: a kernel that agrees
with it agrees with the format.
"""

from __future__ import annotations

import torch

from engine.checkpoint.types import GPTQLinearWeights


def random_gptq_layer(in_features: int, out_features: int, bits: int, group_size: int | None,
                      act_order: bool, gen: torch.Generator, device: torch.device | str = "cuda",
                      name: str = "bench") -> tuple[GPTQLinearWeights, torch.Tensor]:
    """-> (weights, reference [out, in] float32). Scales are ~1e-3..5e-3 as in real 13B
    checkpoints, so products of unit-scale activations stay well inside fp16."""
    device = torch.device(device)
    pack = 32 // bits
    group = group_size or in_features
    groups = in_features // group
    q = torch.randint(0, 2**bits, (in_features, out_features), generator=gen, device=device)
    zero = torch.randint(0, 2**bits - 1, (groups, out_features), generator=gen, device=device)
    scales = (torch.rand((groups, out_features), generator=gen, device=device) * 0.004 + 0.001)
    scales = scales.half()
    rows = torch.arange(in_features, device=device, dtype=torch.int32)
    if act_order:
        # As GPTQ writes it: rows sorted by activation order, group i = positions i*g..(i+1)*g
        # of that order, so every group holds exactly `group` rows scattered over the input.
        order = torch.randperm(in_features, generator=gen, device=device)
        g_idx = torch.empty(in_features, dtype=torch.int32, device=device)
        g_idx[order] = rows // group
    else:
        g_idx = rows // group
    shifts = (torch.arange(pack, device=device) * bits).view(1, pack, 1)
    qweight = (q.view(in_features // pack, pack, out_features) << shifts).sum(1)
    qzeros = (zero.view(groups, out_features // pack, pack) << shifts.view(1, 1, pack)).sum(2)
    weights = GPTQLinearWeights(
        name=f"{name}.{in_features}x{out_features}", qweight=as_int32(qweight),
        qzeros=as_int32(qzeros), scales=scales, g_idx=g_idx, bits=bits, group_size=group_size,
        in_features=in_features, out_features=out_features)
    gi = g_idx.long()
    reference = scales.float()[gi] * (q - (zero[gi] + 1)).float()  # [in, out]
    return weights, reference.t().contiguous()


def as_int32(packed: torch.Tensor) -> torch.Tensor:
    """Sums of packed fields in int64, [0, 2**32) -> the int32 bit pattern checkpoints store."""
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
