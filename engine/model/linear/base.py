"""The quantised-linear seam.

Construction has two phases (as TGI does for the ExLlama kernels): every layer is built first,
then ``post_init(max_num_tokens)`` runs once the largest step size is known, so a backend can size
one shared scratch buffer. After that ``forward`` is the only call and must not synchronise with
the host (it may be captured in a CUDA graph).
"""

from __future__ import annotations

from typing import Protocol

import torch

from engine.checkpoint.types import GPTQLinearWeights


class QuantLinear(Protocol):
    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] -> [T, out_features], in the model dtype."""
        ...


class LinearBackend(Protocol):
    name: str
    # Capability: every layer's forward returns a fresh [T, out] tensor (never a view of a
    # weight or of a buffer another layer reuses within the step), so LoRA can add its delta
    # to it in place. The engine refuses LoRA on a backend that does not declare this.
    supports_lora: bool

    def make(self, weights: GPTQLinearWeights) -> QuantLinear:
        """Build one layer (phase one). May move weights to the backend's device."""
        ...

    def post_init(self, max_num_tokens: int) -> None:
        """Phase two: called once after every layer is made, before the first forward."""
        ...
