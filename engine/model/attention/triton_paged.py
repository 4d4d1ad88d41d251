"""Triton kernels for attention over the paged KV cache, and a torch reference beside them.

Cache layout (engine/model/attention/base.py): [num_blocks, block_size, Hkv, D]; token t of a
sequence lives in block ``block_table[t // block_size]`` at offset ``t % block_size``.

Two kernels:
- ``paged_decode``: one query row per sequence (a decode step), on tensor cores: a program
  takes one (sequence, KV head, run) and its query heads as the rows of the products (padded to
  16), so Triton pipelines the K/V tiles that feed them. Each sequence's context is split
  evenly into ``num_parts`` runs ("flash-decoding") so that a few long sequences still fill the
  GPU; a second small kernel merges the runs' partial softmaxes. Every size the kernels read comes
  from device tensors, so a launch needs no host synchronisation and can be captured in a CUDA
  graph (the grid depends only on the batch size).
- ``paged_prefill``: any number of query rows per sequence (prefill chunks with cached context,
  mixed steps), causal, reading keys and values through the block table.

Both compute the softmax in float32 and accumulate with online rescaling (flash attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens read per loop iteration. 64 rows of 128 fp16 values = 16 KB per K or V tile.
DECODE_BLOCK_N = 64
PREFILL_BLOCK_M = 16
PREFILL_BLOCK_N = 64
# Upper bound on the decode split; partial results cost NUM_PARTS * D floats per (seq, head).
MAX_DECODE_PARTS = 16
# Software-pipelining depth of the decode loop: two stages read K/V at 4.1-4.3 TB/s on an H200
# from 32 sequences up (three and four were slower; docs/benchmarks.md).
DECODE_STAGES = 2


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                       part_acc_ptr, part_max_ptr, part_sum_ptr, scale,
                       stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_bt,
                       stride_c_blk, stride_c_tok, stride_c_head,
                       GROUP: tl.constexpr, Q_ROWS: tl.constexpr, CACHE_BLOCK: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PARTS: tl.constexpr):
    """The decode step on tensor cores: one program per (sequence, KV head, run); its GROUP
    query heads are the rows of the products, padded to Q_ROWS (>= 16, the narrowest product
    the tensor cores take). The products cost nothing next to the K/V reads, and K/V tiles that
    feed a product are software-pipelined by Triton (num_stages), which keeps several tiles in
    flight per program."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    part_len = tl.cdiv(tl.cdiv(seq_len, NUM_PARTS), BLOCK_N) * BLOCK_N
    start = part * part_len
    end = tl.minimum(start + part_len, seq_len)

    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, Q_ROWS)
    r_ok = r < GROUP
    head = kv_head * GROUP + r  # [QR]
    q = tl.load(q_ptr + seq * stride_q_t + head[:, None] * stride_q_h + d[None, :],
                mask=r_ok[:, None], other=0.0)  # [QR, D]
    m_i = tl.full([Q_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([Q_ROWS], tl.float32)
    acc = tl.zeros([Q_ROWS, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        block = tl.load(table + t // CACHE_BLOCK, mask=valid, other=0).to(tl.int64)
        row = block * stride_c_blk + (t % CACHE_BLOCK) * stride_c_tok + kv_head * stride_c_head
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [QR, BN] fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        # t0 < end: every tile has a valid key, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    if NUM_PARTS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_o_t + head[:, None] * stride_o_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
    else:
        slot = (seq * num_heads + head) * NUM_PARTS + part  # [QR]
        tl.store(part_acc_ptr + slot.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=r_ok[:, None])
        tl.store(part_max_ptr + slot, m_i, mask=r_ok)
        tl.store(part_sum_ptr + slot, l_i, mask=r_ok)


@triton.jit
def _decode_merge_kernel(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr,
                         stride_o_t, stride_o_h,
                         HEAD_DIM: tl.constexpr, NUM_PARTS: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    base = (seq * num_heads + head) * NUM_PARTS
    p = tl.arange(0, NUM_PARTS)
    d = tl.arange(0, HEAD_DIM)
    m = tl.load(part_max_ptr + base + p)  # [P]
    l_parts = tl.load(part_sum_ptr + base + p)
    m_all = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # [P]
    total = tl.sum(w * l_parts, axis=0)
    acc = tl.load(part_acc_ptr + (base + p).to(tl.int64)[:, None] * HEAD_DIM + d[None, :])
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_t + head * stride_o_h + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                    query_start_ptr, out_ptr, scale,
                    stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_bt,
                    stride_c_blk, stride_c_tok, stride_c_head,
                    GROUP: tl.constexpr, CACHE_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_FRESH: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    # SKIP_FRESH: multi-token prompts with no cached context are computed by the caller (SDPA).
    skip = tile * BLOCK_M >= q_len
    if SKIP_FRESH:
        skip = skip | ((q_len == seq_len) & (q_len > 1))
    if skip:
        return
    kv_head = head // GROUP
    context = seq_len - q_len  # absolute position of this sequence's first query row

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_t + head * stride_q_h + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BM, D]
    q_pos = context + rows
    # Causality: this tile's last row sees keys up to position context + (tile + 1) * BM - 1.
    kv_end = tl.minimum(seq_len, context + (tile + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t0 in range(0, kv_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < kv_end
        block = tl.load(table + t // CACHE_BLOCK, mask=valid, other=0).to(tl.int64)
        row = block * stride_c_blk + (t % CACHE_BLOCK) * stride_c_tok + kv_head * stride_c_head
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [BM, BN]
        visible = valid[None, :] & (t[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        # Every row sees key 0 in the first tile, so m_new is finite from the first iteration.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_t + head * stride_o_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def decode_num_parts(num_seqs: int, num_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many runs to split each context into: enough programs to fill the GPU about four
    times over, never runs shorter than one tile, a power of two (the merge kernel's arange)."""
    wanted = triton.cdiv(4 * num_sms, num_seqs * num_heads)
    wanted = min(wanted, triton.cdiv(max_seq_len, DECODE_BLOCK_N), MAX_DECODE_PARTS)
    return triton.next_power_of_2(max(1, wanted))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 num_parts: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D] (one row per sequence) -> [B, H, D].

    seq_lens[b] counts the context including the new token, whose K/V must already be in the
    cache. A row with seq_len 0 yields zeros (CUDA-graph padding).
    """
    num_seqs, num_heads, head_dim = q.shape
    _, cache_block, num_kv_heads, _ = k_cache.shape
    _check_cache(k_cache, v_cache, head_dim)
    if out is None:
        out = torch.empty_like(q)
    if num_parts > 1:
        slots = num_seqs * num_heads * num_parts
        part_acc = torch.empty((slots, head_dim), dtype=torch.float32, device=q.device)
        part_max = torch.empty((slots,), dtype=torch.float32, device=q.device)
        part_sum = torch.empty((slots,), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_max = part_sum = out  # unused by the kernel when NUM_PARTS == 1
    group = num_heads // num_kv_heads
    _decode_kernel[(num_seqs, num_kv_heads, num_parts)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_max, part_sum,
        scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, Q_ROWS=max(16, triton.next_power_of_2(group)), CACHE_BLOCK=cache_block,
        HEAD_DIM=head_dim, BLOCK_N=DECODE_BLOCK_N, NUM_PARTS=num_parts, num_warps=4,
        num_stages=DECODE_STAGES)
    if num_parts > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            part_acc, part_max, part_sum, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_PARTS=num_parts, num_warps=4)
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                  out: torch.Tensor, skip_fresh: bool = False) -> torch.Tensor:
    """q: [T, H, D] flat rows of B sequences (query_start_loc: [B+1]) -> writes out [T, H, D].

    Rows of sequences skipped by ``skip_fresh`` (q_len == seq_len > 1) are left untouched.
    """
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_dim = q.shape
    _, cache_block, num_kv_heads, _ = k_cache.shape
    _check_cache(k_cache, v_cache, head_dim)
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, PREFILL_BLOCK_M))
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_heads // num_kv_heads, CACHE_BLOCK=cache_block, HEAD_DIM=head_dim,
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, SKIP_FRESH=skip_fresh, num_warps=4)
    return out


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> None:
    # The kernels address a head's D values as one contiguous run and share offsets between K
    # and V; head_dim must be a power of two for tl.arange.
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if k_cache.stride(3) != 1 or k_cache.shape[3] != head_dim:
        raise ValueError("the cache's last dim must be contiguous and equal to head_dim")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: list[int],
                              query_start_loc: list[int], scale: float) -> torch.Tensor:
    """float64 torch reference of both kernels: q: [T, H, D] -> [T, H, D] (float64)."""
    num_heads = q.shape[1]
    cache_block, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for i, seq_len in enumerate(seq_lens):
        q_start, q_end = query_start_loc[i], query_start_loc[i + 1]
        num_blocks = -(-seq_len // cache_block)
        blocks = block_tables[i, :num_blocks].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, k_cache.shape[3])[:seq_len].double()
        values = v_cache[blocks].reshape(-1, num_kv_heads, v_cache.shape[3])[:seq_len].double()
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [S, H, D]
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
        qi = q[q_start:q_end].double().transpose(0, 1)  # [H, L, D]
        scores = qi @ keys.permute(1, 2, 0) * scale  # [H, L, S]
        q_len = q_end - q_start
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[q_start:q_end] = (scores.softmax(-1) @ values.transpose(0, 1)).transpose(0, 1)
    return out
