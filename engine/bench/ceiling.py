"""The bandwidth ceiling of decoding: bytes one step must read over the card's copy bandwidth.

A decode step reads every weight once (the embedding table excepted: one row per token) and,
for each sequence, its whole K/V context. No kernel can finish the step faster than those bytes
take to stream at the card's measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint.types import LlamaArchConfig

_EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Ceiling:
    bandwidth_gbps: float  # measured copy bandwidth, bytes read + written
    weight_bytes: int  # read once per decode step
    kv_bytes_per_token: int  # K and V of one cached token, all layers

    def step_ms(self, batch: int, context: float) -> float:
        """Least time of one decode step over ``batch`` sequences of ``context`` tokens."""
        nbytes = self.weight_bytes + batch * context * self.kv_bytes_per_token
        return nbytes / (self.bandwidth_gbps * 1e9) * 1e3

    def tokens_per_s(self, batch: int, context: float) -> float:
        return batch / (self.step_ms(batch, context) * 1e-3)


def weight_bytes(checkpoint: Path) -> int:
    """Bytes of every tensor in the checkpoint's safetensors files but the embedding table."""
    total = 0
    for path in sorted(checkpoint.glob("*.safetensors")):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, entry in header.items():
            if name != "__metadata__" and name != _EMBEDDING:
                start, end = entry["data_offsets"]
                total += end - start
    return total


def kv_bytes_per_token(arch: LlamaArchConfig, element_size: int = 2) -> int:
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * element_size


def copy_bandwidth_gbps(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy of ``nbytes``, counting bytes read plus bytes written (median)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[reps // 2]
    return 2 * nbytes / (ms * 1e-3) / 1e9
