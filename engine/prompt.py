"""Which prompts the engine takes. Torch-free: the front checks every prompt before it is
sent to the engine core, and the core checks again."""

from __future__ import annotations

from collections.abc import Sequence


class PromptError(ValueError):
    """A prompt the engine cannot take. ``param`` names the offending request field."""

    def __init__(self, message: str, param: str = "prompt",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def validate_prompt(prompt_token_ids: Sequence[int], vocab_size: int,
                    max_model_len: int) -> None:
    """Raise PromptError unless the prompt is non-empty, every id is a token and at least one
    new token fits in the context."""
    if not prompt_token_ids:
        raise PromptError("the prompt is empty")
    for t in prompt_token_ids:
        if not isinstance(t, int) or not 0 <= t < vocab_size:
            raise PromptError(f"token id {t!r} is outside the vocabulary [0, {vocab_size})")
    if len(prompt_token_ids) >= max_model_len:
        raise PromptError(
            f"the prompt has {len(prompt_token_ids)} tokens; this model's maximum context "
            f"length is {max_model_len}, which must leave room for at least one new token",
            code="context_length_exceeded")
