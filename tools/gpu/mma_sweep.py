"""Device run: the w4a16 tensor-core kernel (engine/model/linear/mma.py) checked against the
float32 reference for every 4-bit branch layout and the token counts of the kernel tests, then
timed at Llama-2-13B's layer shapes per K split beside exllamav2's kernel, the best of the
Triton kernels' plan candidates, cuBLAS on dense fp16 weights and the kernel's own
dequantise-then-cuBLAS, in one process (CUDA-graph replays over 8 layers, as the plan times
them). Writes $OUT/mma_sweep.json; prints a table last.
Usage (repo root, device machine, after tools/gpu/setup.sh): python3 tools/gpu/mma_sweep.py
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "tools", "gpu"))
from engine.bench.ceiling import copy_bandwidth_gbps  # noqa: E402
from engine.bench.layers import random_gptq_layer  # noqa: E402
from engine.model.linear import mma  # noqa: E402
from engine.model.linear.gptq_triton import SplitKWorkspace, dequantize_into  # noqa: E402
from engine.model.linear.plan import Path as PlanPath, PathKind, triton_candidates  # noqa: E402,I001
from engine.model.linear.triton_backend import MmaLinear, TritonLinear  # noqa: E402
from w4a16_sweep import graph_time_us  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/out"))
T0 = time.time()
SHAPES = ((5120, 15360), (5120, 5120), (5120, 27648), (13824, 5120))  # (in, out): qkv, o, gu, d
if os.environ.get("SHAPES"):  # e.g. SHAPES=5120x27648,13824x5120
    SHAPES = tuple(tuple(int(d) for d in s.split("x")) for s in os.environ["SHAPES"].split(","))
TOKENS = tuple(int(t) for t in os.environ.get("TOKENS", "1,2,4,8,16,32,64,128,256").split(","))
SMS = torch.cuda.get_device_properties(0).multi_processor_count
DEV = torch.device("cuda")
results: dict[str, object] = {"card": torch.cuda.get_device_name(0), "rows": []}
LAYOUTS = ((128, False), (128, True), (32, True), (32, False), (64, True), (None, True),
           (None, False))
CHECK_TOKENS = (1, 2, 3, 7, 8, 15, 16, 33, 64, 128, 256, 1000)


def log(*a: object) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save() -> None:
    (OUT / "mma_sweep.json").write_text(json.dumps(results, indent=0))


def check() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = SplitKWorkspace(64 << 20, 1 << 16, DEV)
    rows = []
    for group, act in LAYOUTS:
        w, ref = random_gptq_layer(5120, 13824, 4, group, act, gen)
        w.bias = (torch.randn(13824, generator=gen, device="cuda") * 0.1).half()
        layer = MmaLinear(w, DEV)
        layer.workspace = ws
        dense = torch.empty((5120, 13824), dtype=torch.float16, device="cuda")
        layer.dense = dense
        worst = 0.0
        for m in CHECK_TOKENS:
            x = torch.randn((m, 5120), generator=gen, device="cuda").half()
            r = x.float() @ ref.t() + w.bias.float()
            splits = [1, 4] if m <= mma.MAX_TOKENS else []
            wg = mma.WGMMA_BLOCKS if m <= mma.MAX_TOKENS and mma.wgmma_available() else ()
            for path in [PlanPath(PathKind.MMA, split_k=s, block_n=bn, k_warps=kw)
                         for s in splits for bn, kw in mma.GEOMETRIES] + [
                    PlanPath(PathKind.WGMMA, split_k=s, block_n=bn)
                    for s in splits for bn in wg] + [
                    PlanPath(PathKind.WGMMA, block_n=bn, stream_k=g) for bn in wg
                    for g in mma.wgmma_stream_k_candidates(m, layer.w, SMS, bn)
                    if m >= mma.WGMMA_MIN_TOKENS] + [PlanPath(PathKind.DENSE)]:
                out = layer.run(path, x)
                err = ((out.float() - r).norm() / r.norm()).item()
                worst = max(worst, err)
                if err > 3e-3:
                    log(f"FAIL group={group} act={act} m={m} {path.describe()}: {err:.2e}")
                if path.split_k > 1 or path.stream_k:
                    assert torch.equal(out, layer.run(path, x)), "split-K not deterministic"
        assert int(ws.counters.abs().sum()) == 0, "counters not reset"
        ratio = layer.nbytes / sum(t.numel() * t.element_size() for t in (
            w.qweight, w.qzeros, w.scales, w.g_idx, w.bias))
        rows.append((group, act, worst, ratio))
        log(f"correct g={group} act={act}: max rel {worst:.2e}, bytes vs checkpoint {ratio:.3f}")
    results["correctness"] = rows
    save()


def pools(k: int, n: int):
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    weights = [random_gptq_layer(k, n, 4, 128, False, gen)[0] for _ in range(8)]
    return weights


def sweep_shape(k: int, n: int, ws: SplitKWorkspace, ext) -> None:
    weights = pools(k, n)
    mlayers = [MmaLinear(w, DEV) for w in weights]
    tlayers = [TritonLinear(w, DEV, ext) for w in weights]
    scratch = torch.empty((k, n), dtype=torch.float16, device="cuda")
    for la in mlayers + tlayers:
        la.workspace = ws
        la.dense = scratch
    dense = [torch.randn((n, k), device="cuda").half() for _ in range(2)]
    # The dense path's dequantisation alone: ours per block width, the Triton backend's.
    if os.environ.get("DEQUANT", "1") == "1":
        deq = {f"mma{w}": graph_time_us(lambda w=w: [mma.dequantize_into(la.w, scratch, w)
                                                     for la in mlayers]) for w in (4, 8, 16)}
        deq["triton"] = graph_time_us(lambda: [dequantize_into(la.w, scratch) for la in tlayers])
        results.setdefault("dequant", []).append({"k": k, "n": n, **deq})  # type: ignore[union-attr]
        log("dequantise", k, n, deq)
    for m in TOKENS:
        x = torch.randn((m, k), device="cuda").half()
        row = {"k": k, "n": n, "m": m, "bytes": mlayers[0].w.nbytes, "mma": {}}
        for bn, kw in mma.GEOMETRIES if m <= mma.MAX_TOKENS else ():
            for s in mma.split_candidates(m, mlayers[0].w, SMS, bn):
                p = PlanPath(PathKind.MMA, split_k=s, block_n=bn, k_warps=kw)
                row["mma"][p.describe()[3:]] = graph_time_us(
                    lambda p=p: [la.run(p, x) for la in mlayers])
        row["wgmma"] = {}
        for bn in mma.WGMMA_BLOCKS if m <= mma.MAX_TOKENS and mma.wgmma_available() else ():
            paths = [PlanPath(PathKind.WGMMA, split_k=s, block_n=bn)
                     for s in mma.wgmma_split_candidates(m, mlayers[0].w, SMS, bn)]
            if m >= mma.WGMMA_MIN_TOKENS:
                paths += [PlanPath(PathKind.WGMMA, block_n=bn, stream_k=g)
                          for g in mma.wgmma_stream_k_candidates(m, mlayers[0].w, SMS, bn)]
            for p in paths:
                row["wgmma"][p.describe()[5:]] = graph_time_us(
                    lambda p=p: [la.run(p, x) for la in mlayers])
        p = PlanPath(PathKind.DENSE)
        row["mma_dense"] = graph_time_us(lambda: [la.run(p, x) for la in mlayers])
        best = None
        for cfg in triton_candidates(m, n, SMS) if os.environ.get("TRITON") == "1" else []:
            p = PlanPath(PathKind.TRITON, cfg)
            try:
                us = graph_time_us(lambda p=p: [la.run(p, x) for la in tlayers])
            except Exception as e:
                log("triton failed", cfg, str(e)[:80])
                continue
            best = us if best is None else min(best, us)
        row["triton"] = best
        if ext is not None and m <= 64:
            p = PlanPath(PathKind.EXLLAMA)
            row["exllama"] = graph_time_us(lambda: [la.run(p, x) for la in tlayers])
        row["fp16"] = graph_time_us(lambda: [torch.mm(x, dense[i % 2].t()) for i in range(8)])
        results["rows"].append(row)
        log(k, n, m, {key: v for key, v in row.items() if key not in ("k", "n", "m")})
        save()
    for la in tlayers:
        la.free()


def summary() -> None:
    print(f"\n## w4a16 per layer call, us ({results['card']}, copy {results['copy_gbps']:.0f} "
          "GB/s); GB/s = packed bytes / best mma time")
    print("shape          M  mma_best  geometry/split  GB/s  best_k1    wgmma  block/split  "
          "wg_nosk  exllama  triton   fp16  mma_deq+mm")
    for r in results["rows"]:  # type: ignore[union-attr]
        def f(v):
            return f"{v:7.1f}" if isinstance(v, float) else "      -"
        if r["mma"]:
            split, us = min(r["mma"].items(), key=lambda kv: kv[1])
            gbps = r["bytes"] / (us * 1e-6) / 1e9
            # the best of the geometries without K-sharing warps, for comparison
            k1 = min((v for key, v in r["mma"].items() if "k" not in key), default=None)
        else:
            split, us, gbps, k1 = "-", None, 0, None
        wsplit, wus = min(r["wgmma"].items(), key=lambda kv: kv[1]) if r.get("wgmma") \
            else ("-", None)
        # the best wgmma launch of one block a (tile, K split), for comparison with stream-K
        wk = min((v for key, v in r.get("wgmma", {}).items() if "sk" not in key), default=None)
        print(f"{r['k']:>5}x{r['n']:<6} {r['m']:>4} {f(us)} {split!s:>15} {gbps:5.0f} "
              f"{f(k1)} {f(wus)} {wsplit!s:>12} {f(wk)} {f(r.get('exllama'))} {f(r.get('triton'))} "
              f"{f(r['fp16'])} {f(r['mma_dense'])}")
    print("\n## dequantisation alone, us a layer (GB/s of fp16 written)")
    for d in results.get("dequant", []):  # type: ignore[union-attr]
        written = d["k"] * d["n"] * 2 / 1e3
        print(f"{d['k']:>5}x{d['n']:<6} " + "  ".join(
            f"{key} {d[key]:6.1f} ({written / d[key]:4.0f})" for key in ("mma4", "mma8", "mma16",
                                                                          "triton")))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    t = time.time()
    mma.load_ext()
    log(f"extension loaded/built in {time.time() - t:.0f} s")
    results["copy_gbps"] = copy_bandwidth_gbps()
    try:
        if os.environ.get("CHECK", "1") == "1":  # CHECK=0: the GPU tests ran just before
            check()
    except Exception:
        traceback.print_exc()
    ext = None
    if Path("/tmp/ext/exllamav2_ext.so").exists():
        from engine.model.linear.exllama import load_exllama_ext

        ext = load_exllama_ext()
    ws = SplitKWorkspace(64 << 20, 1 << 16, DEV)
    for k, n in SHAPES:
        try:
            sweep_shape(k, n, ws, ext)
        except Exception:
            traceback.print_exc()
    save()
    summary()


if __name__ == "__main__":
    main()
