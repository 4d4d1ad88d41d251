"""Triton matrix products with GPTQ weights (w4a16 and w8a16), and the weight layout they read.

Layout: exllamav2's. Act-order rows are sorted by group (``perm``: the input row at each
sorted position), after which every group is a contiguous run of
``group_size`` rows, packed as on disk (word ``w`` of column n holds rows ``PACK * w + j``,
PACK = 32 / bits). 4-bit words are then shuffled the way exllamav2's kernel wants them (row j
at bit ``4 * (j // 2) + 16 * (j % 2)``), so one resident copy of a 4-bit layer serves both
exllamav2's kernel and these: ``ExllamaLinear`` hands over the very buffers exllamav2 rewrote,
and ``pack_for_triton`` builds the same layout where exllamav2 is absent. ``scales`` and
``qzeros`` keep their on-disk layout; resident bytes are the checkpoint's plus the permutation.

A kernel tile is 16 word rows by BN columns: ``16 * PACK`` input rows. Field j of the tile (one
shift and one mask per value, in the registers of the thread that loaded the word) holds rows
``PACK * (w0 + i) + j``, i = 0..15, multiplied with the activations of those rows.

The activations must arrive with their columns in sorted row order (``x[:, perm]``).

- ``_gemv_kernel`` (one token): weights become ``1 + q / 2^bits`` by placing q in the top
  mantissa bits of 1.0 (exact; a shift and an and-or), multiplied and summed in fp32 on the CUDA
  cores; the zero and scale of each row's group are applied to the sums,
  ``s * (2^bits (t - sum x) - (z + 1) sum x)``, once per 16-row tile.
- ``_gemm_kernel`` (two tokens and more): weights ``s * (q - (z + 1))`` in fp16 (q OR'ed into
  1024.0's mantissa minus 1024 + z + 1: exact, then one rounding by the scale, as the reference
  in engine/checkpoint/dequant.py rounds), tensor-core products of 16-row fields.
- ``_dequant_kernel``: the dense fp16 matrix, for cuBLAS on large steps.

Small steps split the input dimension over ``split_k`` programs per output tile to fill the GPU.
Split programs write fp32 partial sums to a workspace and bump a per-tile counter; the one that
arrives last adds the partials in split order (deterministic, unlike atomic adds), writes the
fp16 result and resets the counter, so there is no zero-fill launch and the kernels can be
replayed in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.checkpoint.dequant import unpack_rows
from engine.checkpoint.types import GPTQLinearWeights

TILE_WORDS = 16  # word rows per kernel tile (16 * PACK input rows)


@dataclass(frozen=True)
class KernelConfig:
    block_n: int  # output features per program
    block_m: int  # tokens per program: 1 selects the one-token kernel, else >= 16
    split_k: int  # programs sharing one output tile along the input dim: 1, 2, 4, 8 or 16
    num_warps: int
    num_stages: int


@dataclass
class TritonGPTQWeights:
    """One layer in the kernels' layout (see the module docstring)."""

    qweight: torch.Tensor  # int32 [in / pack, out]: sorted rows, 4-bit words shuffled
    scales: torch.Tensor  # fp16 [groups, out]
    qzeros: torch.Tensor  # int32 [groups, out / pack], stored minus one
    perm: torch.Tensor | None  # int32 [in]: input row of sorted position k; None: identity
    bias: torch.Tensor | None  # fp16 [out]
    bits: int
    group_size: int  # the whole input for checkpoints without groups
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales, self.qzeros, self.perm, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def unsupported_reason(weights: GPTQLinearWeights) -> str | None:
    """Why the kernels cannot take this layer, or None when they can."""
    if weights.bits not in (4, 8):
        return f"{weights.bits}-bit weights (the kernels take 4 and 8 bits)"
    pack = 32 // weights.bits
    rows = pack * TILE_WORDS
    if weights.out_features % pack or weights.in_features % rows:
        return (f"shape {weights.in_features}x{weights.out_features} (in_features must be a "
                f"multiple of {rows}, out_features of {pack})")
    group = weights.group_size or weights.in_features
    if weights.in_features % group or group % pack:
        return f"group size {group} (must be a multiple of {pack} dividing in_features)"
    if weights.g_idx is not None:
        counts = torch.bincount(weights.g_idx.long().cpu(),
                                minlength=weights.in_features // group)
        if counts.numel() != weights.in_features // group or bool((counts != group).any()):
            return "a g_idx whose groups are not all group_size rows"
    return None


def field_shift(j: int, bits: int) -> int:
    """Bit offset of row j of a word (exllamav2's 4-bit shuffle; plain order for 8 bits)."""
    return 4 * (j // 2) + 16 * (j % 2) if bits == 4 else bits * j


def pack_for_triton(weights: GPTQLinearWeights, device: torch.device) -> TritonGPTQWeights:
    """The checkpoint's tensors in the kernels' layout, on ``device`` (call
    ``unsupported_reason`` first). Peak extra memory is one layer's unpacked matrix."""
    bits, k, n = weights.bits, weights.in_features, weights.out_features
    pack = 32 // bits
    group = weights.group_size or k
    q = unpack_rows(weights.qweight.to(device=device, dtype=torch.int32), bits)  # [in, out]
    perm = sort_rows_by_group(weights, device)
    if perm is not None:
        q = q[perm.long()]
    shifts = torch.tensor([field_shift(j, bits) for j in range(pack)], device=device,
                          dtype=torch.int64).view(1, pack, 1)
    words = (q.to(torch.int64).view(k // pack, pack, n) << shifts).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return TritonGPTQWeights(
        qweight=words.contiguous(),
        scales=weights.scales.to(device=device, dtype=torch.float16).contiguous(),
        qzeros=weights.qzeros.to(device=device, dtype=torch.int32).contiguous(),
        perm=perm,
        bias=None if weights.bias is None else weights.bias.to(device=device,
                                                               dtype=torch.float16),
        bits=bits, group_size=group, in_features=k, out_features=n)


def sort_rows_by_group(weights: GPTQLinearWeights, device: torch.device) -> torch.Tensor | None:
    """int32 [in]: the input row at each sorted position (a stable sort by group, as
    exllamav2 makes it), or None when the rows are already in group order."""
    if weights.g_idx is None:
        return None
    group = weights.group_size or weights.in_features
    g_idx = weights.g_idx.to(device=device, dtype=torch.int64)
    if torch.equal(g_idx, torch.arange(weights.in_features, device=device) // group):
        return None
    return torch.argsort(g_idx, stable=True).to(torch.int32)


# ---- shared pieces ----------------------------------------------------------------------------


@triton.jit
def _tile_meta(scales_ptr, qzeros_ptr, rows0, offs_n, n_ok, N, BITS: tl.constexpr,
               GROUP: tl.constexpr):
    """Scale (fp16) and zero + 1 (int32) of the group of each word row's input rows, as
    [1, BN] when the whole tile is one group, else [16, BN]. rows0: [16] first input row of
    each word row (a word's PACK rows always share a group)."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if GROUP >= PACK * 16:
        g = tl.min(rows0, axis=0) // GROUP
        s_ptrs = scales_ptr + g * N + offs_n[None, :]
        z_ptrs = qzeros_ptr + g * (N // PACK) + (offs_n // PACK)[None, :]
        ok = n_ok[None, :]
    else:
        g = (rows0 // GROUP)[:, None]
        s_ptrs = scales_ptr + g * N + offs_n[None, :]
        z_ptrs = qzeros_ptr + g * (N // PACK) + (offs_n // PACK)[None, :]
        ok = n_ok[None, :] & (g >= 0)
    scale = tl.load(s_ptrs, mask=ok, other=0.0)
    zword = tl.load(z_ptrs, mask=ok, other=0)
    zero1 = ((zword >> ((offs_n % PACK) * BITS)[None, :]) & MASK) + 1
    return scale, zero1


@triton.jit
def _shift_mask(words, SHIFT: tl.constexpr, MASK: tl.constexpr):
    """(words >> SHIFT) & MASK for a signed compile-time shift (negative: to the left)."""
    if SHIFT >= 0:
        return (words >> SHIFT) & MASK
    return (words << (-SHIFT)) & MASK


@triton.jit
def _field_shift(J: tl.constexpr, BITS: tl.constexpr):
    """The device twin of ``field_shift``."""
    if BITS == 4:
        return 4 * (J // 2) + 16 * (J % 2)
    return BITS * J


@triton.jit
def _field_half(words, zero1, scale, J: tl.constexpr, BITS: tl.constexpr):
    """fp16 weights s * (q - (z + 1)) [16, BN] of row J of each word."""
    MASK: tl.constexpr = (1 << BITS) - 1
    q = _shift_mask(words, _field_shift(J, BITS), MASK)
    v = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + q
    z = (zero1 + 1024).to(tl.float16)  # exact: small integers past 1024
    return (v - z) * scale


@triton.jit
def _unit_float(words, J: tl.constexpr, BITS: tl.constexpr):
    """1 + q / 2^BITS as fp32 [16, BN] for row J of each word: q lands in the top mantissa bits
    of 1.0 (0x3F800000), exactly, for one shift and one and-or."""
    MANT: tl.constexpr = 23 - BITS  # the lowest mantissa bit the field lands on
    bits = _shift_mask(words, _field_shift(J, BITS) - MANT, ((1 << BITS) - 1) << MANT)
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _correct(t, x_sum, scale, zero1, BITS: tl.constexpr):
    """From t = sum x (1 + q / 2^B) and x_sum = sum x over a word row's inputs to
    sum x * s * (q - (z + 1)) = s * (2^B (t - x_sum) - (z + 1) x_sum).
    t: [16, BN], x_sum: [16], scale and zero1: [1 or 16, BN]."""
    s = scale.to(tl.float32)
    xs = x_sum[:, None]
    return (t - xs) * (s * (1 << BITS)) - xs * (zero1.to(tl.float32) * s)


@triton.jit
def _store_or_reduce(acc, out_ptrs, out_ok, part, ws_ptr, counter_ptr, pid_k, tile, MN, bias,
                     SPLIT_K: tl.constexpr):
    """Write acc (fp32) as fp16, or, split, hand it to the last program of its tile."""
    if SPLIT_K == 1:
        tl.store(out_ptrs, (acc + bias).to(tl.float16), mask=out_ok)
    else:
        tl.store(ws_ptr + pid_k * MN + part, acc, mask=out_ok)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            # Unrolled: all partial loads are in flight at once.
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * MN + part, mask=out_ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptrs, (total + bias).to(tl.float16), mask=out_ok)
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")


# ---- kernels --------------------------------------------------------------------------------


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr, ws_ptr,
                 counter_ptr, N, K, BITS: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[0, n] = sum_k x[0, k] w[k, n] for one token: x [1, K] fp16 -> out [1, N] fp16.
    Three instructions per weight (shift, and-or, fused multiply-add); each thread keeps its
    word rows' sums in acc [16, BN] and the rows are added up once at the end."""
    PACK: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    r = tl.arange(0, 16)
    num_tiles = K // (PACK * 16)
    lo = pid_k * num_tiles // SPLIT_K
    hi = (pid_k + 1) * num_tiles // SPLIT_K
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for tile in range(lo, hi):
        w_rows = tile * 16 + r  # [16]
        words = tl.load(qw_ptr + w_rows[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=n_ok[None, :], other=0)  # [16, BN] int32
        rows0 = w_rows * PACK
        t = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((16,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            xj = tl.load(x_ptr + rows0 + j).to(tl.float32)  # [16]
            t += xj[:, None] * _unit_float(words, j, BITS)
            x_sum += xj
        scale, zero1 = _tile_meta(scales_ptr, qzeros_ptr, rows0, offs_n, n_ok, N, BITS, GROUP)
        acc += _correct(t, x_sum, scale, zero1, BITS)
    total = tl.sum(acc, axis=0)[None, :]  # [1, BN]
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    _store_or_reduce(total, out_ptr + offs_n[None, :], n_ok[None, :], offs_n[None, :], ws_ptr,
                     counter_ptr, pid_k, pid_n, N, bias, SPLIT_K)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr, ws_ptr,
                 counter_ptr, M, N, K, stride_xm, stride_om, BITS: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out = x @ w: x [M, K] fp16 -> out [M, N] fp16, one [BM, BN] tile per program and one
    tensor-core product per row j of the words (K = 16 each)."""
    PACK: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    r = tl.arange(0, 16)
    num_tiles = K // (PACK * 16)
    lo = pid_k * num_tiles // SPLIT_K
    hi = (pid_k + 1) * num_tiles // SPLIT_K
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BM, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(lo, hi):
        w_rows = tile * 16 + r
        words = tl.load(qw_ptr + w_rows[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=n_ok[None, :], other=0)  # [16, BN] int32
        rows0 = w_rows * PACK
        scale, zero1 = _tile_meta(scales_ptr, qzeros_ptr, rows0, offs_n, n_ok, N, BITS, GROUP)
        for j in tl.static_range(PACK):
            # x arrives in field order (``gemm_columns``): field j's 16 rows are contiguous.
            cols = tile * (PACK * 16) + j * 16 + r
            xj = tl.load(x_rows + cols[None, :], mask=m_ok[:, None], other=0.0)  # [BM, 16]
            acc = tl.dot(xj, _field_half(words, zero1, scale, j, BITS), acc)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    part = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tile_id = pid_m * tl.num_programs(0) + pid_n
    _store_or_reduce(acc, out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                     out_ok, part, ws_ptr, counter_ptr, pid_k, tile_id, M * N, bias, SPLIT_K)


@triton.jit
def _dequant_kernel(qw_ptr, scales_ptr, qzeros_ptr, out_ptr, N, K, BITS: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dense fp16 weight, transposed: out [K, N] (rows in sorted order), 16 word rows per
    program row."""
    PACK: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_rows = tl.program_id(1) * 16 + tl.arange(0, 16)
    words = tl.load(qw_ptr + w_rows[:, None].to(tl.int64) * N + offs_n[None, :],
                    mask=n_ok[None, :], other=0)
    rows0 = w_rows * PACK
    scale, zero1 = _tile_meta(scales_ptr, qzeros_ptr, rows0, offs_n, n_ok, N, BITS, GROUP)
    for j in tl.static_range(PACK):
        w = _field_half(words, zero1, scale, j, BITS)
        tl.store(out_ptr + (rows0 + j)[:, None].to(tl.int64) * N + offs_n[None, :], w,
                 mask=n_ok[None, :])


# ---- launchers ------------------------------------------------------------------------------


class SplitKWorkspace:
    """The fp32 partials and per-tile counters shared by every layer's split launches.

    Layers run one after another on one stream, so one workspace serves them all; the
    counters are zero between launches (the last program of each tile resets its own).
    """

    def __init__(self, max_partial_elements: int, max_tiles: int, device: torch.device) -> None:
        self.partials = torch.empty(max_partial_elements, dtype=torch.float32, device=device)
        self.counters = torch.zeros(max_tiles, dtype=torch.int32, device=device)

    def fits(self, split_k: int, m: int, n: int, tiles: int) -> bool:
        return split_k * m * n <= self.partials.numel() and tiles <= self.counters.numel()


def gemm_columns(w: TritonGPTQWeights) -> torch.Tensor:
    """int64 [in]: the input row behind each activation column the tensor-core kernel reads.
    It reads tile by tile (16 * PACK rows) and, within a tile, field by field: column
    ``tile * 16 * PACK + j * 16 + i`` is sorted row ``tile * 16 * PACK + PACK * i + j``, so each
    field's activations are one contiguous 16-column run (with strided reads instead, the plan
    measured on an H200 preferred dequantise-then-cuBLAS from 32 tokens up)."""
    pack = 32 // w.bits
    k = w.in_features
    device = w.qweight.device
    tiles = torch.arange(k // (16 * pack), device=device).view(-1, 1, 1) * (16 * pack)
    j = torch.arange(pack, device=device).view(1, -1, 1)
    i = torch.arange(16, device=device).view(1, 1, -1)
    sorted_rows = (tiles + pack * i + j).reshape(-1)  # kernel column order
    return sorted_rows if w.perm is None else w.perm.long()[sorted_rows]


def kernel_input(x: torch.Tensor, w: TritonGPTQWeights, gemm_cols: torch.Tensor,
                 one_token: bool) -> torch.Tensor:
    """The activations as ``gptq_matmul`` reads them: sorted row order for the one-token
    kernel (``x[:, perm]``, or x itself), ``gemm_columns`` order for the other."""
    if one_token:
        return x if w.perm is None else x.index_select(1, w.perm.long())
    return x.index_select(1, gemm_cols)


def gptq_matmul(x: torch.Tensor, w: TritonGPTQWeights, config: KernelConfig,
                workspace: SplitKWorkspace | None) -> torch.Tensor:
    """x: [M, in] fp16, its columns as ``kernel_input`` orders them -> [M, out] fp16."""
    m, k = x.shape
    n = w.out_features
    if k != w.in_features:
        raise ValueError(f"x has {k} features, the layer takes {w.in_features}")
    if config.split_k not in (1, 2, 4, 8, 16):
        raise ValueError(f"split_k must be 1, 2, 4, 8 or 16, got {config.split_k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    one_token = config.block_m == 1
    if one_token and m != 1:
        raise ValueError("block_m=1 is the one-token kernel")
    out = torch.empty((m, n), dtype=torch.float16, device=x.device)
    grid = (triton.cdiv(n, config.block_n), 1 if one_token else triton.cdiv(m, config.block_m),
            config.split_k)
    if config.split_k > 1 and (workspace is None
                               or not workspace.fits(config.split_k, m, n, grid[0] * grid[1])):
        raise ValueError(f"split_k={config.split_k} needs a workspace for {m}x{n}")
    ws = workspace.partials if workspace is not None else out
    counters = workspace.counters if workspace is not None else out
    bias = w.bias if w.bias is not None else out
    common = dict(BITS=w.bits, GROUP=w.group_size, BLOCK_N=config.block_n,
                  SPLIT_K=config.split_k, HAS_BIAS=w.bias is not None,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    if one_token:
        _gemv_kernel[(grid[0], grid[2])](x, w.qweight, w.scales, w.qzeros, bias, out, ws,
                                         counters, n, k, **common)
    else:
        _gemm_kernel[grid](x, w.qweight, w.scales, w.qzeros, bias, out, ws, counters, m, n, k,
                           x.stride(0), out.stride(0), BLOCK_M=config.block_m, **common)
    return out


def dequantize_into(w: TritonGPTQWeights, out: torch.Tensor) -> torch.Tensor:
    """Write the dense weight, transposed, into ``out``: [in, out] fp16, input rows in sorted
    order (act-order layers multiply ``x[:, perm]``). Returns ``out``."""
    k, n = w.in_features, w.out_features
    if out.shape != (k, n) or out.dtype != torch.float16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp16 [{k}, {n}] tensor")
    rows = 32 // w.bits * TILE_WORDS
    _dequant_kernel[(triton.cdiv(n, 128), k // rows)](
        w.qweight, w.scales, w.qzeros, out, n, k, BITS=w.bits, GROUP=w.group_size, BLOCK_N=128,
        num_warps=4)
    return out
