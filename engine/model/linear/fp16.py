"""Dequantise-at-load linear layers: GPTQ weights expanded once to a dense matrix on the device,
then every step is one cuBLAS product.

Used for the 8-bit branches on the GPU (exllamav2 has no 8-bit GPTQ kernel) and for layers whose
shape the 4-bit kernel cannot take. It trades memory for generality: a dense fp16 matrix takes
4x (4-bit) or 2x (8-bit) the bytes of the packed one, so the expansion checks the free memory
first and says what to do when it does not fit.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from engine.checkpoint.types import CheckpointError, GPTQLinearWeights

log = logging.getLogger(__name__)


def expand_gptq(weights: GPTQLinearWeights, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """The dense weight [out, in] in ``dtype``, dequantised on ``device``:
    w[o, i] = scale[g, o] * (q[i, o] - (zero[g, o] + 1)) with g = g_idx[i].

    Vectorised over the whole matrix on the device (a 13B layer takes milliseconds on a GPU);
    the integer part is exact and the product is rounded once, to ``dtype``.
    """
    k, n, bits = weights.in_features, weights.out_features, weights.bits
    need = k * n * (8 + torch.finfo(dtype).bits // 8)  # int32 + float32 temporaries, result
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise CheckpointError(
                f"{weights.name}: expanding {bits}-bit weights to {dtype} needs "
                f"{need / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB of GPU memory is free; "
                "use a 4-bit branch or a GPU with more memory")
    pack, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(pack, device=device, dtype=torch.int32) * bits
    qweight = weights.qweight.to(device=device, dtype=torch.int32)  # [in/pack, out]
    # Arithmetic shifts of negative int32 words still leave the right low bits under the mask.
    q = ((qweight.unsqueeze(1) >> shifts.view(1, pack, 1)) & mask).reshape(k, n)  # [in, out]
    qzeros = weights.qzeros.to(device=device, dtype=torch.int32)  # [G, out/pack]
    zeros = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, pack)) & mask).reshape(-1, n) + 1
    if weights.g_idx is not None:
        g_idx = weights.g_idx.to(device=device, dtype=torch.int64)
    elif weights.group_size is None:
        g_idx = torch.zeros(k, dtype=torch.int64, device=device)
    else:
        g_idx = torch.arange(k, device=device) // weights.group_size
    scales = weights.scales.to(device=device, dtype=torch.float32)  # [G, out]
    w = (q - zeros[g_idx]).to(torch.float32).mul_(scales[g_idx])  # [in, out]
    return w.t().to(dtype).contiguous()  # [out, in]


class ExpandedLinear:
    def __init__(self, weights: GPTQLinearWeights, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.in_features = weights.in_features
        self.out_features = weights.out_features
        self.weight = expand_gptq(weights, dtype, device)  # [out, in]
        self.bias = None if weights.bias is None else weights.bias.to(device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out]"""
        return F.linear(x, self.weight, self.bias)


class ExpandedLinearBackend:
    """Every layer expanded to a dense matrix at load (ModelInfo.linear_backend "fp16-expanded")."""

    name = "fp16-expanded"
    # forward returns a fresh [T, out] tensor: a LoRA delta may be added to it in place.
    supports_lora = True

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self._layers: list[ExpandedLinear] = []

    def make(self, weights: GPTQLinearWeights) -> ExpandedLinear:
        layer = ExpandedLinear(weights, self.dtype, self.device)
        self._layers.append(layer)
        return layer

    def post_init(self, max_num_tokens: int) -> None:
        """Nothing to size: every layer owns its matrix. Logs what the expansion cost."""
        total = sum(layer.nbytes for layer in self._layers)
        log.info("linear layers expanded to %s at load: %d layers, %.2f GiB", self.dtype,
                 len(self._layers), total / 2**30)
