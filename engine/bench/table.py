"""One row of a benchmark's printed table. Torch-free: the load clients use it too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    what: str
    value: float
    unit: str
