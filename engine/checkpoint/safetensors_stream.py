"""Write one .safetensors file tensor by tensor, so a 13B-sized checkpoint never sits in memory.

``safetensors.torch.save_file`` takes every tensor at once. The format itself only needs the
names, dtypes and shapes up front (they make the header, with each tensor's byte range); the data
can then be streamed in header order. The files read back with the ``safetensors`` library like
any other.

Layout: u64 little-endian header length, the JSON header padded with spaces to 8-byte alignment
(as the reference writer does), then the tensors' raw little-endian bytes back to back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


class SafetensorsStreamWriter:
    """Writes the header on construction; ``write`` must then be called once per spec, in order.
    ``close`` checks that every tensor arrived, so a truncated file is never left looking valid
    without an error having been raised."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._specs = list(specs)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata or {}}
        offset = 0
        for spec in self._specs:
            if spec.dtype not in _DTYPE_NAMES:
                raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be written")
            if spec.name in header:
                raise ValueError(f"{spec.name}: listed twice")
            header[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-(8 + len(encoded)) % 8)
        self._file: BinaryIO = path.open("wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{name}: every tensor of {self.path} was already written")
        spec = self._specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"expected {spec.name} {spec.dtype} {spec.shape} next, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        # Raw bytes in memory order; little-endian hosts (x86, ARM) match the format.
        raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(raw))
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            raise ValueError(f"{self.path}: closed before {missing} was written")

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
