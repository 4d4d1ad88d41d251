"""Device run: check the Triton GPTQ kernel on the GPU, then time its tile configurations at
Llama-2-13B's layer shapes against cuBLAS on dense fp16 weights, dequantise-then-cuBLAS and
(once its extension is built) exllamav2's 4-bit kernel; and the two paged-decode attention
kernels. Writes every timing to $OUT/sweep.json and prints the best configuration per shape and
token count last. (The attention rows come from ``attention_rows``, not called by default.) Usage (repo root, device machine): python3 tools/gpu/w4a16_sweep.py
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

sys.path.insert(0, os.getcwd())
from engine.bench.ceiling import copy_bandwidth_gbps  # noqa: E402
from engine.bench.layers import random_gptq_layer  # noqa: E402
from engine.model.linear.gptq_triton import (  # noqa: E402
    KernelConfig,
    SplitKWorkspace,
    dequantize_into,
    gemm_columns,
    gptq_matmul,
    kernel_input,
    pack_for_triton,
)


def matmul(x, w, cfg, ws):
    """The kernel on activations in the order it reads them (as TritonLinear.run does)."""
    return gptq_matmul(kernel_input(x, w, gemm_columns(w), cfg.block_m == 1), w, cfg, ws)

OUT = Path(os.environ.get("OUT", "/tmp/out"))
T0 = time.time()
BUDGET_S = float(os.environ.get("SWEEP_BUDGET_S", "420"))
SHAPES = ((5120, 15360), (5120, 5120), (5120, 27648), (13824, 5120))  # (in, out): qkv, o, gu, d
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count
results: dict[str, object] = {"card": torch.cuda.get_device_name(0), "rows": []}


def log(*a: object) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save() -> None:
    (OUT / "sweep.json").write_text(json.dumps(results, indent=0))


def graph_time_us(fn, reps: int = 30) -> float:
    """Median replay time of a CUDA graph of ``fn`` (which runs 8 layers) per layer call."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[reps // 2] * 1e3 / 8


