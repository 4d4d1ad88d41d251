"""The reference LoRA kernels: plain matmuls per run of rows, on any device. The CPU path of the
server and the ground truth of the Triton kernels' tests."""

from __future__ import annotations

import torch

from engine.model.lora.base import LoraBatch, LoraSite


class TorchLoraKernels:
    name = "torch"
    # Reads the host segments: the rows of each run change every step.
    graph_capturable = False

    def add(self, y: torch.Tensor, x: torch.Tensor, site: LoraSite, batch: LoraBatch) -> None:
        r = site.max_rank
        for start, end, slot in batch.segments:
            v = x[start:end] @ site.a[slot].t()  # [n, S*R]
            for s, (offset, size) in enumerate(site.slices):
                y[start:end, offset:offset + size] += (
                    v[:, s * r:(s + 1) * r] @ site.b[slot, offset:offset + size].t())
