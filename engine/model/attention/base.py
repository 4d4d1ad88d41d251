"""The attention seam: what a step's attention needs, and the backend interface.

A step is a flat batch of T new tokens from B sequences, sequence i owning the query rows
``query_start_loc[i] : query_start_loc[i+1]``. Decode sequences contribute one row, prefill
(chunks) several. Every sequence attends causally to its whole context: the tokens already in the
cache plus its new tokens, which the backend first writes into the cache at ``slot_mapping``.

KV cache layout, one pair per layer: [num_blocks, block_size, num_kv_heads, head_dim]. Slot s is
block s // block_size, offset s % block_size. A sequence's block table lists its blocks in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    # All tensors live on the model's device.
    slot_mapping: torch.Tensor  # [T] int64: cache slot for each new token's K/V
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    # Host-side copies of sizes, so backends need not synchronise to read them.
    max_query_len: int
    max_seq_len: int
    num_seqs: int
    # True when every sequence has query length 1 (a pure decode step: CUDA-graph friendly).
    decode_only: bool
    # Host copies of query_start_loc and seq_lens for backends that loop on the host (CPU).
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, kv_written: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> [T, H, D], written into ``out`` when one is given
        (a contiguous [T, H, D] tensor; CUDA-graph steps pass the static buffer the next
        graph reads).

        Writes k/v into the caches at meta.slot_mapping (unless ``kv_written``: the caller's
        fused rotary kernel did), then attends each query row causally over its sequence's
        context read through the block table.
        """
        ...

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> None:
        """Compile whatever the backend compiles lazily for the steps these caches will see,
        so that no request pays for it (engine/core/warmup.py)."""
        ...
