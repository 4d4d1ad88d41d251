"""Run under TRITON_INTERPRET=1 (tests/test_triton_interpreter.py): the fused rotary kernel,
alone and with the K/V cache write, against RotaryEmbedding.apply and write_kv on the CPU, on
q/k/v as the strided column slices of one qkv product (as the model passes them)."""

from __future__ import annotations

import sys

import torch

from engine.model import triton_fused
from engine.model.attention.torch_ref import write_kv
from engine.model.layers import RotaryEmbedding


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, dim in [(8, 8, 64), (8, 2, 128)]:
        rot = RotaryEmbedding(dim, 512, 10000.0, torch.device("cpu"))
        t, q_size, kv_size = 5, heads * dim, kv_heads * dim
        qkv = torch.randn((t, q_size + 2 * kv_size), generator=gen).half()
        qkv0 = qkv.clone()
        positions = torch.randint(0, 512, (t,), generator=gen)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=1)
        q, k, v = q.view(t, heads, dim), k.view(t, kv_heads, dim), v.view(t, kv_heads, dim)
        want_q, want_k = rot.apply(q, positions), rot.apply(k, positions)
        k_cache = torch.randn((6, 4, kv_heads, dim), generator=gen).half()
        v_cache = torch.randn_like(k_cache)
        want_kc, want_vc = k_cache.clone(), v_cache.clone()
        slots = torch.randperm(24, generator=gen)[:t]
        v_before = v.clone()

        q1, k1 = q.clone(), k.clone()
        triton_fused.rotary_(q1, k1, positions, rot.cos, rot.sin)
        triton_fused.rotary_write_kv_(q, k, v, positions, rot.cos, rot.sin, k_cache, v_cache,
                                      slots)
        write_kv(k1, v_before, want_kc, want_vc, slots)  # the unfused path's cache writes
        # Into separate contiguous outputs (the step graphs' buffers): q/k/v stay as they were.
        src = qkv0.clone()
        sq, sk, sv = (part.view(t, h, dim) for part, h in zip(
            src.split([q_size, kv_size, kv_size], dim=1), (heads, kv_heads, kv_heads),
            strict=True))
        out = (torch.empty_like(q1), torch.empty_like(k1), torch.empty_like(k1))
        kc2, vc2 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        triton_fused.rotary_write_kv_(sq, sk, sv, positions, rot.cos, rot.sin, kc2, vc2, slots,
                                      out)
        checks = {
            "rotary q": max_rel(q1, want_q) < 2e-3, "rotary k": max_rel(k1, want_k) < 2e-3,
            "fused q": torch.equal(q, q1), "fused k": torch.equal(k, k1),
            "v untouched": torch.equal(v, v_before),
            # The written slots hold the rotated k and v, every other keeps its rows.
            "k cache": torch.equal(k_cache, want_kc), "v cache": torch.equal(v_cache, want_vc),
            "out q": torch.equal(out[0], q1), "out k": torch.equal(out[1], k1),
            "out v": torch.equal(out[2], v_before), "out leaves q/k/v": torch.equal(src, qkv0),
            "out k cache": torch.equal(kc2.view(-1, kv_heads, dim)[slots], k1),
            "out v cache": torch.equal(vc2.view(-1, kv_heads, dim)[slots], v_before),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            print(f"FAIL heads={heads}/{kv_heads} dim={dim}: {failed}")
            return 1
        print(f"ok heads={heads}/{kv_heads} dim={dim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
