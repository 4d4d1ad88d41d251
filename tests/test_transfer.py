"""engine/transfer.py on the CPU: every section of an Upload comes back as it went in, and
starts 16-byte aligned whatever the lengths before it (Triton specialises kernels on pointer
alignment; an unaligned section would make a kernel compile again mid-serving)."""

from __future__ import annotations

import torch

from engine.transfer import HostFetch, Upload


def test_sections_round_trip_and_start_aligned() -> None:
    up = Upload()
    values = {
        "odd_ids": ([5, 6, 7], torch.int64),
        "positions": ([0, 1, 2, 3, 4], torch.int64),
        "empty": ([], torch.int64),
        "lens": ([3], torch.int32),
        "table": (torch.arange(6, dtype=torch.int16).reshape(2, 3), torch.int32),
        "after_table": ([9, 8, 7], torch.int32),
        "scales": ([0.5, 0.25, 2.0], torch.float32),
    }
    slots = {name: up.add(v, dtype) for name, (v, dtype) in values.items()}
    sent = up.send(torch.device("cpu"))
    for name, (v, dtype) in values.items():
        got = sent[slots[name]]
        want = v.to(dtype) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype)
        assert got.dtype == dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
        if got.numel():
            assert got.data_ptr() % 16 == 0, f"{name} starts at {got.data_ptr() % 16} mod 16"


def test_host_fetch_on_the_cpu_returns_the_tensors() -> None:
    a, b = torch.arange(4), torch.ones(2, 3)
    got = HostFetch([a, b]).wait()
    assert torch.equal(got[0], a) and torch.equal(got[1], b)
