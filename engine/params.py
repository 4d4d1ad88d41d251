"""Per-request sampling parameters: the only knobs a request can turn inside the engine.

Torch-free on purpose: the HTTP layer builds these from OpenAI requests.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# torch.Generator.manual_seed takes a signed or unsigned 64-bit value; keep seeds (and the
# seed + i of n > 1 choices) well inside that.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class ConstraintKind(enum.StrEnum):
    """What the text of a ``Constraint`` is."""

    JSON_SCHEMA = "json_schema"  # a JSON Schema, as JSON text
    JSON_OBJECT = "json_object"  # any JSON object; the text is empty
    REGEX = "regex"  # a regular expression the whole output must match
    CHOICE = "choice"  # a JSON array of strings: the output is exactly one of them
    GRAMMAR = "grammar"  # a Lark grammar (llguidance's dialect), or GBNF


@dataclass(frozen=True)
class Constraint:
    """The shape the generated text must have, enforced token by token by a grammar.

    Torch-free and picklable: it travels from the HTTP layer to the engine inside
    SamplingParams. ``(kind, text)`` identifies the compiled grammar (the engine's cache key);
    ``param`` only names the request field it came from, for error messages.
    """

    kind: ConstraintKind
    text: str = ""
    param: str = field(default="response_format", compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind.value, self.text)


class SamplingParamsError(ValueError):
    """A parameter is out of range. ``param`` names it as the OpenAI API spells it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Invariants (checked in ``__post_init__``): temperature 0 means greedy; ``top_k`` None means
    no top-k cut; ``logprobs`` None means no logprobs, an int k means the chosen token's logprob
    plus the k most likely alternatives (0 <= k <= 20).
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # token id -> additive bias in [-100, 100], as OpenAI defines it.
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None
    # Logprobs of the prompt tokens (for echo + logprobs): None, or k alternatives per position.
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    # Constrained decoding: every generated token keeps the output a prefix of a string the
    # constraint accepts, and the request stops when nothing else can follow.
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               "min_tokens must be between 0 and max_tokens")
        _check(_finite(self.temperature) and 0.0 <= self.temperature <= 2.0, "temperature",
               "temperature must be between 0 and 2")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
               "top_p must be in (0, 1]")
        _check(self.top_k is None or self.top_k >= 1, "top_k", "top_k must be at least 1")
        _check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p",
               "min_p must be between 0 and 1")
        _check(_finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
               "presence_penalty", "presence_penalty must be between -2 and 2")
        _check(_finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
               "frequency_penalty", "frequency_penalty must be between -2 and 2")
        _check(_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
               "repetition_penalty", "repetition_penalty must be in (0, 10]")
        for token_id, bias in self.logit_bias.items():
            _check(isinstance(token_id, int) and token_id >= 0, "logit_bias",
                   "logit_bias keys must be token ids")
            _check(_finite(bias) and -100.0 <= bias <= 100.0, "logit_bias",
                   "logit_bias values must be between -100 and 100")
        _check(self.seed is None or (isinstance(self.seed, int)
                                     and SEED_MIN <= self.seed <= SEED_MAX), "seed",
               f"seed must be an integer between {SEED_MIN} and {SEED_MAX}")
        for name, k in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            _check(k is None or 0 <= k <= MAX_TOP_LOGPROBS, name,
                   f"{name} must be between 0 and {MAX_TOP_LOGPROBS}")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop",
               f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "stop sequences must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(param, message)
