"""Building a step's LoraBatch from each scheduled sequence's slot and row count."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.model.lora.base import LoraBatch


def lora_batch(slots: list[int], num_rows: list[int], num_slots: int,
               to_device: Callable[[list[int], torch.dtype], torch.Tensor]) -> LoraBatch | None:
    """``slots[i]``: the slot of sequence i (-1: the base model), whose ``num_rows[i]`` token
    rows follow the previous sequence's. None when no row uses an adapter (the step then runs
    no LoRA kernel at all). ``to_device(list, dtype)`` uploads a host list."""
    if all(s < 0 for s in slots):
        return None
    by_slot: list[list[int]] = [[] for _ in range(num_slots)]
    segments: list[tuple[int, int, int]] = []
    row = 0
    for slot, n in zip(slots, num_rows, strict=True):
        if slot >= 0 and n:
            by_slot[slot].extend(range(row, row + n))
            if segments and segments[-1][2] == slot and segments[-1][1] == row:
                segments[-1] = (segments[-1][0], row + n, slot)  # one run of consecutive rows
            else:
                segments.append((row, row + n, slot))
        row += n
    seg_start = [0]
    for rows in by_slot:
        seg_start.append(seg_start[-1] + len(rows))
    sorted_rows = [r for rows in by_slot for r in rows]
    return LoraBatch(sorted_rows=to_device(sorted_rows, torch.int32),
                     seg_start=to_device(seg_start, torch.int32), segments=tuple(segments))