def splits_for(n: int, m: int, block_n: int, block_m: int, count: int = 2) -> list[int]:
    """Powers of two from the split that gives every SM about two programs, upwards."""
    tiles = triton.cdiv(n, block_n) * max(1, triton.cdiv(m, max(block_m, 1)))
    want = max(1, 2 * NUM_SMS // tiles)
    lo = 1 << (want.bit_length() - 1)
    return sorted({min(lo << i, 16) for i in range(count)})


def candidates(m: int, n: int, k: int, group: int, lite: bool = False) -> list[KernelConfig]:
    """Configurations to time at m tokens (every field is a compile-time constant)."""
    out: list[KernelConfig] = []
    if m == 1:
        tiles = [(128, 4), (256, 4)] if lite else [(64, 2), (128, 2), (128, 4), (256, 4),
                                                   (256, 8), (512, 8)]
        for (bn, warps), stages in itertools.product(tiles, (1,) if lite else (1, 3)):
            for split in splits_for(n, 1, bn, 1, 3):
                out.append(KernelConfig(bn, 1, split, warps, stages))
    elif m <= 16:
        tiles = [(128, 4)] if lite else [(64, 4), (128, 4), (128, 8), (256, 8)]
        for (bn, warps), stages in itertools.product(tiles, (2, 4)):
            for split in splits_for(n, m, bn, 16, 3):
                out.append(KernelConfig(bn, 16, split, warps, stages))
    elif m <= 64:
        bm = triton.next_power_of_2(m)
        for bn, warps in ([(128, 4)] if lite else [(64, 4), (128, 4), (128, 8)]):
            for split in splits_for(n, m, bn, bm, 3):
                for stages in ((3,) if lite else (2, 3)):
                    out.append(KernelConfig(bn, bm, split, warps, stages))
    else:
        shapes = [(128, 128, 8, 3)] if lite else [(64, 128, 4, 3), (128, 128, 8, 3),
                                                  (128, 128, 4, 4), (128, 256, 8, 3),
                                                  (64, 256, 8, 3)]
        for bm, bn, warps, stages in shapes:
            out.append(KernelConfig(bn, bm, 1, warps, stages))
    return out


def fixed_config(m: int, n: int, k: int, group: int) -> KernelConfig:
    """One configuration per token range, for the correctness checks (fewer compiles)."""
    if m == 1:
        return KernelConfig(128, 1, 4, 4, 1)
    if m <= 16:
        return KernelConfig(128, 16, 4, 4, 2)
    if m <= 64:
        return KernelConfig(128, triton.next_power_of_2(m), 2, 4, 3)
    return KernelConfig(128, 128, 1, 8, 3)


def check_correctness() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = SplitKWorkspace(16 << 20, 1 << 16, torch.device("cuda"))
    rows = []
    for bits, group, act in CORRECTNESS_LAYOUTS:
        w, ref = random_gptq_layer(5120, 13824, bits, group, act, gen)
        tw = pack_for_triton(w, torch.device("cuda"))
        worst = 0.0
        for m in CORRECTNESS_TOKENS:
            x = torch.randn((m, 5120), generator=gen, device="cuda").half()
            r = x.float() @ ref.t()
            for cfg in (fixed_config(m, 13824, 5120, group or 5120),):
                out = matmul(x, tw, cfg, ws)
                err = ((out.float() - r).norm() / r.norm()).item()
                worst = max(worst, err)
                if cfg.split_k > 1:
                    assert torch.equal(out, matmul(x, tw, cfg, ws)), "split-K not deterministic"
        assert int(ws.counters.abs().sum()) == 0, "counters not reset"
        dense = torch.empty((5120, 13824), dtype=torch.float16, device="cuda")
        dequantize_into(tw, dense)
        full = dense if tw.perm is None else torch.empty_like(dense).index_copy_(
            0, tw.perm.long(), dense)  # dequantize_into writes rows in sorted order
        derr = ((full.float().t() - ref).norm() / ref.norm()).item()
        rows.append((bits, group, act, worst, derr, tw.nbytes / sum(
            t.numel() * t.element_size() for t in (w.qweight, w.qzeros, w.scales, w.g_idx))))
        log(f"correct bits={bits} g={group} act={act}: gemm max rel {worst:.2e}, dequant "
            f"{derr:.2e}, bytes vs checkpoint {rows[-1][-1]:.3f}")
        assert worst < 3e-3 and derr < 1e-3
    results["correctness"] = rows
    save()


def layer_pool(k: int, n: int, bits: int, group: int | None, act: bool, count: int = 8):
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    pool = []
    for _ in range(count):
        w, _ = random_gptq_layer(k, n, bits, group, act, gen)
        pool.append((w, pack_for_triton(w, torch.device("cuda"))))
    return pool


def sweep_shape(k: int, n: int, bits: int, group: int, act: bool, tokens: tuple[int, ...],
                ws: SplitKWorkspace, tag: str, lite: bool = False) -> None:
    pool = layer_pool(k, n, bits, group, act)
    tws = [t for _, t in pool]
    dense = [torch.randn((n, k), device="cuda").half() for _ in range(2)]
    scratch = torch.empty((k, n), dtype=torch.float16, device="cuda")
    for m in tokens:
        if time.time() - T0 > BUDGET_S:
            log("budget reached; skipping", tag, m)
            return
        x = torch.randn((m, k), device="cuda").half()
        best = None
        for cfg in candidates(m, n, k, group, lite):
            try:
                us = graph_time_us(lambda cfg=cfg: [matmul(x, t, cfg, ws) for t in tws])
            except Exception as e:  # a config the card cannot take (shared memory, registers)
                log("config failed", cfg, type(e).__name__, str(e)[:80])
                continue
            results["rows"].append({"tag": tag, "k": k, "n": n, "m": m, "cfg": cfg.__dict__,
                                    "us": us})
            if best is None or us < best[0]:
                best = (us, cfg)
        fp16_us = graph_time_us(lambda: [torch.mm(x, dense[i % 2].t()) for i in range(8)])
        scratch_us = graph_time_us(lambda: [torch.mm(x, dequantize_into(t, scratch))
                                            for t in tws])
        assert best is not None
        gbps = tws[0].nbytes / (best[0] * 1e-6) / 1e9
        results["rows"].append({"tag": tag + "-best", "k": k, "n": n, "m": m,
                                "cfg": best[1].__dict__, "us": best[0], "fp16_us": fp16_us,
                                "scratch_us": scratch_us, "gbps": gbps})
        log(f"{tag} {k}x{n} M={m}: triton {best[0]:.1f} us ({gbps:.0f} GB/s) {best[1]} | "
            f"fp16 {fp16_us:.1f} | dequant+mm {scratch_us:.1f}")
        save()


def act_order_cost(ws: SplitKWorkspace) -> None:
    """What act-order costs the shipped path: the activation gather in front of the kernel."""
    pools = {act: [t for _, t in layer_pool(5120, 27648, 4, 128, act)] for act in (False, True)}
    for m in (1, 16, 64, 512):
        cfg = next(r["cfg"] for r in reversed(results["rows"])  # type: ignore[index]
                   if r["tag"] == "q4g128-best" and r["k"] == 5120 and r["n"] == 27648
                   and r["m"] == m)
        cfg = KernelConfig(**cfg)
        x = torch.randn((m, 5120), device="cuda").half()
        plain = graph_time_us(lambda: [matmul(x, t, cfg, ws) for t in pools[False]])
        act = graph_time_us(lambda: [matmul(x, t, cfg, ws) for t in pools[True]])
        results["rows"].append({"tag": "act-order", "m": m, "plain": plain, "act_order": act})
        log(f"act-order 5120x27648 M={m}: plain {plain:.1f} act-order {act:.1f} us")
    save()


def exllama_rows(tokens: tuple[int, ...]) -> None:
    from engine.model.linear.exllama import ExllamaLinearBackend

    backend = ExllamaLinearBackend(torch.device("cuda"), crossover=1 << 30)
    for k, n in SHAPES:
        pool = layer_pool(k, n, 4, 128, False)
        layers = [backend.make(w) for w, _ in pool]
        for m in tokens:
            x = torch.randn((m, k), device="cuda").half()
            us = graph_time_us(lambda: [layer.forward_q4(x) for layer in layers])
            results["rows"].append({"tag": "exllama", "k": k, "n": n, "m": m, "us": us})
            log(f"exllama {k}x{n} M={m}: {us:.1f} us")
        for layer in layers:
            layer.free()
    save()


def attention_rows() -> None:
    from engine.model.attention.triton_paged import decode_num_parts, paged_decode

    heads, dim, block = 40, 128, 16
    for batch, ctx in ((1, 640), (8, 640), (32, 640), (64, 640), (128, 640), (32, 2048)):
        blocks_per_seq = -(-ctx // block)
        # Eight caches for small batches (a step's 40 layers never share one, so timing one
        # cache eight times over would read it from L2); one big pool otherwise.
        num_caches = 8 if batch <= 8 else 1
        num_blocks = 2 * batch * blocks_per_seq
        caches = [(torch.randn((num_blocks, block, heads, dim), device="cuda").half(),
                   torch.randn((num_blocks, block, heads, dim), device="cuda").half())
                  for _ in range(num_caches)]
        tables = torch.randperm(num_blocks, device="cuda")[:batch * blocks_per_seq]
        tables = tables.view(batch, blocks_per_seq).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn((batch, heads, dim), device="cuda").half()
        parts_auto = decode_num_parts(batch, heads, 2048, NUM_SMS)
        kv_bytes = 2 * batch * ctx * heads * dim * 2
        for variant, stages, parts in itertools.product(("simple", "dot"), (2, 3, 4),
                                                          sorted({parts_auto, 1, 2, 4, 8})):
            if variant == "simple" and stages != 3:
                continue

            def step(variant=variant, stages=stages, parts=parts):
                return [paged_decode(q, caches[i % num_caches][0], caches[i % num_caches][1],
                                     tables, lens, 0.1, parts, variant=variant,
                                     num_stages=stages) for i in range(8)]

            try:
                us = graph_time_us(step)
            except Exception as e:
                log("attention failed", variant, stages, parts, str(e)[:80])
                continue
            results["rows"].append({"tag": "attn", "batch": batch, "ctx": ctx,
                                    "variant": variant, "stages": stages, "parts": parts,
                                    "us": us, "gbps": kv_bytes / (us * 1e-6) / 1e9})
            log(f"attn B={batch} ctx={ctx} {variant} stages={stages} parts={parts}"
                f"{' (auto)' if parts == parts_auto else ''}: {us:.1f} us "
                f"{kv_bytes / (us * 1e-6) / 1e9:.0f} GB/s")
        caches.clear()
        torch.cuda.empty_cache()
    save()


CORRECTNESS_LAYOUTS = ((4, 128, False), (4, 32, True), (4, 64, True), (4, 128, True),
                       (8, 128, True), (8, 64, True), (8, 128, False), (8, None, True))
CORRECTNESS_TOKENS = (1, 2, 3, 7, 8, 15, 16, 33, 64, 128, 256, 1000)
EIGHT_BIT_TOKENS = (1, 8, 32, 64, 256)


def compile_jobs() -> list[tuple]:
    """Every (in, out, bits, group, act-order, tokens, config) the run will launch, so that
    worker processes can compile them all in parallel first (Triton caches them on disk)."""
    jobs = []
    for bits, group, act in CORRECTNESS_LAYOUTS:
        for m in CORRECTNESS_TOKENS:
            jobs.append((5120, 13824, bits, group, act, m, fixed_config(m, 13824, 5120,
                                                                        group or 5120)))
    for k, n in SHAPES:
        for m in TOKENS:
            jobs += [(k, n, 4, 128, False, m, c) for c in candidates(m, n, k, 128)]
    for k, n in ((5120, 27648), (13824, 5120)):
        for m in EIGHT_BIT_TOKENS:
            jobs += [(k, n, 8, 128, False, m, c) for c in candidates(m, n, k, 128, lite=True)]
    return jobs


def _compile_worker(jobs: list[tuple]) -> int:
    ws = SplitKWorkspace(64 << 20, 1 << 16, torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(1)
    layers: dict[tuple, object] = {}
    done = 0
    for k, n, bits, group, act, m, cfg in jobs:
        key = (k, n, bits, group, act)
        if key not in layers:
            layers[key] = pack_for_triton(random_gptq_layer(k, n, bits, group, act, gen)[0],
                                          torch.device("cuda"))
        tw = layers[key]
        x = torch.randn((m, k), device="cuda").half()
        try:
            matmul(x, tw, cfg, ws)
            done += 1
        except Exception:
            pass
    torch.cuda.synchronize()
    return done


def prewarm(workers: int = 14) -> None:
    import multiprocessing as mp

    jobs = compile_jobs()
    # One job per distinct compiled variant (the timing runs reuse the cache).
    seen, unique = set(), []
    for j in jobs:
        sig = (j[2], j[3] or j[0], j[4], j[5] == 1, j[5] in (1,) or j[5] % 16 == 0, j[6])
        if sig not in seen:
            seen.add(sig)
            unique.append(j)
    chunks = [unique[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        done = sum(pool.map(_compile_worker, chunks))
    log(f"prewarmed {done} of {len(unique)} kernel variants in {workers} processes")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results["copy_gbps"] = copy_bandwidth_gbps()
    log("copy bandwidth", results["copy_gbps"])
    prewarm()
    ws = SplitKWorkspace(64 << 20, 1 << 16, torch.device("cuda"))
    steps = [("correctness", check_correctness)]
    for k, n in SHAPES:
        steps.append((f"sweep {k}x{n}", lambda k=k, n=n: sweep_shape(k, n, 4, 128, False,
                                                                      TOKENS, ws, "q4g128")))
    steps.append(("act-order", lambda: act_order_cost(ws)))
    for k, n in ((5120, 27648), (13824, 5120)):
        steps.append((f"8-bit {k}x{n}", lambda k=k, n=n: sweep_shape(
            k, n, 8, 128, False, EIGHT_BIT_TOKENS, ws, "q8g128", lite=True)))
    for name, fn in steps:
        try:
            fn()
        except Exception:
            log("step failed:", name)
            traceback.print_exc()
    if Path("/tmp/ext/exllamav2_ext.so").exists():
        try:
            exllama_rows((1, 2, 4, 8, 16, 32, 64, 128, 512))
        except Exception:
            traceback.print_exc()
    save()
    summary()


def summary() -> None:
    rows = results["rows"]  # type: ignore[assignment]
    ex = {(r["k"], r["n"], r["m"]): r["us"] for r in rows if r["tag"] == "exllama"}
    print("\n## best Triton config per shape and token count "
          f"({results['card']}, copy {results['copy_gbps']:.0f} GB/s)")
    print("shape        M  triton_us  GB/s  fp16_us  deq+mm_us  exllama_us  config")
    for r in rows:
        if not r["tag"].endswith("-best"):
            continue
        c = r["cfg"]
        e = ex.get((r["k"], r["n"], r["m"]))
        print(f"{r['tag'][:6]} {r['k']}x{r['n']:<6} {r['m']:>4} {r['us']:9.1f} {r['gbps']:5.0f} "
              f"{r['fp16_us']:8.1f} {r['scratch_us']:9.1f} {e if e is None else round(e, 1)!s:>10}"
              f"  bn{c['block_n']} bm{c['block_m']} s{c['split_k']} w{c['num_warps']} "
              f"st{c['num_stages']}")
    best_attn: dict[tuple[int, int, str], dict] = {}
    for r in rows:
        if r["tag"] == "attn":
            key = (r["batch"], r["ctx"], r["variant"])
            if key not in best_attn or r["us"] < best_attn[key]["us"]:
                best_attn[key] = r
    print("\n## paged decode attention, one layer (best per variant)")
    for (b, ctx, v), r in sorted(best_attn.items()):
        print(f"B={b:<4} ctx={ctx:<5} {v:<7} {r['us']:8.1f} us {r['gbps']:6.0f} GB/s "
              f"stages={r['stages']} parts={r['parts']}")


if __name__ == "__main__":
    main()
