"""The reference LoRA kernels: plain matmuls per run of rows, on any device. The CPU path of the
server and the ground truth of the Triton kernels' tests."""

from __future__ import annotations

import torch

from engine.model.lora.base import LoraBatch, LoraSite


class TorchLoraKernels:
    name = "torch"
    # Loops over the host groups: which rows each slot has changes every step.
    graph_capturable = False
    reads_groups = True

    def add(self, y: torch.Tensor, x: torch.Tensor, site: LoraSite, batch: LoraBatch) -> None:
        r = site.max_rank
        for g in batch.groups:  # one pair of matmuls per adapter, whatever its row count
            xs = x[g.start:g.end] if g.rows is None else x.index_select(0, g.rows)
            v = xs @ site.a[g.slot].t()  # [n, S*R]
            for s, (offset, size) in enumerate(site.slices):
                delta = v[:, s * r:(s + 1) * r] @ site.b[g.slot, offset:offset + size].t()
                out = y[:, offset:offset + size]
                if g.rows is None:
                    out[g.start:g.end] += delta
                else:
                    out.index_add_(0, g.rows, delta)
