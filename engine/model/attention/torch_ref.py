"""Reference attention over the paged KV cache, in plain torch (CPU path and test oracle).

Loops over sequences on the host; clarity over speed.
"""

from __future__ import annotations

import torch

from engine.model.attention.base import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their cache slots. k, v: [T, Hkv, D]."""
    num_blocks, block_size, h_kv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` cached rows of one sequence. -> [seq_len, Hkv, D]"""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    rows = cache[block_table[:num_blocks].long()]  # [nb, bs, Hkv, D]
    return rows.reshape(-1, *cache.shape[2:])[:seq_len]


class TorchAttentionBackend:
    name = "torch"

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> None:
        """Nothing to do: plain torch operations compile nothing."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, kv_written: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
        if not kv_written:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q) if out is None else out  # [T, H, D]
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        for i in range(meta.num_seqs):
            q_start, q_end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
            seq_len = meta.seq_lens_cpu[i]
            q_len = q_end - q_start
            keys = gather_context(k_cache, meta.block_tables[i], seq_len)  # [S, Hkv, D]
            values = gather_context(v_cache, meta.block_tables[i], seq_len)
            if group > 1:
                keys = keys.repeat_interleave(group, dim=1)
                values = values.repeat_interleave(group, dim=1)
            qi = q[q_start:q_end].transpose(0, 1).float()  # [H, q_len, D]
            scores = qi @ keys.permute(1, 2, 0).float() * scale  # [H, q_len, S]
            # Query j sits at absolute position seq_len - q_len + j and sees keys up to there.
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
            k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
            probs = scores.softmax(dim=-1)
            out[q_start:q_end] = (probs @ values.transpose(0, 1).float()).transpose(0, 1) \
                .to(q.dtype)
        return out
