"""Fault injection for the reliability tests. Off unless ``GPTQ_TESTING_FAULTS`` is set.

The reliability suite (tests/test_faults.py) proves what a request sees when the engine fails:
a model step that raises, an engine loop that dies, a detokeniser that fails for one request, a
tokenizer that fails on one prompt. Those faults cannot be provoked from outside, so the engine
carries these hooks. They are deliberately not a setting: no flag, no ``--help`` line, no row in
docs/configuration.md. Only the environment variable below turns them on; its value is JSON
naming, per fault, a marker text, and a fault fires only for a request whose prompt text (or,
for the tokenizer, the text being encoded) contains its marker::

    GPTQ_TESTING_FAULTS='{"step_error": "@@step@@", "loop_crash": "@@crash@@",
                          "detokenize_error": "@@detok@@", "tokenize_error": "@@tok@@"}'

A server with the variable set logs a warning at start-up. The hooks sit at the engine's own
seams (the step, the loop, output processing, the tokenizer), so they keep working when the
engine core moves into a process of its own: the variable is inherited.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

FAULTS_ENV = "GPTQ_TESTING_FAULTS"


class FaultKind(enum.StrEnum):
    STEP_ERROR = "step_error"  # the model step raises (once per marked request)
    LOOP_CRASH = "loop_crash"  # the engine loop thread dies
    DETOKENIZE_ERROR = "detokenize_error"  # output processing fails on the request's 2nd token
    TOKENIZE_ERROR = "tokenize_error"  # Tokenizer.encode raises on the text


class InjectedFault(RuntimeError):
    """An injected failure of the kind ordinary code raises (caught like any Exception)."""


class InjectedLoopCrash(BaseException):
    """Escapes every ``except Exception``: the engine loop dies as if its thread were killed."""


@dataclass(frozen=True)
class FaultPlan:
    """Which faults are armed, each by the marker text that triggers it."""

    markers: Mapping[FaultKind, str]

    @classmethod
    def none(cls) -> FaultPlan:
        return cls({})

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> FaultPlan:
        raw = (os.environ if environ is None else environ).get(FAULTS_ENV, "")
        if not raw:
            return cls.none()
        try:
            spec = json.loads(raw)
            markers = {FaultKind(kind): str(marker) for kind, marker in spec.items() if marker}
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{FAULTS_ENV} must be a JSON object mapping "
                             f"{', '.join(FaultKind)} to marker texts: {exc}") from exc
        plan = cls(markers)
        log.warning("FAULT INJECTION IS ON (%s): %s. This is for tests only.", FAULTS_ENV,
                    ", ".join(sorted(plan.markers)))
        return plan

    @property
    def active(self) -> bool:
        return bool(self.markers)

    def kinds_for(self, text: str) -> frozenset[FaultKind]:
        """The faults armed for a request whose prompt reads ``text``."""
        return frozenset(k for k, marker in self.markers.items() if marker in text)

    def check_tokenize(self, text: str) -> None:
        marker = self.markers.get(FaultKind.TOKENIZE_ERROR)
        if marker is not None and marker in text:
            raise InjectedFault("injected tokenizer fault")
