"""GPTQ weight math in pure torch: unpack and dequantise, and the inverse (quantise and pack).

Packing is AutoGPTQ's "gptq" format, the one TheBloke's repos use:
    qweight int32 [in * bits / 32, out]: input row i sits in word i // (32 / bits) at bit offset
                                         bits * (i % (32 / bits)), lowest bits first
    qzeros  int32 [groups, out * bits / 32]: the same packing along the output dim, each field
                                         holding zero - 1 (modulo 2^bits)
    scales  fp16  [groups, out]
    g_idx   int32 [in]: the group of each input row
    w[o, i] = scales[g, o] * (q[i, o] - (z[g, o] + 1)),  g = g_idx[i]

The "+ 1" is applied after unpacking without wrapping, as the exllamav2 kernel does, so a stored
field of 2^bits - 1 (a true zero of 0 written minus one) reads back as 2^bits.

Every function works on any device; the synthesiser runs them on the GPU for 13B-sized layers.
"""

from __future__ import annotations

import torch

from engine.checkpoint.types import CheckpointError, GPTQLinearWeights


def _pack_factor(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise CheckpointError(f"GPTQ packing needs bits dividing 32 (2, 4 or 8), got {bits}")
    return 32 // bits


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed: int32 [R, C] -> int32 [R * 32 / bits, C], fields along dim 0."""
    pack = _pack_factor(bits)
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)  # [pack]
    # An arithmetic shift drags the sign bit along; the mask cuts it off again.
    fields = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R, pack, C]
    return fields.reshape(packed.shape[0] * pack, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed: int32 [R, C] -> int32 [R, C * 32 / bits], fields along dim 1."""
    return unpack_rows(packed.t(), bits).t()


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values: integer [R, C] with 0 <= v < 2^bits and R a multiple of 32 / bits
    -> int32 [R * bits / 32, C]. The inverse of ``unpack_rows``."""
    pack = _pack_factor(bits)
    rows, cols = values.shape
    if rows % pack:
        raise ValueError(f"cannot pack {rows} rows of {bits}-bit values into 32-bit words")
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64)  # [pack]
    fields = values.to(torch.int64).reshape(rows // pack, pack, cols) << shifts[None, :, None]
    words = fields.sum(dim=1)  # disjoint bit ranges, so the sum is a bitwise or; < 2^32
    # Reinterpret the unsigned 32-bit word as int32 (two's complement) exactly.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values: integer [R, C] -> int32 [R, C * bits / 32]. The inverse of ``unpack_cols``."""
    return pack_rows(values.t(), bits).t().contiguous()


def default_g_idx(in_features: int, group_size: int | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """g_idx without act-order: row i belongs to group i // group_size (all 0 without groups)."""
    rows = torch.arange(in_features, device=device, dtype=torch.int32)
    return torch.zeros_like(rows) if group_size is None else rows // group_size


def dequantize(w: GPTQLinearWeights) -> torch.Tensor:
    """The layer's weight as float32 [out, in] on the weights' device.

    The result is a transposed view of a contiguous [in, out] buffer: ``.t()`` of it is free, and
    F.linear takes it as is.
    """
    q = unpack_rows(w.qweight, w.bits)  # [in, out]
    zeros = unpack_cols(w.qzeros, w.bits) + 1  # [groups, out]
    if q.shape != (w.in_features, w.out_features):
        raise CheckpointError(f"{w.name}.qweight unpacks to {tuple(q.shape)}, expected "
                              f"{(w.in_features, w.out_features)}")
    g_idx = (w.g_idx if w.g_idx is not None
             else default_g_idx(w.in_features, w.group_size, w.qweight.device)).long()  # [in]
    scales = w.scales.float()  # [groups, out]
    # Gather per input row: both [in, out].
    weight = scales[g_idx] * (q - zeros[g_idx]).float()
    return weight.t()  # [out, in]


def act_order_g_idx(perm: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """g_idx after act-order: rows are quantised in the order ``perm`` (``perm[k]`` is the k-th
    row processed), so row ``perm[k]`` lands in group k // group_size. That is
    g_idx[i] = perm_inverse[i] // group_size, non-monotone in i."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return default_g_idx(perm.numel(), group_size, perm.device)[inverse.long()]


def quantize_gptq(weight: torch.Tensor, bits: int, group_size: int | None, g_idx: torch.Tensor,
                  name: str) -> GPTQLinearWeights:
    """Round-to-nearest symmetric GPTQ quantisation of a float weight [out, in], packed.

    Each group's scale comes from its largest magnitude (AutoGPTQ's sym rule: the range
    [-max, max] spread over 2^bits - 1 steps, zero at 2^(bits - 1)). The scale is rounded (up) to
    fp16 before the weights are rounded against it, so dequantising the stored values gives the
    nearest grid point to each weight under the stored scale, never more than half a step away.
    """
    out_features, in_features = weight.shape
    num_groups = 1 if group_size is None else -(-in_features // group_size)
    g = g_idx.long()  # [in]
    maxq = (1 << bits) - 1
    zero = 1 << (bits - 1)
    w_t = weight.t().float()  # [in, out]
    # Largest |w| of each (group, out) over the rows of that group: [groups, out].
    amax = torch.zeros(num_groups, out_features, device=weight.device, dtype=torch.float32)
    amax.scatter_reduce_(0, g[:, None].expand_as(w_t), w_t.abs(), "amax", include_self=True)
    exact = (2 * amax / maxq).clamp_min(1e-7)  # [groups, out]
    scales = exact.half()
    # Round the scale up, never down, so the group's largest weight stays within the grid's
    # reach and no weight is more than half a step from its grid point.
    scales = torch.where(scales.float() < exact,
                         torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)
    q = torch.round(w_t / scales.float()[g]) + zero  # [in, out]
    q = q.clamp_(0, maxq).to(torch.int32)
    # Stored minus one, as AutoGPTQ writes it: 2^(bits-1) - 1 in every field.
    zeros = torch.full((num_groups, out_features), zero - 1, device=weight.device,
                       dtype=torch.int32)
    return GPTQLinearWeights(
        name=name, qweight=pack_rows(q, bits), qzeros=pack_cols(zeros, bits), scales=scales,
        g_idx=g_idx.to(torch.int32), bits=bits, group_size=group_size,
        in_features=in_features, out_features=out_features)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor | None, *, bits: int, group_size: int | None,
              name: str = "") -> GPTQLinearWeights:
    """Pack already quantised values into the stored layout.

    q: integer [in, out] in [0, 2^bits); zeros: integer [groups, out], the true zero points
    (stored minus one, wrapping modulo 2^bits); scales: [groups, out]; g_idx: [in] or None.
    """
    in_features, out_features = q.shape
    mask = (1 << bits) - 1
    return GPTQLinearWeights(
        name=name, qweight=pack_rows(q, bits),
        qzeros=pack_cols((zeros.to(torch.int64) - 1) & mask, bits),
        scales=scales.half(), g_idx=None if g_idx is None else g_idx.to(torch.int32),
        bits=bits, group_size=group_size, in_features=in_features, out_features=out_features)
