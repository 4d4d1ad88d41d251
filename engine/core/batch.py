"""Turning a SchedulerOutput into the flat tensors of one model step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.core.scheduler import SchedulerOutput
from engine.model.attention.base import AttentionMetadata
from engine.model.lora.base import LoraBatch
from engine.model.lora.batching import lora_batch
from engine.transfer import Upload, to_device


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64; rows in pending_rows hold 0 until feed_pending
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    # Rows of the hidden states whose logits are sampled, one per sampling sequence: [S]
    logits_indices: torch.Tensor
    # Index into SchedulerOutput.scheduled of each sampling row: len S
    sampling_seq_indices: list[int]
    # Rows of input_ids whose token the previous step sampled and the host does not know yet,
    # and that token's row in the previous step's sampled ids: [P] int64 each (None: P = 0).
    pending_rows: torch.Tensor | None = None
    pending_src: torch.Tensor | None = None
    # Which adapter slot each row uses; None when every row is the base model's.
    lora: LoraBatch | None = None

    def feed_pending(self, previous: torch.Tensor | None) -> None:
        """Write the previous step's sampled ids (``previous``: [S'] int64, on the device)
        into the rows waiting for them: a gather on the device, no wait for the host."""
        if self.pending_rows is None:
            return
        assert previous is not None, "a row waits for a token no step sampled"
        self.input_ids.index_copy_(0, self.pending_rows, previous[self.pending_src])


def build_step_inputs(out: SchedulerOutput, block_size: int, device: torch.device,
                      previous_rows: Mapping[int, int] | None = None,
                      lora_slots: list[int] | None = None, num_lora_slots: int = 0,
                      lora_groups: bool = True) -> StepInputs:
    """``previous_rows``: seq_id -> row of the previous step's sampled ids, for sequences whose
    last token is still pending (only the step just before can have sampled it).
    ``lora_slots``: the adapter slot of each scheduled sequence (-1: the base model), with
    ``num_lora_slots`` slots in the model; None when LoRA is off. ``lora_groups``: whether the
    model's LoRA kernels read the batch's host groups."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    sampling_seq_indices: list[int] = []
    pending_rows: list[int] = []
    pending_src: list[int] = []
    max_blocks = 1
    for i, s in enumerate(out.scheduled):
        seq = s.seq
        start, end = s.start, s.start + s.num_new_tokens
        known = seq.num_known_tokens
        input_ids.extend(seq.token_ids(start, min(end, known)))
        if end > known:
            # A sequence's last token may still be on the device: the previous step sampled
            # it. At most that one: the step before resolved everything older.
            assert end == known + 1 and previous_rows is not None \
                and seq.seq_id in previous_rows, "a pending token the previous step lacks"
            pending_rows.append(query_start_loc[-1] + end - 1 - start)
            pending_src.append(previous_rows[seq.seq_id])
            input_ids.append(0)
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

    up = Upload()
    ids_slot = up.add(input_ids, torch.int64)
    pos_slot = up.add(positions, torch.int64)
    slot_slot = up.add(slots, torch.int64)
    logits_slot = up.add(logits_indices, torch.int64)
    rows_slot = up.add(pending_rows, torch.int64)
    src_slot = up.add(pending_src, torch.int64)
    qsl_slot = up.add(query_start_loc, torch.int32)
    lens_slot = up.add(seq_lens, torch.int32)
    tables_slot = up.add(block_tables, torch.int32)
    dev = up.send(device)

    meta = AttentionMetadata(
        slot_mapping=dev[slot_slot],
        query_start_loc=dev[qsl_slot],
        seq_lens=dev[lens_slot],
        block_tables=dev[tables_slot],
        max_query_len=max(s.num_new_tokens for s in out.scheduled),
        max_seq_len=max(seq_lens),
        num_seqs=len(out.scheduled),
        decode_only=all(s.num_new_tokens == 1 for s in out.scheduled),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    lora = None if lora_slots is None else lora_batch(
        lora_slots, [s.num_new_tokens for s in out.scheduled], num_lora_slots,
        lambda values, dtype: to_device(torch.tensor(values, dtype=dtype), device),
        lora_groups)
    return StepInputs(
        input_ids=dev[ids_slot],
        positions=dev[pos_slot],
        meta=meta,
        logits_indices=dev[logits_slot],
        sampling_seq_indices=sampling_seq_indices,
        pending_rows=dev[rows_slot] if pending_rows else None,
        pending_src=dev[src_slot] if pending_rows else None,
        lora=lora,
    )
