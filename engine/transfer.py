"""Moving a step's data between the host and the device, without waiting for the device.

``Upload`` is the one host-to-device path of a step: batch building and sampling metadata
gather their values per dtype into one host buffer each, and ``send`` copies each buffer once
(pinned and non-blocking on CUDA, so queueing a step never waits for the step before it).

``HostFetch`` is the way back: it queues copies of a step's result tensors into pinned host
memory behind the step's kernels and records one event; ``wait`` is the step's one
synchronisation with the device. On the CPU both are plain tensor handling: the computation
has already happened when they are called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """Where one value list lives in an ``Upload``: its dtype's buffer, range and shape."""

    dtype: torch.dtype
    start: int
    stop: int
    shape: tuple[int, ...]


# Each section starts on this many bytes. Triton specialises a kernel on whether each pointer
# argument is 16-byte aligned: unaligned sections (an odd number of int64 tokens before the
# positions, say) would make a kernel compile again mid-serving for a variant the warm-up never
# launched, and read slower.
_SECTION_ALIGN_BYTES = 16


class Upload:
    """Sections of one host buffer per dtype, each 16-byte aligned. ``add`` returns a Slot;
    after ``send`` a Slot reads as a device tensor view of its section (``Uploaded[slot]``)."""

    def __init__(self) -> None:
        self._parts: dict[torch.dtype, list[torch.Tensor]] = {}
        self._sizes: dict[torch.dtype, int] = {}

    def add(self, values: Sequence[int] | Sequence[float] | torch.Tensor,
            dtype: torch.dtype) -> Slot:
        host = (values.to(dtype) if isinstance(values, torch.Tensor)
                else torch.tensor(values, dtype=dtype))
        size = self._sizes.get(dtype, 0)
        align = max(1, _SECTION_ALIGN_BYTES // host.element_size())
        start = -(-size // align) * align
        parts = self._parts.setdefault(dtype, [])
        if start > size:
            parts.append(torch.zeros(start - size, dtype=dtype))
        parts.append(host.reshape(-1))
        self._sizes[dtype] = start + host.numel()
        return Slot(dtype, start, start + host.numel(), tuple(host.shape))

    def send(self, device: torch.device) -> Uploaded:
        buffers = {dtype: to_device(torch.cat(parts) if len(parts) > 1 else parts[0], device)
                   for dtype, parts in self._parts.items()}
        return Uploaded(buffers)


class Uploaded:
    """The device buffers of a sent Upload."""

    def __init__(self, buffers: dict[torch.dtype, torch.Tensor]) -> None:
        self._buffers = buffers

    def __getitem__(self, slot: Slot) -> torch.Tensor:
        return self._buffers[slot.dtype][slot.start:slot.stop].view(slot.shape)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. Pinned and non-blocking on CUDA: a blocking copy, or one
    from pageable memory, would wait for the stream, i.e. for the step still running."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class HostFetch:
    """Device tensors on their way to the host. The copies are queued on the current stream
    behind whatever computes the tensors, so constructing this never waits."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._event: torch.cuda.Event | None = None
        if any(t.device.type == "cuda" for t in tensors):
            host = []
            for t in tensors:
                # A fresh pinned buffer per step: the caching host allocator keeps it from
                # being reused before its copy completes, and the next step's copies cannot
                # overwrite it while the host still reads it.
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                host.append(h)
            self._event = torch.cuda.Event()
            self._event.record()
            self._host = host
        else:
            self._host = [t.detach() for t in tensors]

    def wait(self) -> list[torch.Tensor]:
        """The host copies, once the device has written them: the step's one wait."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
