"""The reference linear backend: dequantise GPTQ weights once at load, then plain matmuls.

Works for every bits / group size / act-order combination on any device. It is the ground truth
the CUDA kernels are tested against, and the CPU path of the server.
"""

from __future__ import annotations

import torch

from engine.checkpoint.dequant import dequantize
from engine.checkpoint.types import GPTQLinearWeights


class DequantizedLinear:
    def __init__(self, weights: GPTQLinearWeights, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.in_features = weights.in_features
        self.out_features = weights.out_features
        # weight: [out, in] stored transposed-contiguous for x @ W^T
        self.weight_t = dequantize(weights).to(device=device, dtype=dtype).t().contiguous()
        self.bias = None if weights.bias is None else weights.bias.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out]"""
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


class TorchLinearBackend:
    name = "torch"
    # forward returns a fresh [T, out] tensor: a LoRA delta may be added to it in place.
    supports_lora = True

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device

    def make(self, weights: GPTQLinearWeights) -> DequantizedLinear:
        return DequantizedLinear(weights, self.dtype, self.device)

    def post_init(self, max_num_tokens: int) -> None:
        """Nothing to size: every layer owns its dequantised matrix."""
