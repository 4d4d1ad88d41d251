"""Run under TRITON_INTERPRET=1 (tests/test_triton_interpreter.py): the paged decode kernel
against the float64 reference on the CPU, with and without split contexts and grouped heads;
the attention backend's warm-up launches on the same caches."""

from __future__ import annotations

import sys

import torch

from engine.model.attention.cuda import CudaAttentionBackend
from engine.model.attention.triton_paged import paged_decode, reference_paged_attention


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    num_blocks = 64
    for heads, kv_heads, dim, block in [(8, 8, 64, 16), (8, 2, 64, 16), (4, 4, 128, 32)]:
        seq_lens = [1, 2, 15, 17, 64, 65, 300]
        k_cache = torch.randn((num_blocks, block, kv_heads, dim), generator=gen).half()
        v_cache = torch.randn_like(k_cache)
        width = max(-(-n // block) for n in seq_lens)
        perm = torch.randperm(num_blocks, generator=gen).int()
        tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen,
                               dtype=torch.int32)
        used = 0
        for i, n in enumerate(seq_lens):
            b = -(-n // block)
            tables[i, :b] = perm[used:used + b]
            used += b
        q = torch.randn((len(seq_lens), heads, dim), generator=gen).half()
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        ref = reference_paged_attention(q, k_cache, v_cache, tables, seq_lens,
                                        list(range(len(seq_lens) + 1)), dim ** -0.5)
        for parts in (1, 4):
            out = torch.full_like(q, float("nan"))
            paged_decode(q, k_cache, v_cache, tables, lens, dim ** -0.5, parts, out=out)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if not err < 2e-3:
                print(f"FAIL heads={heads}/{kv_heads} dim={dim} parts={parts}: {err}")
                return 1
        # The backend's warm-up launches every prefill variant on these caches; it must run
        # and leave the caches as they were (it only reads them).
        k_before, v_before = k_cache.clone(), v_cache.clone()
        CudaAttentionBackend().warm_up(k_cache, v_cache, heads)
        if not (torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)):
            print(f"FAIL warm-up heads={heads}/{kv_heads} dim={dim}: wrote the cache")
            return 1
        print(f"ok heads={heads}/{kv_heads} dim={dim} block={block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
