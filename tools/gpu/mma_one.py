"""Device run: one w4a16 tensor-core launch configuration, for Nsight Compute. Times every K
split of the case (CUDA events, 50 launches each), prints them, then runs the chosen (or
fastest) split three times inside the NVTX range "profile", which tools/gpu/mma_ncu.sh
profiles.
Usage: python3 tools/gpu/mma_one.py IN OUT TOKENS BLOCK_N K_WARPS [SPLIT]
(K_WARPS "w": the wgmma kernel with blocks of BLOCK_N rows; there SPLIT "skG" is a stream-K
launch of G blocks, and STREAM_K=G1,G2,... times those stream-K grids beside the splits.)
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from engine.bench.layers import random_gptq_layer  # noqa: E402
from engine.model.linear import mma  # noqa: E402
from engine.model.linear.gptq_triton import SplitKWorkspace  # noqa: E402
from engine.model.linear.plan import Path, PathKind  # noqa: E402
from engine.model.linear.triton_backend import MmaLinear  # noqa: E402


def event_us(fn, reps: int = 50) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    k, n, m, block_n = (int(a) for a in sys.argv[1:5])
    wg = sys.argv[5] == "w"
    k_warps = 1 if wg else int(sys.argv[5])
    chosen = sys.argv[6] if len(sys.argv) > 6 else ""
    dev = torch.device("cuda")
    w, _ = random_gptq_layer(k, n, 4, 128, False, torch.Generator(device="cuda").manual_seed(0))
    layer = MmaLinear(w, dev)
    layer.workspace = SplitKWorkspace(64 << 20, 1 << 16, dev)
    x = torch.randn((m, k), device="cuda").half()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    times = {}
    def path(split: str) -> Path:
        if wg and split.startswith("sk"):
            return Path(PathKind.WGMMA, block_n=block_n, stream_k=int(split[2:]))
        if wg:
            return Path(PathKind.WGMMA, split_k=int(split), block_n=block_n)
        return Path(PathKind.MMA, split_k=int(split), block_n=block_n, k_warps=k_warps)

    splits = [str(s) for s in (mma.wgmma_split_candidates(m, layer.w, sms, block_n) if wg
                               else mma.split_candidates(m, layer.w, sms, block_n))]
    if wg:
        splits += [f"sk{g}" for g in os.environ.get("STREAM_K", "").split(",") if g]
    for split in splits:
        p = path(split)
        times[split] = event_us(lambda p=p: layer.run(p, x))
    best = chosen or min(times, key=times.get)
    print(f"case {k}x{n} M={m} geometry {block_n}{'w' if wg else f'k{k_warps}'}: "
          + ", ".join(f"split {s} {t:.1f} us" for s, t in times.items()) + f"; profiled {best}")
    p = path(best)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    for _ in range(3):
        layer.run(p, x)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main()
