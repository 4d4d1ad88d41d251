"""Fused Triton kernels for the small per-layer operations of the Llama forward on CUDA.

In a decode step the big matrix products take a few microseconds each; the norm, rotary and
activation, written as plain torch expressions, are ~40 tiny kernels per layer whose launch and
ramp times add up to as much again. Each function here is one kernel and computes what its torch
counterpart in engine/model/layers.py computes (float32 inside, one rounding to the model dtype
at the same points), so the two paths agree to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o,
                     stride_s, n, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # h = x + residual, rounded to the model dtype as the torch addition would be.
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n + eps)
    normed = (x32 * inv).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, w * normed, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, hidden] -> weight * normalise(x), as layers.rms_norm."""
    out = torch.empty_like(x)
    _launch_norm(x, None, weight, out, None, eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (h, rms_norm(h)) with h = x + residual; x, residual: [T, hidden]."""
    h = torch.empty_like(x)
    out = torch.empty_like(x)
    _launch_norm(x, residual, weight, out, h, eps)
    return h, out


def _launch_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 out: torch.Tensor, h: torch.Tensor | None, eps: float) -> None:
    rows, n = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rows must be contiguous")
    has_res = residual is not None
    _rms_norm_kernel[(rows,)](
        x, residual if has_res else x, weight, out, h if has_res else out,
        x.stride(0), residual.stride(0) if has_res else 0, out.stride(0),
        h.stride(0) if has_res else 0, n, eps,
        HAS_RESIDUAL=has_res, BLOCK=triton.next_power_of_2(n), num_warps=8)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr,
                   qo_ptr, ko_ptr, vo_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   num_q_heads, num_kv_heads, HALF: tl.constexpr, HEADS: tl.constexpr,
                   WRITE_KV: tl.constexpr, OUT: tl.constexpr):
    # Programs (token, block of HEADS heads): q heads, then k heads, then (WRITE_KV) v heads.
    # HEADS divides both head counts, so a block is all q, all k or all v heads. (One head a
    # program, a 512-token prefill launched 61,440 one-warp programs of 256 bytes each and
    # took 39 us a layer on an H200, 1.5 ms of the prompt's 30.) OUT: the rotated q and k and
    # the v rows go to contiguous [T, heads, D] outputs (qo, ko, vo) instead of in place.
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * HEADS
    hh = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, HALF)[None, :]
    if head < num_q_heads + num_kv_heads:
        if head < num_q_heads:
            base = q_ptr + t * stride_qt + (head + hh) * stride_qh
            dst_out = qo_ptr + (t * num_q_heads + head + hh) * (2 * HALF)
        else:
            base = k_ptr + t * stride_kt + (head - num_q_heads + hh) * stride_kh
            dst_out = ko_ptr + (t * num_kv_heads + head - num_q_heads + hh) * (2 * HALF)
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cos_ptr + pos * HALF + d)
        sin = tl.load(sin_ptr + pos * HALF + d)
        x1 = tl.load(base + d)
        x2 = tl.load(base + HALF + d)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        y1 = (a * cos - b * sin).to(x1.dtype)
        y2 = (b * cos + a * sin).to(x1.dtype)
        if OUT:
            tl.store(dst_out + d, y1)
            tl.store(dst_out + HALF + d, y2)
        else:
            tl.store(base + d, y1)
            tl.store(base + HALF + d, y2)
        if WRITE_KV:  # noqa: SIM102 (a compile-time branch around a run-time one)
            if head >= num_q_heads:  # the rotated key rows go to their cache slot as well
                slot = tl.load(slot_ptr + t)
                dst = kc_ptr + (slot * num_kv_heads + head - num_q_heads + hh) * (2 * HALF)
                tl.store(dst + d, y1)
                tl.store(dst + HALF + d, y2)
    else:  # WRITE_KV: value rows, copied to their cache slot
        h = head - num_q_heads - num_kv_heads + hh
        slot = tl.load(slot_ptr + t)
        src = v_ptr + t * stride_vt + h * stride_vh
        dst = vc_ptr + (slot * num_kv_heads + h) * (2 * HALF)
        v1 = tl.load(src + d)
        v2 = tl.load(src + HALF + d)
        tl.store(dst + d, v1)
        tl.store(dst + HALF + d, v2)
        if OUT:
            dst_out = vo_ptr + (t * num_kv_heads + h) * (2 * HALF)
            tl.store(dst_out + d, v1)
            tl.store(dst_out + HALF + d, v2)


def heads_a_program(num_heads: int, kv_heads: int) -> int:
    """The rotary kernel's heads a program: the largest power of two up to 8 dividing both
    head counts (8 for every Llama-2 size's q and kv heads, 1 where nothing else divides)."""
    heads = 8
    while num_heads % heads or kv_heads % heads:
        heads //= 2
    return heads


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> None:
    """Rotate q: [T, H, D] and k: [T, Hkv, D] in place (rotate-half layout, as
    layers.RotaryEmbedding.apply). cos, sin: [P, D/2] float32 contiguous; positions: [T]."""
    _rotary(q, k, positions, cos, sin, None)


def rotary_write_kv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """rotary_ and, in the same launch, the rotated k and v: [T, Hkv, D] written to their cache
    slots (as attention.torch_ref.write_kv): two fewer kernels a layer, which in a
    single-sequence decode step are ~5% of its time. Caches: [N, block, Hkv, D] contiguous.

    ``out``: contiguous (q, k, v) tensors of q's and k's shapes that take the rotated q and k
    and a copy of v, q and k then left as they were (the step graphs' static q/k/v buffers:
    no copy kernels)."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or v.stride(2) != 1:
        raise ValueError("the caches and the value rows' head dim must be contiguous")
    if out is not None and not all(o.is_contiguous() and o.shape == x.shape
                                   for o, x in zip(out, (q, k, v), strict=True)):
        raise ValueError("the outputs must be contiguous and shaped like q, k and v")
    _rotary(q, k, positions, cos, sin, (v, k_cache, v_cache, slot_mapping), out)


def _rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor,
            kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
            out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    t, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or not cos.is_contiguous():
        raise ValueError("head dims and the cos/sin tables must be contiguous")
    v, k_cache, v_cache, slots = kv if kv is not None else (k, k, k, positions)
    qo, ko, vo = out if out is not None else (q, k, v)
    heads = heads_a_program(num_heads, kv_heads)
    _rotary_kernel[(t, (num_heads + kv_heads * (2 if kv is not None else 1)) // heads)](
        q, k, v, positions, cos, sin, slots, k_cache, v_cache, qo, ko, vo, q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), num_heads, kv_heads,
        HALF=head_dim // 2, HEADS=heads, WRITE_KV=kv is not None, OUT=out is not None,
        num_warps=2 if heads * head_dim >= 512 else 1)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    # silu rounds to the model dtype before the product, as torch's silu(gate) * up does.
    act = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
    tl.store(out_ptr + row * stride_o + cols, act * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate then up) -> silu(gate) * up: [T, I]."""
    rows, width = gate_up.shape
    n = width // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0),
                                                     out.stride(0), n, BLOCK=block, num_warps=4)
    return out
