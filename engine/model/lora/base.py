"""The LoRA seam of the model: the per-row side input of a step, the fixed device slots of one
linear layer, and the kernels' interface.

A step's token rows each run with one adapter or none. The runner resolves each sequence's
adapter to a device slot and builds a ``LoraBatch`` with the rest of the batch; every linear
layer that has slots then adds ``(x @ A[slot]^T) @ B[slot]^T`` (the scale folded into B) to the
rows of each slot, beside the quantised product. Rows of the base model are in no segment and
get nothing added.

A fused layer (q/k/v, gate/up on CUDA) computes several projections side by side; its slots
hold each projection's A stacked along the rank (projection s owns rank rows
``[s * R, (s + 1) * R)``) and its B along the output (``slices``), so the delta of each
sub-projection uses only its own adapter weights, exactly as if the layers were separate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LoraGroup:
    """The rows of one slot in a step: ``[start, end)`` when they are consecutive (a slice, no
    gather), else the row indices ``rows``."""

    slot: int
    start: int
    end: int
    rows: torch.Tensor | None  # [n] int64 on the device, or None for [start, end)


@dataclass(frozen=True)
class LoraBatch:
    """Which adapter slot each token row of a step uses.

    Invariant: the rows of slot ``l`` are ``sorted_rows[seg_start[l]:seg_start[l + 1]]``; rows of
    the base model are in no segment (entries of ``sorted_rows`` past ``seg_start[-1]`` are
    never read). ``groups`` says the same per slot, for kernels that loop on the host; it is
    empty for kernels that read only the device tensors (and in a CUDA graph's static batch).
    """

    sorted_rows: torch.Tensor  # [>= rows with an adapter] int32
    seg_start: torch.Tensor  # [max_loras + 1] int32, non-decreasing
    groups: tuple[LoraGroup, ...]


class LoraSite:
    """The ``max_loras`` adapter slots of one linear layer (zeros where a slot's adapter does
    not target a projection: its delta is then exactly zero)."""

    def __init__(self, layer: int, modules: tuple[str, ...], in_features: int,
                 out_sizes: tuple[int, ...], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.layer = layer
        self.modules = modules
        self.max_rank = max_rank
        offsets = [0]
        for size in out_sizes:
            offsets.append(offsets[-1] + size)
        self.slices = tuple(zip(offsets[:-1], out_sizes, strict=True))  # (out offset, size)
        self.slice_offsets = torch.tensor(offsets, dtype=torch.int32, device=device)  # [S+1]
        self.a = torch.zeros((max_loras, len(modules) * max_rank, in_features), dtype=dtype,
                             device=device)  # [L, S*R, in]
        self.b = torch.zeros((max_loras, offsets[-1], max_rank), dtype=dtype,
                             device=device)  # [L, out, R]

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel()) * self.a.element_size()

    def write(self, slot: int, weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Put one adapter's (a [r, in], b [out, r]) per projection (None: not targeted) into
        ``slot``. Asynchronous on CUDA: ordered on the stream before the next step's kernels."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        r_max = self.max_rank
        for s, (w, (offset, size)) in enumerate(zip(weights, self.slices, strict=True)):
            if w is None:
                continue
            a, b = w
            r = a.shape[0]
            self.a[slot, s * r_max:s * r_max + r].copy_(a, non_blocking=True)
            self.b[slot, offset:offset + size, :r].copy_(b, non_blocking=True)


class LoraKernels(Protocol):
    name: str
    # Whether ``add`` reads only device tensors of the batch (so it can run in a CUDA graph).
    graph_capturable: bool
    # Whether ``add`` loops over the batch's host ``groups`` (else they are not built: on a
    # GPU each group's row indices would cost an upload per step for nothing).
    reads_groups: bool

    def add(self, y: torch.Tensor, x: torch.Tensor, site: LoraSite, batch: LoraBatch) -> None:
        """y: [T, out] += each adapter row's delta of x: [T, in], in place."""
        ...


@dataclass(frozen=True)
class LoraModelConfig:
    """What the model needs to give its linears adapter slots."""

    max_loras: int
    max_rank: int
    kernels: LoraKernels
