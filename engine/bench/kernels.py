"""Kernel-level measurements on the card: copy bandwidth, the exllama crossover per 13B layer
shape, paged decode attention and SDPA prefill. Each figure is printed with the card's name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from engine.bench.ceiling import copy_bandwidth_gbps
from engine.bench.layers import random_gptq_layer
from engine.bench.table import Row

SHAPES_13B = ((5120, 5120), (5120, 13824), (13824, 5120))


def time_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Median of ``reps`` event-timed calls after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def linear_rows(token_counts: tuple[int, ...]) -> list[Row]:
    from engine.model.linear.exllama import ExllamaLinearBackend, measure_crossover

    rows: list[Row] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    backend = ExllamaLinearBackend(torch.device("cuda"), crossover=1 << 30)
    for k, n in SHAPES_13B:
        # Eight layers of the shape so successive calls stream from memory, not L2.
        layers = [backend.make(random_gptq_layer(k, n, 4, 128, True, gen)[0]) for _ in range(8)]
        for keep in (True, False):
            xo = measure_crossover(layers, max(token_counts), keep_dense=keep)  # type: ignore[arg-type]
            dense = "fp16 kept" if keep else "reconstructed"
            for t, q4_ms, dense_ms in xo.timings:
                if t not in token_counts:
                    continue
                if keep:
                    rows.append(Row(f"{k}x{n} T={t} 4-bit kernel", q4_ms * 1e3, "us"))
                rows.append(Row(f"{k}x{n} T={t} dense ({dense})", dense_ms * 1e3, "us"))
            rows.append(Row(f"{k}x{n} crossover, dense {dense}", xo.tokens, "tokens"))
        q4_1 = next(q for t, q, _ in xo.timings if t == 1)
        rows.append(Row(f"{k}x{n} T=1 4-bit weight stream", k * n / 2 / (q4_1 * 1e-3) / 1e9,
                        "GB/s"))
        for layer in layers:
            layer.free()  # type: ignore[attr-defined]
    return rows


def decode_attention_ms(batch: int, context: int, heads: int = 40, dim: int = 128,
                        block: int = 16) -> tuple[float, int]:
    """One layer's paged decode over ``batch`` sequences of ``context`` tokens -> (ms, parts)."""
    from engine.model.attention.triton_paged import decode_num_parts, paged_decode

    blocks_per_seq = -(-context // block)
    # A pool four times the touched blocks, tables shuffled over it, as in a busy cache.
    num_blocks = 4 * batch * blocks_per_seq
    k_cache = torch.randn((num_blocks, block, heads, dim), device="cuda").half()
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda")[:batch * blocks_per_seq]
    tables = tables.view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn((batch, heads, dim), device="cuda").half()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    parts = decode_num_parts(batch, heads, context, num_sms)
    return time_ms(lambda: paged_decode(q, k_cache, v_cache, tables, lens, 0.1, parts)), parts


def attention_rows(context: int, batch_sizes: tuple[int, ...]) -> list[Row]:
    from engine.model.attention.cuda import causal_sdpa

    heads, dim = 40, 128
    rows: list[Row] = []
    for batch in batch_sizes:
        ms, parts = decode_attention_ms(batch, context, heads, dim)
        kv_bytes = 2 * batch * context * heads * dim * 2
        rows.append(Row(f"decode attn B={batch} ctx={context} (parts={parts})", ms * 1e3, "us"))
        rows.append(Row(f"decode attn B={batch} ctx={context} KV read", kv_bytes / ms / 1e6,
                        "GB/s"))
    for length in (512, 2048):
        q = torch.randn((length, heads, dim), device="cuda").half()
        k, v = torch.randn_like(q), torch.randn_like(q)
        ms = time_ms(lambda q=q, k=k, v=v: causal_sdpa(q, k, v, 0.1))
        rows.append(Row(f"prefill SDPA L={length} (one layer)", ms * 1e3, "us"))
    return rows


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512",
                   help="token counts shown for the linear layers")
    p.add_argument("--context", type=int, default=768, help="context length for decode attention")


def run(args: argparse.Namespace) -> list[Row]:
    tokens = tuple(int(t) for t in args.tokens.split(","))
    rows = [Row("device-to-device copy", copy_bandwidth_gbps(), "GB/s")]
    rows += linear_rows(tokens)
    rows += attention_rows(args.context, (1, 8, 32, 64))
    return rows
