"""Triton paged attention and the CUDA attention backend against float64 / torch references."""

from __future__ import annotations

import pytest
import torch

from engine.model.attention.base import AttentionMetadata

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

NUM_BLOCKS = 512


def random_cache(gen: torch.Generator, block_size: int, num_kv_heads: int, head_dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=gen, device="cuda").half(),
            torch.randn(shape, generator=gen, device="cuda").half())


def random_block_tables(gen: torch.Generator, seq_lens: list[int], block_size: int
                        ) -> torch.Tensor:
    """Distinct random blocks per sequence; the padding past each table's end is random too
    (a kernel must never read it)."""
    width = max(-(-n // block_size) for n in seq_lens)
    perm = torch.randperm(NUM_BLOCKS, generator=gen, device="cuda").int()
    tables = torch.randint(0, NUM_BLOCKS, (len(seq_lens), width), generator=gen, device="cuda",
                           dtype=torch.int32)
    used = 0
    for i, n in enumerate(seq_lens):
        blocks = -(-n // block_size)
        tables[i, :blocks] = perm[used:used + blocks]
        used += blocks
    return tables


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(40, 40, 128), (8, 8, 64),
                                                             (8, 2, 64)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_parts", [1, 4, None])
def test_paged_decode(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                      num_parts: int | None) -> None:
    from engine.model.attention.triton_paged import (
        decode_num_parts,
        paged_decode,
        reference_paged_attention,
    )

    gen = torch.Generator(device="cuda").manual_seed(num_heads * block_size + head_dim)
    seq_lens = [1, 2, 15, 16, 17, 63, 64, 65, 300, 1000, 2049]
    k_cache, v_cache = random_cache(gen, block_size, num_kv_heads, head_dim)
    tables = random_block_tables(gen, seq_lens, block_size)
    q = torch.randn((len(seq_lens), num_heads, head_dim), generator=gen, device="cuda").half()
    parts = num_parts or decode_num_parts(len(seq_lens), num_heads, max(seq_lens), 132)
    out = torch.full_like(q, float("nan"))
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    paged_decode(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, parts, out=out)
    ref = reference_paged_attention(q, k_cache, v_cache, tables, seq_lens,
                                    list(range(len(seq_lens) + 1)), head_dim ** -0.5)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("head_dim", [128, 64])
def test_paged_prefill_with_context(head_dim: int) -> None:
    from engine.model.attention.triton_paged import paged_prefill, reference_paged_attention

    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    num_heads, num_kv_heads, block_size = 8, 4, 16
    q_lens = [1, 37, 128, 5, 200, 1]
    seq_lens = [90, 37, 700, 5, 233, 1]  # cached context = seq_len - q_len
    k_cache, v_cache = random_cache(gen, block_size, num_kv_heads, head_dim)
    tables = random_block_tables(gen, seq_lens, block_size)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn((starts[-1], num_heads, head_dim), generator=gen, device="cuda").half()
    out = torch.full_like(q, float("nan"))
    paged_prefill(q, k_cache, v_cache, tables,
                  torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                  torch.tensor(starts, dtype=torch.int32, device="cuda"), max(q_lens),
                  head_dim ** -0.5, out)
    ref = reference_paged_attention(q, k_cache, v_cache, tables, seq_lens, starts,
                                    head_dim ** -0.5)
    assert rel_err(out, ref) < 2e-3


def _step_metadata(gen: torch.Generator, q_lens: list[int], seq_lens: list[int],
                   block_size: int) -> AttentionMetadata:
    tables = random_block_tables(gen, seq_lens, block_size)
    starts, slots = [0], []
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        starts.append(starts[-1] + q_len)
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)

    def dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device="cuda")

    return AttentionMetadata(
        slot_mapping=dev(slots, torch.int64), query_start_loc=dev(starts, torch.int32),
        seq_lens=dev(seq_lens, torch.int32), block_tables=tables, max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), num_seqs=len(q_lens),
        decode_only=all(n == 1 for n in q_lens), query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens)


@pytest.mark.parametrize("q_lens,seq_lens", [
    ([1, 1, 1, 1], [7, 100, 513, 1]),  # decode only
    ([64, 300], [64, 300]),  # fresh prompts only (SDPA)
    ([1, 1, 64, 20, 300], [50, 9, 64, 120, 300]),  # mixed: decodes, a chunk, fresh prompts
])
@pytest.mark.parametrize("max_sdpa_prompts", [8, 0])
def test_backend_matches_torch_reference(q_lens: list[int], seq_lens: list[int],
                                         max_sdpa_prompts: int) -> None:
    from engine.model.attention.cuda import CudaAttentionBackend
    from engine.model.attention.torch_ref import TorchAttentionBackend

    gen = torch.Generator(device="cuda").manual_seed(sum(seq_lens) + max_sdpa_prompts)
    num_heads, num_kv_heads, head_dim, block_size = 40, 40, 128, 16
    meta = _step_metadata(gen, q_lens, seq_lens, block_size)
    k_cache, v_cache = random_cache(gen, block_size, num_kv_heads, head_dim)
    t = sum(q_lens)
    q = torch.randn((t, num_heads, head_dim), generator=gen, device="cuda").half()
    k = torch.randn((t, num_kv_heads, head_dim), generator=gen, device="cuda").half()
    v = torch.randn((t, num_kv_heads, head_dim), generator=gen, device="cuda").half()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out = CudaAttentionBackend(max_sdpa_prompts).forward(q, k, v, k_cache, v_cache, meta, 0.1)
    ref = TorchAttentionBackend().forward(q, k, v, k_ref, v_ref, meta, 0.1)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert rel_err(out, ref) < 2e-3


def test_decode_replays_in_a_cuda_graph() -> None:
    """Captured once, the decode step follows new lengths and tables written into its static
    inputs: nothing in it was baked in on the host."""
    from engine.model.attention.triton_paged import paged_decode, reference_paged_attention

    gen = torch.Generator(device="cuda").manual_seed(11)
    num_heads, head_dim, block_size, batch = 40, 128, 16, 8
    k_cache, v_cache = random_cache(gen, block_size, num_heads, head_dim)
    q = torch.randn((batch, num_heads, head_dim), generator=gen, device="cuda").half()
    lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    tables = torch.zeros((batch, 4096 // block_size), dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    paged_decode(q, k_cache, v_cache, tables, lens, 0.1, 8, out=out)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(q, k_cache, v_cache, tables, lens, 0.1, 8, out=out)
    for seq_lens in ([5, 17, 1, 900, 64, 65, 2000, 3], [4096, 1, 2, 3, 4, 5, 6, 7]):
        new_tables = random_block_tables(gen, seq_lens, block_size)
        tables.zero_()
        tables[:, :new_tables.shape[1]] = new_tables
        lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        ref = reference_paged_attention(q, k_cache, v_cache, tables, seq_lens,
                                        list(range(batch + 1)), 0.1)
        assert rel_err(out, ref) < 2e-3
