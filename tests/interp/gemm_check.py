"""Run under TRITON_INTERPRET=1 (tests/test_triton_interpreter.py): every path of the Triton
GPTQ layer against the float32 reference, on the CPU, for each branch layout."""

from __future__ import annotations

import sys

import torch

from engine.bench.layers import random_gptq_layer
from engine.model.linear.gptq_triton import KernelConfig, SplitKWorkspace, unsupported_reason
from engine.model.linear.plan import Path, PathKind
from engine.model.linear.triton_backend import TritonLinear

LAYOUTS = [(4, 32, True), (4, 128, False), (8, 64, True), (4, None, True), (8, None, False),
           (8, 32, False)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def main() -> int:
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    workspace = SplitKWorkspace(1 << 20, 4096, device)
    for bits, group, act_order in LAYOUTS:
        k, n = 256, 128
        weights, ref_w = random_gptq_layer(k, n, bits, group, act_order, gen, device="cpu")
        assert unsupported_reason(weights) is None
        layer = TritonLinear(weights, device, None)
        layer.workspace = workspace
        layer.dense = torch.empty((k, n), dtype=torch.float16)
        for m in (1, 3, 17):
            x = torch.randn(m, k, generator=gen).half()
            ref = x.float() @ ref_w.t()
            paths = [Path(PathKind.TRITON, KernelConfig(32, 1 if m == 1 else 16, s, 4, 2))
                     for s in (1, 2)]
            paths += [Path(PathKind.TRITON), Path(PathKind.DENSE)]
            for path in paths:
                out = layer.run(path, x)
                err = rel(out, ref)
                if not err < 3e-3:
                    print(f"FAIL bits={bits} group={group} act={act_order} m={m} {path}: {err}")
                    return 1
                if int(workspace.counters.abs().sum()) != 0:
                    print(f"FAIL counters not reset after {path}")
                    return 1
        print(f"ok bits={bits} group={group} act_order={act_order}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
