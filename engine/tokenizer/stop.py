"""Stop-string matching over streamed text.

Text arrives in arbitrary chunks (one per detokenised step), so a stop string may be split
across any number of chunks. The matcher holds back only what could still become a stop string
and releases everything else at once, so text streams as early as possible.

Which stop wins: the one that is completed first while reading the text left to right (the
earliest end); of two that end at the same character, the one that starts earlier (the longer).
This is the point where a generator that checks after every character would stop, and it makes
the result independent of how the text was chunked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopResult:
    # Text that is safe to emit now. When ``stop`` is set it is everything up to, and not
    # including, the stop string; nothing after the stop string is ever emitted.
    text: str
    # The stop string that matched; the request must end. None: no stop yet.
    stop: str | None = None


class StopStringMatcher:
    """Finds the first stop string in a stream of text chunks.

    Invariant between calls: ``_held`` is the longest suffix of the text fed so far that is a
    proper prefix of some stop string, and it contains no whole stop string. Emitted text plus
    ``_held`` is exactly the text fed so far.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        # dict.fromkeys: drop duplicates but keep the caller's order.
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        # Every proper prefix of every stop: a suffix of the text in this set may still grow
        # into a stop string, so it must be held back.
        self._prefixes: frozenset[str] = frozenset(
            s[:i] for s in self._stops for i in range(1, len(s)))
        self._max_held = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""
        self._stopped: str | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the stream, if one did."""
        return self._stopped

    def feed(self, text: str) -> StopResult:
        """Add the next chunk; return what can be emitted and whether a stop string matched."""
        if self._stopped is not None:
            raise RuntimeError(f"the stream already ended at stop string {self._stopped!r}")
        buf = self._held + text
        match = self._first_match(buf)
        if match is not None:
            start, stop = match
            self._held = ""
            self._stopped = stop
            return StopResult(buf[:start], stop)
        keep = self._held_suffix_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return StopResult(buf[:len(buf) - keep])

    def flush(self) -> str:
        """The held-back tail, at the end of a stream that did not stop."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the match with the earliest end, ties to the earliest start."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            # A stop's first occurrence is also its earliest-ending one (fixed length).
            start = buf.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _held_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for k in range(min(len(buf), self._max_held), 0, -1):
            if buf[len(buf) - k:] in self._prefixes:
                return k
        return 0
