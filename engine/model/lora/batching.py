"""Building a step's LoraBatch from each scheduled sequence's slot and row count."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.model.lora.base import LoraBatch, LoraGroup


def lora_batch(slots: list[int], num_rows: list[int], num_slots: int,
               to_device: Callable[[list[int], torch.dtype], torch.Tensor],
               with_groups: bool = True) -> LoraBatch | None:
    """``slots[i]``: the slot of sequence i (-1: the base model), whose ``num_rows[i]`` token
    rows follow the previous sequence's. None when no row uses an adapter (the step then runs
    no LoRA kernel at all). ``to_device(list, dtype)`` uploads a host list; ``with_groups``
    builds the host groups (for kernels that read them)."""
    if all(s < 0 for s in slots):
        return None
    by_slot: list[list[int]] = [[] for _ in range(num_slots)]
    row = 0
    for slot, n in zip(slots, num_rows, strict=True):
        if slot >= 0:
            by_slot[slot].extend(range(row, row + n))
        row += n
    seg_start = [0]
    groups = []
    for slot, rows in enumerate(by_slot):
        seg_start.append(seg_start[-1] + len(rows))
        if not rows or not with_groups:
            continue
        consecutive = rows[-1] - rows[0] + 1 == len(rows)  # rows ascend: a run
        groups.append(LoraGroup(slot, rows[0], rows[-1] + 1,
                                None if consecutive else to_device(rows, torch.int64)))
    sorted_rows = [r for rows in by_slot for r in rows]
    return LoraBatch(sorted_rows=to_device(sorted_rows, torch.int32),
                     seg_start=to_device(seg_start, torch.int32), groups=tuple(groups))
