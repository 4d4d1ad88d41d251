"""Run under TRITON_INTERPRET=1 (tests/test_triton_interpreter.py): the grouped LoRA kernels
(engine/model/lora/triton_sgmv.py) against the torch reference on the CPU, for plain and fused
layers, mixed adapters and base rows, ranks below the slot size, and K splits."""

from __future__ import annotations

import sys

import torch

from engine.model.lora.base import LoraSite
from engine.model.lora.batching import lora_batch
from engine.model.lora.torch_ref import TorchLoraKernels
from engine.model.lora.triton_sgmv import MAX_SPLIT_K, TritonLoraKernels, split_k

# (in_features, out sizes of the fused projections, max rank, slot of each sequence, its rows)
CASES = [
    (256, (128,), 16, [0, -1, 1, 0], [3, 2, 5, 1]),
    (256, (96, 32, 32), 8, [1, 1, -1, 2, 0], [1, 1, 1, 1, 1]),  # q/k/v fused, decode rows
    (1536, (64, 80), 16, [2, -1, 0], [20, 7, 33]),  # gate/up fused, 3 K splits, long segments
    (64, (48,), 4, [-1, -1], [2, 3]),  # no adapter rows
]


def torch_to(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    max_loras = 3
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
        for k, outs, rank, slots, rows in CASES:
            site = LoraSite(0, tuple(f"p{i}" for i in range(len(outs))), k, outs, max_loras,
                            rank, dtype, torch.device("cpu"))
            for slot in range(max_loras):
                weights = []
                for size in outs:
                    r = rank - slot  # ranks below the slot size leave zero padding
                    weights.append((torch.randn(r, k, generator=gen).to(dtype) / k ** 0.5,
                                    torch.randn(size, r, generator=gen).to(dtype)))
                weights[-1] = None if slot == 1 else weights[-1]  # an untargeted projection
                site.write(slot, weights)
            t = sum(rows)
            x = torch.randn(t, k, generator=gen).to(dtype)
            base = torch.randn(t, sum(outs), generator=gen).to(dtype)
            batch = lora_batch(slots, rows, max_loras, torch_to)
            if batch is None:
                assert all(s < 0 for s in slots)
                print(f"ok no adapter rows {dtype}")
                continue
            want = base.float().clone()
            TorchLoraKernels().add(want, x.float(), _as_float(site), batch)
            got = base.clone()
            kernels = TritonLoraKernels(t, site.a.shape[1], torch.device("cpu"))
            kernels.add(got, x, site, batch)
            err = float((got.float() - want).norm() / want.norm())
            base_rows = [i for i, s in enumerate(_row_slots(slots, rows)) if s < 0]
            untouched = torch.equal(got[base_rows], base[base_rows])
            if not err < tol or not untouched:
                print(f"FAIL k={k} outs={outs} rank={rank} {dtype}: rel err {err:.2e}, "
                      f"base rows untouched {untouched}")
                return 1
            print(f"ok k={k} outs={outs} rank={rank} splits={split_k(k)} {dtype}: {err:.1e}")
    assert split_k(1 << 20) == MAX_SPLIT_K
    return 0


def _as_float(site: LoraSite) -> LoraSite:
    out = LoraSite.__new__(LoraSite)
    out.__dict__.update(site.__dict__)
    out.a, out.b = site.a.float(), site.b.float()
    return out


def _row_slots(slots: list[int], rows: list[int]) -> list[int]:
    return [s for s, n in zip(slots, rows, strict=True) for _ in range(n)]


if __name__ == "__main__":
    sys.exit(main())
