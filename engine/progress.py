"""Start-up progress as log lines: what a loading stage has done so far and how long it took.

A model load is minutes of silence otherwise. Each stage logs a few interim lines (evenly
spaced, so a 40-layer checkpoint says where it is without a line per tensor) and one closing
line; the numbers also travel as structured fields (``stage``, ``done``, ``total``, ``bytes``,
``seconds``) for JSON logs. Torch-free.
"""

from __future__ import annotations

import logging
import time


def size(num_bytes: int) -> str:
    """Bytes as a person reads them: GiB for weights, MiB for the small models of tests."""
    if num_bytes >= 1 << 30:
        return f"{num_bytes / (1 << 30):.2f} GiB"
    return f"{num_bytes / (1 << 20):.1f} MiB"


class StageProgress:
    """Progress of one stage over ``total`` units (layers), logged to ``log`` at INFO.

    ``advance`` after each unit (with the bytes handled so far) logs at most
    ``interim_lines`` lines before the last unit; ``finish`` logs the closing line and returns
    the stage's seconds.
    """

    def __init__(self, log: logging.Logger, stage: str, total: int, unit: str,
                 interim_lines: int = 3) -> None:
        self.log = log
        self.stage = stage
        self.total = total
        self.unit = unit
        self.done = 0
        self.num_bytes = 0
        self.start = time.monotonic()
        # Log after every `every` units: interim_lines + 1 even steps over the stage.
        self.every = max(1, -(-total // (interim_lines + 1)))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def advance(self, bytes_so_far: int) -> None:
        self.done += 1
        self.num_bytes = bytes_so_far
        if self.done < self.total and self.done % self.every == 0:
            self.log.info("%s: %d/%d %s, %s, %.1f s", self.stage, self.done, self.total,
                          self.unit, size(self.num_bytes), self.seconds, extra=self._fields())

    def finish(self, bytes_so_far: int, detail: str = "") -> float:
        self.num_bytes = bytes_so_far
        seconds = self.seconds
        suffix = f"; {detail}" if detail else ""
        self.log.info("%s: %d %s, %s in %.1f s%s", self.stage, self.done, self.unit,
                      size(self.num_bytes), seconds, suffix, extra=self._fields())
        return seconds

    def _fields(self) -> dict[str, object]:
        return {"stage": self.stage, "done": self.done, "total": self.total,
                "bytes": self.num_bytes, "seconds": round(self.seconds, 3)}


def timed_stage(log: logging.Logger, stage: str, start: float, detail: str) -> float:
    """Log the closing line of a stage without units (e.g. kernel set-up) that began at
    ``start`` (time.monotonic()); returns its seconds."""
    seconds = time.monotonic() - start
    log.info("%s: %s in %.1f s", stage, detail, seconds,
             extra={"stage": stage, "seconds": round(seconds, 3)})
    return seconds
