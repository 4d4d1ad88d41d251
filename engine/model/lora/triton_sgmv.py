"""Grouped low-rank LoRA kernels for CUDA in Triton, segmented by adapter (Punica's SGMV).

Two launches per linear layer, each over a static grid (so a decode step can be captured in a
CUDA graph: the segments are read from device tensors, never from host values):

- shrink: ``v[split, row, :] = x[row, k-range of split] @ A[slot]^T`` for the rows of each
  slot. Grid (slot, row block of the slot's segment, rank block x K split). A row block holds
  rows of one adapter only, so each program streams that adapter's A once for up to
  ``BLOCK_M`` rows; the K split gives a decode step (a few rows per adapter) enough programs
  to stream A at full bandwidth. Partial sums go to a workspace, not atomics: no zeroing, and
  the result does not depend on the order programs run in.
- expand: ``y[row, cols of slice s] += (sum over splits of v[., row, s*R:(s+1)*R]) @
  B[slot, cols]^T``. Grid (slot x slice, row block, column block of the slice). Every (row,
  column) belongs to exactly one program, so the read-modify-write of y races with nothing.

Programs whose row block lies past their segment's end exit at once; base-model rows are in no
segment and are never touched. Checked on the CPU in Triton's interpreter
(tests/interp/lora_check.py) and on the GPU by tests/test_cuda_lora.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.model.lora.base import LoraBatch, LoraSite

BLOCK_M = 16  # tl.dot's smallest tile
MAX_SPLIT_K = 16


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, v_ptr, rows_ptr, seg_ptr, num_rows, K, NV, k_per_split,
                   stride_xm, stride_al, stride_ar, stride_vs, stride_vm,
                   NUM_R_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    slot = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2) % NUM_R_BLOCKS
    split = tl.program_id(2) // NUM_R_BLOCKS
    lo = tl.load(seg_ptr + slot)
    hi = tl.load(seg_ptr + slot + 1)
    start = lo + pid_m * BLOCK_M
    if start >= hi:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < hi
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # [BM]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < NV
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + slot.to(tl.int64) * stride_al
    k_lo = split * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        kk = k_lo + k0 + offs_k
        mask_k = (kk < K) & (k0 + offs_k < k_per_split)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        a = tl.load(a_base + offs_r[None, :] * stride_ar + kk[:, None],
                    mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # [BK, BR]
        if IEEE:
            acc += tl.dot(x, a, input_precision="ieee")
        else:
            acc += tl.dot(x, a)
    v_ptrs = v_ptr + split * stride_vs + rows[:, None] * stride_vm + offs_r[None, :]
    tl.store(v_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(v_ptr, b_ptr, y_ptr, rows_ptr, seg_ptr, off_ptr, num_splits, R,
                   stride_vs, stride_vm, stride_bl, stride_bn, stride_ym,
                   NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    slot = tl.program_id(0) // NUM_SLICES
    s = tl.program_id(0) % NUM_SLICES
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    lo = tl.load(seg_ptr + slot)
    hi = tl.load(seg_ptr + slot + 1)
    start = lo + pid_m * BLOCK_M
    n_lo = tl.load(off_ptr + s)
    n_hi = tl.load(off_ptr + s + 1)
    n_start = n_lo + pid_n * BLOCK_N
    if (start >= hi) | (n_start >= n_hi):
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < hi
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # [BM]
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_hi
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    v = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    v_ptrs = v_ptr + rows[:, None] * stride_vm + (s * R + offs_r)[None, :]
    for split in range(0, num_splits):
        v += tl.load(v_ptrs + split * stride_vs, mask=mask_m[:, None] & mask_r[None, :],
                     other=0.0)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + offs_n[None, :] * stride_bn
                + offs_r[:, None], mask=mask_n[None, :] & mask_r[:, None], other=0.0)  # [BR, BN]
    if IEEE:
        delta = tl.dot(v, b.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(v.to(b.dtype), b)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def split_k(k: int) -> int:
    """K splits of the shrink: about 512 inputs a program (the A rows of a decode step's few
    rows per adapter are then streamed by enough programs to fill the card)."""
    return max(1, min(MAX_SPLIT_K, k // 512))


class TritonLoraKernels:
    name = "triton"
    graph_capturable = True
    reads_groups = False

    def __init__(self, max_num_tokens: int, max_width: int, device: torch.device) -> None:
        """``max_width``: the largest S * max_rank of any layer (the shrink's output width)."""
        # fp32 partial sums of the shrink: [split, T, S*R], shared by every layer in turn.
        self.workspace = torch.empty(MAX_SPLIT_K * max_num_tokens * max_width,
                                     dtype=torch.float32, device=device)

    def add(self, y: torch.Tensor, x: torch.Tensor, site: LoraSite, batch: LoraBatch) -> None:
        sgmv(y, x, site, batch, self.workspace)


def sgmv(y: torch.Tensor, x: torch.Tensor, site: LoraSite, batch: LoraBatch,
         workspace: torch.Tensor) -> None:
    """y: [T, out] += the per-segment LoRA delta of x: [T, in] (both with unit column stride)."""
    assert x.stride(1) == 1 and y.stride(1) == 1
    t, k = x.shape
    num_slots, nv, _ = site.a.shape
    r = site.max_rank
    splits = split_k(k)
    v = workspace[:splits * t * nv].view(splits, t, nv)  # [split, T, S*R] fp32
    ieee = x.dtype == torch.float32
    block_r = min(64, max(16, triton.next_power_of_2(nv)))
    num_r_blocks = triton.cdiv(nv, block_r)
    row_blocks = triton.cdiv(t, BLOCK_M)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), 64) * 64  # whole BLOCK_K tiles
    _shrink_kernel[(num_slots, row_blocks, num_r_blocks * splits)](
        x, site.a, v, batch.sorted_rows, batch.seg_start, t, k, nv, k_per_split,
        x.stride(0), site.a.stride(0), site.a.stride(1), v.stride(0), v.stride(1),
        NUM_R_BLOCKS=num_r_blocks, BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=64, IEEE=ieee,
        num_warps=4)
    num_slices = len(site.slices)
    widest = max(size for _, size in site.slices)
    block_n = 64
    _expand_kernel[(num_slots * num_slices, row_blocks, triton.cdiv(widest, block_n))](
        v, site.b, y, batch.sorted_rows, batch.seg_start, site.slice_offsets, splits, r,
        v.stride(0), v.stride(1), site.b.stride(0), site.b.stride(1), y.stride(0),
        NUM_SLICES=num_slices, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(r)), IEEE=ieee, num_warps=4)
