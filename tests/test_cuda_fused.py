"""The fused Triton norm / rotary / SiLU kernels against their torch counterparts (layers.py)."""

from __future__ import annotations

import pytest
import torch

from engine.model.layers import RotaryEmbedding, rms_norm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [5120, 256])
def test_norms(dtype: torch.dtype, hidden: int) -> None:
    from engine.model import triton_fused

    x = torch.randn((33, hidden), device="cuda").to(dtype)
    res = torch.randn_like(x)
    w = (torch.rand(hidden, device="cuda") + 0.5).to(dtype)
    assert max_rel(triton_fused.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5)) < 2e-3
    h, normed = triton_fused.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(h, x + res)
    assert max_rel(normed, rms_norm(x + res, w, 1e-5)) < 2e-3


@pytest.mark.parametrize("head_dim,heads", [(128, 40), (64, 4), (64, 5)])
def test_rotary_in_place_on_strided_views(head_dim: int, heads: int) -> None:
    from engine.model import triton_fused

    rot = RotaryEmbedding(head_dim, 4096, 10000.0, torch.device("cuda"))
    t, size = 17, heads * head_dim
    qkv = torch.randn((t, 3 * size), device="cuda").half()  # q, k, v side by side
    q, k, v = (p.view(t, heads, head_dim) for p in qkv.split([size, size, size], dim=1))
    positions = torch.randint(0, 4096, (t,), device="cuda")
    want_q, want_k, v_before = rot.apply(q, positions), rot.apply(k, positions), v.clone()
    triton_fused.rotary_(q, k, positions, rot.cos, rot.sin)
    assert max_rel(q, want_q) < 2e-3 and max_rel(k, want_k) < 2e-3
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("kv_heads", [40, 8, 10, 5])
def test_rotary_writes_the_cache_like_write_kv(kv_heads: int) -> None:
    from engine.model import triton_fused
    from engine.model.attention.torch_ref import write_kv

    heads, dim, t = 40, 128, 9
    rot = RotaryEmbedding(dim, 4096, 10000.0, torch.device("cuda"))
    qkv = torch.randn((t, (heads + 2 * kv_heads) * dim), device="cuda").half()
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    q, k, v = q.view(t, heads, dim), k.view(t, kv_heads, dim), v.view(t, kv_heads, dim)
    positions = torch.randint(0, 4096, (t,), device="cuda")
    k_cache = torch.randn((8, 16, kv_heads, dim), device="cuda").half()
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(128, device="cuda")[:t]
    q1, k1, want_kc, want_vc = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    triton_fused.rotary_(q1, k1, positions, rot.cos, rot.sin)
    write_kv(k1, v, want_kc, want_vc, slots)
    triton_fused.rotary_write_kv_(q, k, v, positions, rot.cos, rot.sin, k_cache, v_cache, slots)
    assert torch.equal(q, q1) and torch.equal(k, k1)
    assert torch.equal(k_cache, want_kc) and torch.equal(v_cache, want_vc)
    # Into contiguous outputs instead (the step graphs' buffers): q/k/v keep their values.
    src = torch.randn_like(qkv)
    before = src.clone()
    sq, sk, sv = src.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    sq, sk, sv = sq.view(t, heads, dim), sk.view(t, kv_heads, dim), sv.view(t, kv_heads, dim)
    want_q, want_k = sq.clone(), sk.clone()
    triton_fused.rotary_(want_q, want_k, positions, rot.cos, rot.sin)
    out = (torch.empty_like(want_q), torch.empty_like(want_k), torch.empty_like(want_k))
    triton_fused.rotary_write_kv_(sq, sk, sv, positions, rot.cos, rot.sin, k_cache, v_cache,
                                  slots, out)
    assert torch.equal(src, before)
    assert torch.equal(out[0], want_q) and torch.equal(out[1], want_k)
    assert torch.equal(out[2], sv)
    assert torch.equal(k_cache.view(-1, kv_heads, dim)[slots], want_k)
    assert torch.equal(v_cache.view(-1, kv_heads, dim)[slots], sv)


def test_silu_mul() -> None:
    from engine.model import triton_fused

    gate_up = torch.randn((9, 2 * 13824), device="cuda").half()
    gate, up = gate_up.chunk(2, dim=1)
    assert max_rel(triton_fused.silu_mul(gate_up), torch.nn.functional.silu(gate) * up) < 2e-3
