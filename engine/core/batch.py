"""Turning a SchedulerOutput into the flat tensors of one model step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.scheduler import SchedulerOutput
from engine.model.attention.base import AttentionMetadata
from engine.model.lora.base import LoraBatch
from engine.model.lora.batching import lora_batch


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    # Rows of the hidden states whose logits are sampled, one per sampling sequence: [S]
    logits_indices: torch.Tensor
    # Index into SchedulerOutput.scheduled of each sampling row: len S
    sampling_seq_indices: list[int]
    # Which adapter slot each row uses; None when every row is the base model's.
    lora: LoraBatch | None = None


def build_step_inputs(out: SchedulerOutput, block_size: int, device: torch.device,
                      lora_slots: list[int] | None = None, num_lora_slots: int = 0,
                      lora_groups: bool = True) -> StepInputs:
    """``lora_slots``: the adapter slot of each scheduled sequence (-1: the base model), with
    ``num_lora_slots`` slots in the model; None when LoRA is off. ``lora_groups``: whether the
    model's LoRA kernels read the batch's host groups."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    sampling_seq_indices: list[int] = []
    max_blocks = 1
    for i, s in enumerate(out.scheduled):
        seq = s.seq
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens
        input_ids.extend(seq.token_ids(start, end))
        positions.extend(range(start, end))
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size
                     for p in range(start, end))
        query_start_loc.append(query_start_loc[-1] + s.num_new_tokens)
        seq_lens.append(end)
        max_blocks = max(max_blocks, len(table))
        if s.samples:
            logits_indices.append(query_start_loc[-1] - 1)
            sampling_seq_indices.append(i)

    block_tables = torch.zeros((len(out.scheduled), max_blocks), dtype=torch.int32)
    for i, s in enumerate(out.scheduled):
        table = s.seq.block_table
        block_tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)

    pin = device.type == "cuda"

    def to_dev(values: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if pin:
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    meta = AttentionMetadata(
        slot_mapping=to_dev(slots, torch.int64),
        query_start_loc=to_dev(query_start_loc, torch.int32),
        seq_lens=to_dev(seq_lens, torch.int32),
        block_tables=to_dev(block_tables, torch.int32),
        max_query_len=max(s.num_new_tokens for s in out.scheduled),
        max_seq_len=max(seq_lens),
        num_seqs=len(out.scheduled),
        decode_only=all(s.num_new_tokens == 1 for s in out.scheduled),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    lora = None if lora_slots is None else lora_batch(
        lora_slots, [s.num_new_tokens for s in out.scheduled], num_lora_slots, to_dev,
        lora_groups)
    return StepInputs(
        input_ids=to_dev(input_ids, torch.int64),
        positions=to_dev(positions, torch.int64),
        meta=meta,
        logits_indices=to_dev(logits_indices, torch.int64),
        sampling_seq_indices=sampling_seq_indices,
        lora=lora,
    )
