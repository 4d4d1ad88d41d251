"""Device run: the w4a16 tensor-core kernel built with several pipeline geometries (inputs a
stage, stages in flight: the GPTQ_MMA_* macros of csrc/w4a16_mma.cuh), each as its own module,
compiled in parallel, then timed per layer shape and step size at its best block width and K
split (CUDA-graph replays over 8 layers, as the plan times them). Prints a table last.
Usage (repo root, device machine): VARIANTS="2x4 4x4 2x8" python3 tools/gpu/mma_variants.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "tools", "gpu"))
from engine.bench.layers import random_gptq_layer  # noqa: E402
from engine.model.linear import mma  # noqa: E402
from engine.model.linear.gptq_triton import SplitKWorkspace  # noqa: E402
from w4a16_sweep import graph_time_us  # noqa: E402

VARIANTS = os.environ.get("VARIANTS", "2x4 4x4 2x8 4x3 1x8").split()
SHAPES = ((5120, 15360), (5120, 27648), (13824, 5120))
TOKENS = tuple(int(t) for t in os.environ.get("TOKENS", "1,8,32,64,128").split(","))
CACHE = os.environ.get("GPTQ_KERNEL_CACHE", "/tmp/kcache")
T0 = time.time()

BUILD = """
import sys
from torch.utils.cpp_extension import load
from engine.model.linear import mma
name, chunks, stages, build, *flags = sys.argv[1:]
load(name=name, sources=mma.sources(), extra_include_paths=['{src}'],
     extra_cflags=['-O3'], extra_cuda_cflags=['-O3', '--expt-relaxed-constexpr',
     f'-DGPTQ_MMA_STAGE_CHUNKS={{chunks}}', f'-DGPTQ_MMA_STAGES={{stages}}', *flags],
     build_directory=build, verbose=False)
"""


def build_all() -> dict[str, object]:
    procs = {}
    for v in VARIANTS:
        chunks, stages, *flags = v.split("x")
        d = f"{CACHE}/v{v}"
        os.makedirs(d, exist_ok=True)
        env = dict(os.environ, MAX_JOBS="4")
        procs[v] = subprocess.Popen(
            [sys.executable, "-c", BUILD.format(src=mma.CSRC), f"mma_v{v}", chunks, stages, d,
             *[f"-DGPTQ_MMA_{f}" for f in flags]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    mods = {}
    for v, p in procs.items():
        out = p.communicate()[0].decode()
        if p.returncode:
            print(f"variant {v} failed to build:\n{out[-2000:]}")
            continue
        sys.path.insert(0, f"{CACHE}/v{v}")
        import importlib

        mods[v] = importlib.import_module(f"mma_v{v}")
    print(f"[{time.time() - T0:.0f}s] built {list(mods)}", flush=True)
    return mods


def main() -> None:
    mods = build_all()
    if os.environ.get("BUILD_ONLY") == "1":
        return
    ws = SplitKWorkspace(64 << 20, 1 << 16, torch.device("cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = []
    for k, n in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(k + n)
        ws_list = []
        for _ in range(8):
            w, _ = random_gptq_layer(k, n, 4, 128, False, gen)
            ws_list.append(mma.repack(w, torch.device("cuda")))
        check_w, check_ref = random_gptq_layer(k, n, 4, 128, True, gen)
        cw = mma.repack(check_w, torch.device("cuda"))
        for m in TOKENS:
            x = torch.randn((m, k), device="cuda").half()
            ref = x.float() @ check_ref.t()
            row = [f"{k}x{n}", m]
            for v, mod in mods.items():
                chunks = int(v.split("x")[0])  # e.g. "2x4" or "2x4xNO_HINT"
                stages = -(-k // (64 * chunks))
                best = None
                for bn, kw in mma.GEOMETRIES:
                    blocks = -(-n // bn) * -(-m // 64)
                    for s in (1, 2, 3, 4, 6, 8, 12, 16):
                        if s > 1 and (stages // s < 2 or blocks * s > 6 * sms):
                            continue
                        try:
                            out = mod.matmul(x, cw.perm, cw.qweight, cw.meta, 128, None,
                                             ws.partials, ws.counters, s, bn, kw)
                            err = ((out.float() - ref).norm() / ref.norm()).item()
                            assert err < 3e-3, f"{v} {bn}k{kw}/{s} m={m}: rel err {err:.2e}"
                            us = graph_time_us(lambda s=s, bn=bn, kw=kw: [mod.matmul(
                                x, w.perm, w.qweight, w.meta, 128, None, ws.partials,
                                ws.counters, s, bn, kw) for w in ws_list])
                        except Exception as e:  # noqa: BLE001 - e.g. too much shared memory
                            print(f"{v} {bn}k{kw}/{s} m={m}: {str(e)[:160]}")
                            continue
                        if best is None or us < best[0]:
                            best = (us, f"{bn}k{kw}/{s}")
                row.append(best)
            table.append(row)
            print(f"[{time.time() - T0:.0f}s]", row, flush=True)
    print(f"\n## mma variants (inputs a stage/64 x stages), us per layer call, "
          f"{torch.cuda.get_device_name(0)}")
    print("shape           M " + "".join(f"{v:>16}" for v in mods))
    for row in table:
        cells = "".join(f"{c[0]:9.1f} {c[1]:>6}" if c else f"{'-':>16}" for c in row[2:])
        print(f"{row[0]:<12} {row[1]:>4} {cells}")


if __name__ == "__main__":
    main()
